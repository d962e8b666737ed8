//! REST broadcast endpoints: `POST /api/broadcast` (a batch of JSON messages) and
//! `POST /api/broadcast/{topic}/events/{event}` (one message, JSON or binary).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::Inner;
use crate::authz::Ask;
use crate::broadcast::{Body, Outgoing, id_meta, json_object};
use crate::events::AuthorizationPurpose;
use crate::http::json_response;
use crate::jwt::{Claims, unix_now};
use crate::metrics::Source;
use crate::protocol::Payload;
use crate::refusal::{FieldError, HttpRefusal, PersistError};
use crate::topic::{self, MAX_SUBTOPIC_BYTES, TopicKey};

/// `{"message": <refusal>}` with `status`.
fn refused(status: StatusCode, refusal: HttpRefusal) -> Response {
    json_response(status, json!({"message": refusal.to_string()}))
}

/// A field's errors as the 422 answer lists them.
/// A REST broadcast with `persist` that was not stored.
fn persist_refused(e: PersistError) -> Response {
    let status = match e {
        PersistError::PublicChannel | PersistError::Malformed | PersistError::BadTtl { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        PersistError::Denied { .. } | PersistError::Policy(_) => StatusCode::FORBIDDEN,
        PersistError::TooManyWaiting => StatusCode::TOO_MANY_REQUESTS,
        PersistError::Standby | PersistError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        PersistError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        PersistError::StoreFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(status, json!({"message": e.to_string()}))
}

fn field_errors(e: FieldError) -> Value {
    json!([e.to_string()])
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
            private: true,
            subscribe: None,
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

/// One element of `messages`, its fields kept as raw JSON so each is judged on its own (and
/// nothing is built for the parts of a body that are never used).
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    private: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// After this many invalid messages the rest are not looked at: the answer stays small.
const MAX_REPORTED_ERRORS: usize = 10;

fn validate(m: &RawValue, max_payload: usize) -> Result<BatchMessage, Map<String, Value>> {
    let mut errors = Map::new();
    let blank = || field_errors(FieldError::Blank);
    let invalid = || field_errors(FieldError::Invalid);
    let Ok(fields) = serde_json::from_str::<RawMessage<'_>>(m.get()) else {
        errors.insert("message".into(), invalid());
        return Err(errors);
    };
    let string_field = |name: &str, raw: Option<&RawValue>, errors: &mut Map<String, Value>| {
        let raw = raw?;
        match serde_json::from_str::<String>(raw.get()) {
            Ok(s) if !s.is_empty() => Some(s),
            Ok(_) => {
                errors.insert(name.into(), blank());
                None
            }
            Err(_) => {
                errors.insert(name.into(), invalid());
                None
            }
        }
    };
    let required = |name: &str, raw: Option<&RawValue>, errors: &mut Map<String, Value>| {
        if raw.is_none() {
            errors.insert(name.into(), blank());
        }
        string_field(name, raw, errors)
    };
    let mut topic = required("topic", fields.topic, &mut errors);
    if topic.as_ref().is_some_and(|t| t.len() > MAX_SUBTOPIC_BYTES) {
        errors.insert("topic".into(), field_errors(FieldError::TopicTooLong));
        topic = None;
    }
    let event = required("event", fields.event, &mut errors);
    let payload = match fields.payload {
        Some(p) if p.get().starts_with('{') => {
            if p.get().len() > max_payload {
                errors.insert("payload".into(), field_errors(FieldError::PayloadTooLarge));
                None
            } else {
                Some(p.get().to_string())
            }
        }
        None => {
            errors.insert("payload".into(), blank());
            None
        }
        Some(_) => {
            errors.insert("payload".into(), invalid());
            None
        }
    };
    let private = match fields.private {
        None => false,
        Some(raw) => match (
            serde_json::from_str::<bool>(raw.get()),
            serde_json::from_str::<String>(raw.get()),
        ) {
            (Ok(b), _) => b,
            (_, Ok(s)) if s.eq_ignore_ascii_case("true") => true,
            (_, Ok(s)) if s.eq_ignore_ascii_case("false") => false,
            _ => {
                errors.insert("private".into(), invalid());
                false
            }
        },
    };
    let id = match fields.id {
        None => None,
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(s) => Some(s),
            Err(_) => {
                errors.insert("id".into(), invalid());
                None
            }
        },
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

/// What the body's `messages` turned out to be.
enum Messages<'a> {
    List(Vec<&'a RawValue>),
    /// Absent, or not an array (or the body is not an object).
    Missing,
    /// More than the configured maximum: parsing stopped there.
    TooMany,
}

/// Reads a batch body without building a tree of it: `messages` becomes a list of raw
/// elements, at most `max` of them, and every other key is skipped.
fn parse_batch(body: &[u8], max: usize) -> Messages<'_> {
    use serde::de::{DeserializeSeed, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;

    struct List<'c> {
        max: usize,
        too_many: &'c Cell<bool>,
    }
    impl<'de> Visitor<'de> for List<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(m) = seq.next_element::<&'de RawValue>()? {
                if out.len() == self.max {
                    self.too_many.set(true);
                    return Err(A::Error::custom("too many messages"));
                }
                out.push(m);
            }
            Ok(out)
        }
    }
    impl<'de> DeserializeSeed<'de> for List<'_> {
        type Value = Vec<&'de RawValue>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    struct Body<'c> {
        max: usize,
        too_many: &'c Cell<bool>,
    }
    impl<'de> Visitor<'de> for Body<'_> {
        type Value = Option<Vec<&'de RawValue>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut messages = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == "messages" {
                    messages = Some(map.next_value_seed(List {
                        max: self.max,
                        too_many: self.too_many,
                    })?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(messages)
        }
    }

    let too_many = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde::Deserializer::deserialize_map(
        &mut de,
        Body {
            max,
            too_many: &too_many,
        },
    )
    .and_then(|m| de.end().map(|()| m));
    match parsed {
        _ if too_many.get() => Messages::TooMany,
        Ok(Some(list)) => Messages::List(list),
        _ => Messages::Missing,
    }
}

