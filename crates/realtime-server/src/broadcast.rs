//! A broadcast on its way to subscribers, encoded lazily and at most once per wire format so
//! every subscriber of that format shares the same `Bytes`.

use std::sync::OnceLock;

use bytes::Bytes;
use tungstenite::Utf8Bytes;

use crate::protocol::{self, Payload, Vsn, binary};

/// What is being broadcast.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// From a JSON text push or the REST batch endpoint: the complete broadcast payload object
    /// (`{"type":"broadcast","event":..,"payload":..}`), forwarded verbatim as text.
    JsonObject(Bytes),
    /// A "user broadcast" (kind-3 push, REST single endpoint, database): V2 subscribers get a
    /// kind-4 frame, V1 subscribers the JSON object form (binary payloads are dropped for V1).
    User {
        event: String,
        payload: Payload,
        meta: Option<Bytes>,
    },
    /// Any other server push to every subscriber (e.g. `presence_diff`): JSON text.
    Event { event: &'static str, payload: Bytes },
}

#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

pub(crate) struct Outgoing {
    topic: String,
    body: Body,
    /// The `realtime.messages` id of a database message (for replay de-duplication).
    origin_id: Option<String>,
    v1: OnceLock<Option<Frame>>,
    v2: OnceLock<Option<Frame>>,
}

impl Outgoing {
    /// `topic` is the full topic subscribers joined (`realtime:<sub-topic>`).
    pub(crate) fn new(topic: String, body: Body) -> Self {
        Outgoing {
            topic,
            body,
            origin_id: None,
            v1: OnceLock::new(),
            v2: OnceLock::new(),
        }
    }

    /// Marks a database message with its row id.
    pub(crate) fn with_origin_id(mut self, id: String) -> Self {
        self.origin_id = Some(id);
        self
    }

    pub(crate) fn body(&self) -> &Body {
        &self.body
    }

    pub(crate) fn origin_id(&self) -> Option<&str> {
        self.origin_id.as_deref()
    }

    /// The frame for a subscriber speaking `vsn`, or None when that format cannot carry it.
    pub(crate) fn frame(&self, vsn: Vsn) -> Option<Frame> {
        let cell = match vsn {
            Vsn::V1 => &self.v1,
            Vsn::V2 => &self.v2,
        };
        cell.get_or_init(|| self.encode(vsn)).clone()
    }

    fn encode(&self, vsn: Vsn) -> Option<Frame> {
        let text_event = |event: &str, payload: &str| {
            Some(Frame::Text(Utf8Bytes::from(protocol::encode_text(
                vsn,
                None,
                None,
                &self.topic,
                event,
                payload,
            ))))
        };
        let text = |payload: &str| text_event("broadcast", payload);
        match (&self.body, vsn) {
            (Body::Event { event, payload }, _) => {
                text_event(event, std::str::from_utf8(payload).ok()?)
            }
            (Body::JsonObject(obj), _) => text(std::str::from_utf8(obj).ok()?),
            (
                Body::User {
                    event,
                    payload,
                    meta,
                },
                Vsn::V2,
            ) => {
                match binary::encode_user_broadcast(&self.topic, event, meta.as_deref(), payload) {
                    Ok(frame) => Some(Frame::Binary(frame)),
                    // Fields too long for a binary frame: JSON still works for JSON payloads.
                    Err(_) => json_object(event, payload, meta.as_deref()).and_then(|o| text(&o)),
                }
            }
            (
                Body::User {
                    event,
                    payload,
                    meta,
                },
                Vsn::V1,
            ) => json_object(event, payload, meta.as_deref()).and_then(|o| text(&o)),
        }
    }
}

/// `{"type":"broadcast","event":E,"payload":P[,"meta":M]}`, or None for binary payloads.
pub(crate) fn json_object(event: &str, payload: &Payload, meta: Option<&[u8]>) -> Option<String> {
    let Payload::Json(p) = payload else {
        return None;
    };
    let p = std::str::from_utf8(p).ok()?;
    let mut out = format!(
        "{{\"type\":\"broadcast\",\"event\":{},\"payload\":{}",
        protocol::json_string(event),
        p
    );
    if let Some(m) = meta.and_then(|m| std::str::from_utf8(m).ok()) {
        out.push_str(",\"meta\":");
        out.push_str(m);
    }
    out.push('}');
    Some(out)
}

