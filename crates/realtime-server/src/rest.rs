//! REST broadcast endpoints (reference 3.5, 3.6).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::Inner;
use crate::authz::Ask;
use crate::broadcast::{Body, Outgoing, id_meta};
use crate::events::AuthorizationPurpose;
use crate::http::json_response;
use crate::jwt::{Claims, unix_now};
use crate::protocol::Payload;
use crate::registry::{Kind, TopicKey};

const TOO_LARGE: &str = "Payload size exceeds tenant limit";

fn unauthorized(status: StatusCode) -> Response {
    json_response(status, json!({"message": "Unauthorized"}))
}

/// `Authorization: Bearer` wins over the `apikey` header, then the `apikey` query parameter.
fn authenticate(
    inner: &Inner,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Option<Claims> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        });
    let token = bearer
        .or_else(|| {
            headers
                .get("apikey")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .or_else(|| query.get("apikey").cloned())?;
    inner.jwt().verify(&token, unix_now()).ok()
}

fn all_headers_json(headers: &HeaderMap) -> String {
    let mut map = Map::new();
    for (name, value) in headers {
        if let Ok(v) = value.to_str() {
            map.insert(name.as_str().to_string(), Value::String(v.to_string()));
        }
    }
    Value::Object(map).to_string()
}

/// Private sends need the write permission of the token on that topic.
async fn may_write(inner: &Inner, subtopic: &str, claims: &Claims, headers_json: &str) -> bool {
    inner
        .authorize(Ask {
            subtopic,
            claims,
            headers_json,
            presence: false,
            purpose: AuthorizationPurpose::Write,
            replay: None,
        })
        .await
        .0
        .is_ok_and(|(a, _)| a.broadcast_write)
}

#[derive(Debug)]
struct BatchMessage {
    topic: String,
    event: String,
    payload: String,
    private: bool,
    id: Option<String>,
}

fn validate(m: &Value, max_payload: usize) -> Result<BatchMessage, Map<String, Value>> {
    let mut errors = Map::new();
    let blank = || json!(["can't be blank"]);
    let Some(obj) = m.as_object() else {
        errors.insert("message".into(), json!(["is invalid"]));
        return Err(errors);
    };
    let string_field = |name: &str, errors: &mut Map<String, Value>| match obj.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None | Some(Value::Null) => {
            errors.insert(name.into(), blank());
            None
        }
        Some(Value::String(_)) => {
            errors.insert(name.into(), blank());
            None
        }
        Some(_) => {
            errors.insert(name.into(), json!(["is invalid"]));
            None
        }
    };
    let topic = string_field("topic", &mut errors);
    let event = string_field("event", &mut errors);
    let payload = match obj.get("payload") {
        Some(p @ Value::Object(_)) => {
            let text = p.to_string();
            if text.len() > max_payload {
                errors.insert("payload".into(), json!([TOO_LARGE]));
                None
            } else {
                Some(text)
            }
        }
        None | Some(Value::Null) => {
            errors.insert("payload".into(), blank());
            None
        }
        Some(_) => {
            errors.insert("payload".into(), json!(["is invalid"]));
            None
        }
    };
    let private = match obj.get("private") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(_) => {
            errors.insert("private".into(), json!(["is invalid"]));
            false
        }
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.insert("id".into(), json!(["is invalid"]));
            None
        }
    };
    match (topic, event, payload) {
        (Some(topic), Some(event), Some(payload)) if errors.is_empty() => Ok(BatchMessage {
            topic,
            event,
            payload,
            private,
            id,
        }),
        _ => Err(errors),
    }
}