/// Bytes of REST bodies that may be read and answered at once, counted by their declared
/// `Content-Length` (a body without one counts as the body limit). A handler reads its whole
/// body before it runs, so this bounds what parallel requests make the worker hold, whoever
/// sends them; small requests are not held up by a few large ones.
pub(crate) const REST_BODY_BUDGET: usize = 64 * 1024 * 1024;
/// How long a request waits for room in the budget before it is answered 429.
const REST_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a request may take to send its body and be answered: a client that announces a
/// body and stalls gives its share of the budget back with a 408.
const REST_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The budget's semaphore counts KiB.
pub(crate) fn body_budget() -> tokio::sync::Semaphore {
    tokio::sync::Semaphore::new(REST_BODY_BUDGET / 1024)
}

/// Bytes of the budget in use.
pub(crate) fn body_budget_used(budget: &tokio::sync::Semaphore) -> usize {
    (REST_BODY_BUDGET / 1024).saturating_sub(budget.available_permits()) * 1024
}

/// Runs the request within [`REST_BODY_BUDGET`] and [`REST_ANSWER_TIMEOUT`], or answers 429 or
/// 408.
pub(crate) async fn within_budget(
    State(inner): State<Arc<Inner>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = inner.max_frame_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(limit)
        .min(limit);
    let kib = u32::try_from(declared.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let Ok(Ok(_share)) =
        tokio::time::timeout(REST_BUDGET_WAIT, inner.rest_budget.acquire_many(kib)).await
    else {
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            HttpRefusal::TooManyConcurrentRequests,
        );
    };
    match tokio::time::timeout(REST_ANSWER_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => refused(StatusCode::REQUEST_TIMEOUT, HttpRefusal::BodyTimeout),
    }
}

