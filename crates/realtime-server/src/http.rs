//! Routes, CORS and the WebSocket upgrade (`/realtime/v1/websocket`, `/socket/websocket`);
//! `/metrics` and `/inspector` are in `inspector.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::FutureExt;
use serde_json::json;

use crate::Inner;
use crate::connection::{self, ConnectInfo, ConnectionSlot};
use crate::inspector;
use crate::jwt::{JwtError, unix_now};
use crate::protocol::Vsn;
use crate::refusal::HttpRefusal;
use crate::rest;
use crate::websocket::Upgrade;

pub(crate) fn router(inner: Arc<Inner>, max_body: usize) -> Router {
    let rest_routes = Router::new()
        .route("/realtime/v1/api/broadcast", post(rest::batch))
        .route("/api/broadcast", post(rest::batch))
        .route(
            "/realtime/v1/api/broadcast/{topic}/events/{event}",
            post(rest::single),
        )
        .route("/api/broadcast/{topic}/events/{event}", post(rest::single))
        .route_layer(middleware::from_fn_with_state(
            inner.clone(),
            rest::within_budget,
        ));
    Router::new()
        .route("/realtime/v1/websocket", get(websocket))
        .route("/socket/websocket", get(websocket))
        .route("/metrics", get(inspector::scrape))
        .route("/inspector", get(inspector::page))
        .route("/inspector/", get(inspector::page))
        .route("/inspector/status", get(inspector::status))
        .route("/inspector/{file}", get(inspector::file))
        .merge(rest_routes)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(cors))
        .with_state(inner)
}

const ALLOW_HEADERS: &str = "authorization, apikey, content-type, x-client-info, x-api-key";

/// Browser pages on other origins call the REST endpoints (supabase-js does from any site).
async fn cors(req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        return resp;
    }
    // Metrics and the inspector are for this server's own pages and for scrapers: pages on
    // other origins may not read them through a visitor's browser.
    let path = req.uri().path();
    let shared = !(path == "/metrics" || path.starts_with("/inspector"));
    let mut resp = next.run(req).await;
    if shared {
        resp.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    resp
}

pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Supabase sleeps before refusing an upgrade, which slows reconnect storms.
async fn connect_error(inner: &Inner, status: StatusCode, refusal: HttpRefusal) -> Response {
    let delay = inner.config().connect_error_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    json_response(status, json!({ "error": refusal.to_string() }))
}

/// Only `x-*` headers reach `request.headers` for WebSocket connections, as in Supabase.
fn x_headers_json(headers: &HeaderMap) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if name.starts_with("x-")
            && let Ok(v) = value.to_str()
        {
            map.insert(name.to_string(), serde_json::Value::String(v.to_string()));
        }
    }
    serde_json::Value::Object(map).to_string()
}

async fn websocket(
    State(inner): State<Arc<Inner>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    ws: Upgrade,
) -> Response {
    // The listeners record each peer's address; a router served another way has none.
    let remote = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let token = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| params.get("apikey").cloned())
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    let Some(vsn) = Vsn::parse(params.get("vsn").map(String::as_str)) else {
        return connect_error(
            &inner,
            StatusCode::BAD_REQUEST,
            HttpRefusal::UnsupportedSerializer,
        )
        .await;
    };
    if token.is_empty() {
        return connect_error(
            &inner,
            StatusCode::UNAUTHORIZED,
            HttpRefusal::Token(JwtError::Missing),
        )
        .await;
    }
    let claims = match inner.jwt().verify(&token, unix_now()) {
        Ok(claims) => claims,
        Err(e) => {
            return connect_error(&inner, StatusCode::UNAUTHORIZED, HttpRefusal::Token(e)).await;
        }
    };
    let cfg = inner.config();
    let count = inner.active_connections.fetch_add(1, Ordering::AcqRel) + 1;
    let slot = ConnectionSlot(inner.clone());
    if count > cfg.max_connections.min(inner.socket_cap) {
        drop(slot);
        return connect_error(
            &inner,
            StatusCode::TOO_MANY_REQUESTS,
            HttpRefusal::TooManyConnections,
        )
        .await;
    }
    // Boxed: the upgrade's future keeps room for what its callback captured for as long as the
    // connection lives, after the callback has used it up.
    let info = Box::new(ConnectInfo {
        vsn,
        token,
        headers_json: x_headers_json(&headers).into(),
        claims,
        remote,
    });
    ws.accept(move |socket| {
        // Set up outside the future, which then holds only what the connection keeps.
        let task = connection::run(socket, *info, inner);
        async move {
            // A bug triggered by one client must not take the server down with it.
            if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                log::error!("realtime connection task panicked: {what}");
            }
            drop(slot);
        }
    })
}