pub(crate) async fn batch(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(claims) = authenticate(&inner, &headers, &query) else {
        return unauthorized(StatusCode::UNAUTHORIZED);
    };
    let messages = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut o)) => match o.remove("messages") {
            Some(Value::Array(list)) => list,
            _ => return validation_error(json!({"messages": ["can't be blank"]})),
        },
        _ => return validation_error(json!({"messages": ["can't be blank"]})),
    };
    let max_payload = inner.config().max_payload_bytes;
    let mut valid = Vec::with_capacity(messages.len());
    let mut per_message = Vec::with_capacity(messages.len());
    let mut failed = false;
    for m in &messages {
        match validate(m, max_payload) {
            Ok(v) => {
                valid.push(v);
                per_message.push(json!({}));
            }
            Err(e) => {
                failed = true;
                per_message.push(Value::Object(e));
            }
        }
    }
    if failed {
        return validation_error(json!({"messages": per_message}));
    }
    let headers_json = all_headers_json(&headers);
    // Each private topic is checked once per request, as Supabase groups them by topic.
    let mut write_cache: HashMap<String, bool> = HashMap::new();
    for m in valid {
        if m.private {
            let allowed = match write_cache.get(&m.topic) {
                Some(a) => *a,
                None => {
                    let a = may_write(&inner, &m.topic, &claims, &headers_json).await;
                    write_cache.insert(m.topic.clone(), a);
                    a
                }
            };
            if !allowed {
                // Supabase drops these silently and still answers 202.
                continue;
            }
        }
        let mut obj = format!(
            "{{\"type\":\"broadcast\",\"event\":{},\"payload\":{}",
            crate::protocol::json_string(&m.event),
            m.payload
        );
        if let Some(id) = &m.id {
            obj.push_str(",\"meta\":");
            obj.push_str(std::str::from_utf8(&id_meta(id)).unwrap_or("{}"));
        }
        obj.push('}');
        let key = TopicKey {
            private: m.private,
            subtopic: m.topic.clone(),
        };
        let out = Outgoing::new(
            format!("realtime:{}", m.topic),
            Body::JsonObject(Bytes::from(obj)),
        );
        inner.registry.fanout(&key, &out, None, Kind::Broadcast);
    }
    StatusCode::ACCEPTED.into_response()
}

fn validation_error(errors: Value) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "errors": errors }),
    )
}

pub(crate) async fn single(
    State(inner): State<Arc<Inner>>,
    Path((topic, event)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(claims) = authenticate(&inner, &headers, &query) else {
        return unauthorized(StatusCode::UNAUTHORIZED);
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let payload = match content_type.as_str() {
        "application/json" => {
            if serde_json::from_slice::<&RawValue>(&body).is_err() {
                return validation_error(json!({"payload": ["is invalid"]}));
            }
            Payload::Json(body)
        }
        "application/octet-stream" => Payload::Binary(body),
        _ => {
            return json_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}),
            );
        }
    };
    if topic.is_empty() || event.is_empty() {
        return validation_error(json!({"topic": ["can't be blank"]}));
    }
    if payload.len() > inner.config().max_payload_bytes {
        return validation_error(json!({"payload": [TOO_LARGE]}));
    }
    let private = query
        .get("private")
        .is_some_and(|p| p.eq_ignore_ascii_case("true"));
    if private && !may_write(&inner, &topic, &claims, &all_headers_json(&headers)).await {
        return unauthorized(StatusCode::FORBIDDEN);
    }
    let key = TopicKey {
        private,
        subtopic: topic.clone(),
    };
    let out = Outgoing::new(
        format!("realtime:{topic}"),
        Body::User {
            event,
            payload,
            meta: None,
        },
    );
    inner.registry.fanout(&key, &out, None, Kind::Broadcast);
    StatusCode::ACCEPTED.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages() {
        let ok = validate(
            &json!({"topic":"t","event":"e","payload":{"a":1},"private":"true","id":"x"}),
            100,
        )
        .unwrap();
        assert!(ok.private);
        assert_eq!(ok.id.as_deref(), Some("x"));
        let e = validate(&json!({"event":"","payload":[1]}), 100).unwrap_err();
        assert_eq!(e["topic"], json!(["can't be blank"]));
        assert_eq!(e["event"], json!(["can't be blank"]));
        assert_eq!(e["payload"], json!(["is invalid"]));
        let e = validate(
            &json!({"topic":"t","event":"e","payload":{"a":"0123456789"}}),
            10,
        )
        .unwrap_err();
        assert_eq!(e["payload"], json!([TOO_LARGE]));
    }
}
