//! The HTTP/1.1 upgrade to a WebSocket (RFC 6455, 4.2): the request's checks, the 101
//! answer, and the upgraded socket handed to the connection's task.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;

/// The socket a connection is served on once upgraded.
pub(crate) type WsIo = TokioIo<Upgraded>;

/// A request that asked for a WebSocket and may be upgraded.
pub(crate) struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request cannot become a WebSocket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeRefusal {
    #[error("Request method must be `GET`")]
    NotGet,
    #[error("Connection header did not include 'upgrade'")]
    NoConnectionUpgrade,
    #[error("`Upgrade` header did not include 'websocket'")]
    NotWebSocket,
    #[error("`Sec-WebSocket-Version` header did not include '13'")]
    WrongVersion,
    #[error("`Sec-WebSocket-Key` header missing")]
    NoKey,
    #[error("WebSocket request couldn't be upgraded since no upgrade state was present")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRefusal {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRefusal::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRefusal::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRefusal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeRefusal::NotGet);
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeRefusal::NoConnectionUpgrade);
        }
        if !has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeRefusal::NotWebSocket);
        }
        if !has_token(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(UpgradeRefusal::WrongVersion);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeRefusal::NoKey)?;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let accept = HeaderValue::from_str(&accept).map_err(|_| UpgradeRefusal::NoKey)?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRefusal::NotUpgradable)?;
        Ok(Upgrade { accept, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and, once the client has the answer, serves the socket with `serve` on a
    /// task of its own.
    pub(crate) fn accept<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(WsIo) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade { accept, on_upgrade } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(TokioIo::new(upgraded)).await,
                // The client went away before the upgrade completed.
                Err(e) => log::debug!("WebSocket upgrade failed: {e}"),
            }
        });
        let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        resp
    }
}

/// Whether the comma-separated header holds `token` (case-insensitively), in any of its lines.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tokens_are_matched_whole_and_case_insensitively() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("upgrades"));
        assert!(!has_token(&h, header::CONNECTION, "upgrade"));
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("upgrade"));
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
    }

    #[test]
    fn the_accept_key_is_the_one_from_the_rfc_example() {
        let accept = tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