pub(crate) async fn batch(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(claims) = authenticate(&inner, &headers, &query) else {
        return refused(StatusCode::UNAUTHORIZED, HttpRefusal::Unauthorized);
    };
    let cfg = inner.config();
    let max_messages = cfg.max_batch_messages.max(1);
    let messages = match parse_batch(&body, max_messages) {
        Messages::List(list) => list,
        Messages::Missing => {
            return validation_error(json!({"messages": field_errors(FieldError::Blank)}));
        }
        Messages::TooMany => {
            let too_many = FieldError::TooManyItems(max_messages);
            return validation_error(json!({"messages": field_errors(too_many)}));
        }
    };
    let max_payload = cfg.max_payload_bytes;
    let mut valid = Vec::with_capacity(messages.len());
    let mut per_message = Vec::new();
    let mut failures = 0;
    for m in &messages {
        match validate(m, max_payload) {
            Ok(v) => {
                valid.push(v);
                per_message.push(json!({}));
            }
            Err(e) => {
                failures += 1;
                per_message.push(Value::Object(e));
                if failures == MAX_REPORTED_ERRORS {
                    break;
                }
            }
        }
    }
    if failures > 0 {
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
        let meta = m.id.as_deref().map(id_meta);
        let payload = Payload::Json(Bytes::from(m.payload));
        // Always Some: the payload is JSON text.
        let Some(obj) = json_object(&m.event, &payload, meta.as_deref()) else {
            continue;
        };
        let out = Outgoing::new(topic::full(&m.topic), Body::JsonObject(Bytes::from(obj)));
        let key = TopicKey {
            private: m.private,
            subtopic: m.topic,
        };
        inner.broker.publish(&key, &out, None);
        inner.metrics.messages_in(Source::Rest, 1);
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
        return refused(StatusCode::UNAUTHORIZED, HttpRefusal::Unauthorized);
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
                return validation_error(json!({"payload": field_errors(FieldError::Invalid)}));
            }
            Payload::Json(body)
        }
        "application/octet-stream" => Payload::Binary(body),
        _ => {
            let refusal = HttpRefusal::UnsupportedMediaType;
            return json_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": refusal.to_string()}),
            );
        }
    };
    if topic.is_empty() || event.is_empty() {
        return validation_error(json!({"topic": field_errors(FieldError::Blank)}));
    }
    if topic.len() > MAX_SUBTOPIC_BYTES {
        return validation_error(json!({"topic": field_errors(FieldError::TopicTooLong)}));
    }
    if payload.len() > inner.config().max_payload_bytes {
        return validation_error(json!({"payload": field_errors(FieldError::PayloadTooLarge)}));
    }
    let private = query
        .get("private")
        .is_some_and(|p| p.eq_ignore_ascii_case("true"));
    let persist = match crate::persist::from_query(&query, inner.config().max_persist_ttl.as_secs())
    {
        Ok(p) => p,
        Err(e) => return persist_refused(e),
    };
    if persist.is_some() && !private {
        return persist_refused(PersistError::PublicChannel);
    }
    let headers_json = all_headers_json(&headers);
    if private && !may_write(&inner, &topic, &claims, &headers_json).await {
        return refused(StatusCode::FORBIDDEN, HttpRefusal::Unauthorized);
    }
    if let Some(ttl) = persist {
        // Stored before the answer; delivered, like any database message, once committed.
        let stored = inner
            .persist(crate::persist::Ask {
                subtopic: &topic,
                claims: &claims,
                headers_json: &headers_json,
                check: true,
                event,
                payload,
                ttl,
                exclude: None,
            })
            .await;
        inner.metrics.messages_in(Source::Rest, 1);
        return match stored {
            Ok(id) => json_response(StatusCode::ACCEPTED, json!({ "id": id })),
            Err(e) => persist_refused(e),
        };
    }
    let out = Outgoing::new(
        topic::full(&topic),
        Body::User {
            event,
            payload,
            meta: None,
        },
    );
    let key = TopicKey {
        private,
        subtopic: topic,
    };
    inner.broker.publish(&key, &out, None);
    inner.metrics.messages_in(Source::Rest, 1);
    StatusCode::ACCEPTED.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOO_LARGE: &str = "Payload size exceeds tenant limit";

    fn check(v: Value, max: usize) -> Result<BatchMessage, Map<String, Value>> {
        validate(&RawValue::from_string(v.to_string()).unwrap(), max)
    }

    #[test]
    fn validation_messages() {
        let ok = check(
            json!({"topic":"t","event":"e","payload":{"a":1},"private":"true","id":"x"}),
            100,
        )
        .unwrap();
        assert!(ok.private);
        assert_eq!(ok.id.as_deref(), Some("x"));
        assert_eq!(ok.payload, r#"{"a":1}"#);
        let e = check(json!({"event":"","payload":[1]}), 100).unwrap_err();
        assert_eq!(e["topic"], json!(["can't be blank"]));
        assert_eq!(e["event"], json!(["can't be blank"]));
        assert_eq!(e["payload"], json!(["is invalid"]));
        let e = check(
            json!({"topic":"t","event":"e","payload":{"a":"0123456789"}}),
            10,
        )
        .unwrap_err();
        assert_eq!(e["payload"], json!([TOO_LARGE]));
        let e = check(
            json!({"topic":null,"event":5,"payload":null,"private":[]}),
            10,
        )
        .unwrap_err();
        assert_eq!(e["topic"], json!(["can't be blank"]));
        assert_eq!(e["event"], json!(["is invalid"]));
        assert_eq!(e["payload"], json!(["can't be blank"]));
        assert_eq!(e["private"], json!(["is invalid"]));
        assert_eq!(
            check(json!(1), 10).unwrap_err()["message"],
            json!(["is invalid"])
        );
    }

    #[test]
    fn batch_bodies_are_read_with_a_bound() {
        assert!(matches!(
            parse_batch(br#"{"x":[1,{"a":2}],"messages":[1,{}]}"#, 2),
            Messages::List(l) if l.len() == 2
        ));
        assert!(matches!(
            parse_batch(br#"{"messages":[1,2,3]}"#, 2),
            Messages::TooMany
        ));
        for bad in [
            &b"[]"[..],
            b"{}",
            br#"{"messages":{}}"#,
            b"{",
            br#"{"messages":[]} x"#,
        ] {
            assert!(matches!(parse_batch(bad, 2), Messages::Missing));
        }
    }
}
