//! `GET /inspector`: a page to try channels from a browser (join, watch broadcasts and presence,
//! send, see why a join was refused), and `GET /metrics`.
//!
//! The page is static and embedded in the binary, supabase-js included, so it works without
//! any network but the server's: the token a user pastes stays in the browser and reaches the
//! server only as a client's token. Its one dynamic call, `/inspector/status`, needs a valid
//! token too.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::Inner;
use crate::http::json_response;
use crate::jwt::unix_now;
use crate::metrics;

/// The page and what it loads. `supabase.js` is the UMD build of the npm package pinned in the
/// repository's supabase-js tests, copied byte for byte (a test compares them).
const PAGE: &str = include_str!("../assets/inspector.html");
const SCRIPT: &str = include_str!("../assets/inspector.js");
const STYLE: &str = include_str!("../assets/inspector.css");
const ICON: &str = include_str!("../assets/favicon.svg");
const SUPABASE_JS: &str = include_str!("../assets/supabase.js");

/// Only this server's own files and sockets: the page runs no inline code and loads nothing
/// from elsewhere, so a pasted token cannot leave for another host through it.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:";

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new build of the extension may change the page; it is small, so always revalidate.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub(crate) async fn page(State(inner): State<Arc<Inner>>) -> Response {
    if !inner.config().inspector {
        return not_found();
    }
    asset("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn file(State(inner): State<Arc<Inner>>, Path(name): Path<String>) -> Response {
    if !inner.config().inspector {
        return not_found();
    }
    match name.as_str() {
        "inspector.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "inspector.css" => asset("text/css; charset=utf-8", STYLE),
        "supabase.js" => asset("text/javascript; charset=utf-8", SUPABASE_JS),
        "favicon.svg" => asset("image/svg+xml", ICON),
        _ => not_found(),
    }
}

/// The connection count for the page, to holders of a valid client token (the same check a
/// WebSocket connect makes), so that the page tells strangers nothing.
pub(crate) async fn status(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if !inner.config().inspector {
        return not_found();
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if let Err(e) = inner.jwt().verify(token, unix_now()) {
        let refusal = crate::refusal::HttpRefusal::Token(e);
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": refusal.to_string()}),
        );
    }
    let usage = inner.usage();
    let mut resp = json_response(
        StatusCode::OK,
        json!({
            "connections": usage.connections,
            "channels": usage.channels,
            "topics": usage.topics,
            "presence_members": usage.presence_keys,
        }),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /metrics`: 404 unless `metrics` is on; 401 without the bearer token when one is set.
pub(crate) async fn scrape(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let cfg = inner.config();
    if !cfg.metrics {
        return not_found();
    }
    if let Some(token) = &cfg.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !metrics::bearer_matches(given, token) {
            let mut resp = StatusCode::UNAUTHORIZED.into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
            return resp;
        }
    }
    let mut resp = Response::new(Body::from(inner.render_metrics()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    resp
}