/// `{"id":"<id>"}` for `meta`/kind-4 metadata of database and REST messages.
pub(crate) fn id_meta(id: &str) -> Bytes {
    Bytes::from(format!("{{\"id\":{}}}", protocol::json_string(id)))
}

/// `{"id":"<id>","offset":"<offset>"}` for a stored message (only the id when its offset is
/// unknown).
pub(crate) fn stored_meta(id: &str, offset: Option<crate::offset::Offset>) -> Bytes {
    match offset {
        Some(offset) => Bytes::from(format!(
            "{{\"id\":{},\"offset\":\"{offset}\"}}",
            protocol::json_string(id)
        )),
        None => id_meta(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn text(f: Option<Frame>) -> Value {
        match f {
            Some(Frame::Text(t)) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn json_object_body_goes_as_text_to_both() {
        let o = Outgoing::new(
            "realtime:r".into(),
            Body::JsonObject(Bytes::from_static(
                br#"{"type":"broadcast","event":"e","payload":{"x":1}}"#,
            )),
        );
        assert_eq!(
            text(o.frame(Vsn::V2)),
            json!([null, null, "realtime:r", "broadcast", {"type":"broadcast","event":"e","payload":{"x":1}}])
        );
        assert_eq!(
            text(o.frame(Vsn::V1)),
            json!({"topic":"realtime:r","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"x":1}},"ref":null})
        );
    }

    #[test]
    fn user_body_is_kind4_for_v2_and_json_for_v1() {
        let o = Outgoing::new(
            "realtime:r".into(),
            Body::User {
                event: "new".into(),
                payload: Payload::Json(Bytes::from_static(b"{\"a\":true}")),
                meta: Some(id_meta("u-1")),
            },
        );
        let Some(Frame::Binary(b)) = o.frame(Vsn::V2) else {
            panic!("expected binary")
        };
        let d = binary::decode_user_broadcast(&b).unwrap();
        assert_eq!(d.event, "new");
        assert_eq!(d.metadata.as_deref(), Some(&b"{\"id\":\"u-1\"}"[..]));
        assert_eq!(
            text(o.frame(Vsn::V1))["payload"],
            json!({"type":"broadcast","event":"new","payload":{"a":true},"meta":{"id":"u-1"}})
        );
    }

    #[test]
    fn binary_payload_is_dropped_for_v1() {
        let o = Outgoing::new(
            "realtime:r".into(),
            Body::User {
                event: "b".into(),
                payload: Payload::Binary(Bytes::from_static(&[1, 2, 3])),
                meta: None,
            },
        );
        assert!(o.frame(Vsn::V1).is_none());
        assert!(matches!(o.frame(Vsn::V2), Some(Frame::Binary(_))));
    }

    #[test]
    fn encodes_once_and_shares_bytes() {
        let o = Outgoing::new(
            "realtime:r".into(),
            Body::User {
                event: "b".into(),
                payload: Payload::Binary(Bytes::from_static(&[9; 64])),
                meta: None,
            },
        );
        let (Some(Frame::Binary(a)), Some(Frame::Binary(b))) = (o.frame(Vsn::V2), o.frame(Vsn::V2))
        else {
            panic!()
        };
        assert_eq!(a.as_ptr(), b.as_ptr());
    }

    #[test]
    fn long_topic_falls_back_to_text_for_json() {
        let topic = format!("realtime:{}", "x".repeat(300));
        let o = Outgoing::new(
            topic.clone(),
            Body::User {
                event: "e".into(),
                payload: Payload::Json(Bytes::from_static(b"1")),
                meta: None,
            },
        );
        assert_eq!(text(o.frame(Vsn::V2))[2], json!(topic));
    }
}
