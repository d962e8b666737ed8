//! Phoenix text frames: vsn 1.0.0 sends JSON objects, vsn 2.0.0 JSON arrays
//! `[join_ref, ref, topic, event, payload]`. Any vsn other than `1.0.0` is treated as 2.0.0.

use serde_json::{Value, json};

use crate::binary;

/// The first serializer: JSON objects.
pub const V1: &str = "1.0.0";
/// The second serializer: JSON arrays, and binary broadcast frames.
pub const V2: &str = "2.0.0";

/// One message from the client in `vsn`'s serializer.
pub fn encode(
    vsn: &str,
    join_ref: Option<&str>,
    reference: &str,
    topic: &str,
    event: &str,
    payload: Value,
) -> String {
    if vsn == V1 {
        json!({"topic": topic, "event": event, "payload": payload, "ref": reference, "join_ref": join_ref})
            .to_string()
    } else {
        json!([join_ref, reference, topic, event, payload]).to_string()
    }
}

/// One frame from the server, whatever the transport.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Value),
    Binary(Vec<u8>),
    Close,
}

/// A decoded server message (text frames; kind-4 binary frames become `broadcast`).
#[derive(Debug, Clone)]
pub struct Message {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
    /// For kind-4 frames: the user event, the raw payload bytes, whether they are JSON.
    pub binary: Option<(String, Vec<u8>, bool)>,
}

impl Message {
    /// The message in `frame` as a socket of `vsn` reads it; None for a close, a text frame of
    /// the wrong shape, or a binary frame that is not a well-formed kind 4.
    pub fn from_frame(frame: &Frame, vsn: &str) -> Option<Message> {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        match frame {
            Frame::Text(v) if vsn == V1 => Some(Message {
                join_ref: v.get("join_ref").and_then(text),
                reference: v.get("ref").and_then(text),
                topic: v.get("topic").and_then(text)?,
                event: v.get("event").and_then(text)?,
                payload: v.get("payload").cloned().unwrap_or_default(),
                binary: None,
            }),
            Frame::Text(Value::Array(a)) if a.len() >= 5 => Some(Message {
                join_ref: text(&a[0]),
                reference: text(&a[1]),
                topic: text(&a[2])?,
                event: text(&a[3])?,
                payload: a[4].clone(),
                binary: None,
            }),
            Frame::Binary(b) => {
                let m = binary::decode_user_broadcast(b)?;
                let topic = String::from_utf8(m.topic.to_vec()).ok()?;
                let event = String::from_utf8(m.event.to_vec()).ok()?;
                let json = m.encoding == binary::ENCODING_JSON;
                let mut payload = json!({"type": "broadcast", "event": event});
                if json {
                    payload["payload"] = serde_json::from_slice(m.payload).ok()?;
                }
                if !m.meta.is_empty() {
                    payload["meta"] = serde_json::from_slice(m.meta).ok()?;
                }
                Some(Message {
                    join_ref: None,
                    reference: None,
                    topic,
                    event: "broadcast".into(),
                    payload,
                    binary: Some((event, m.payload.to_vec(), json)),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_serializers_round_trip() {
        let payload = json!({"config": {}});
        for vsn in [V1, V2] {
            let text = encode(
                vsn,
                Some("1"),
                "2",
                "realtime:a",
                "phx_join",
                payload.clone(),
            );
            let v: Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(v.is_array(), vsn == V2, "{text}");
            let m = Message::from_frame(&Frame::Text(v), vsn).expect("decodes");
            assert_eq!(m.join_ref.as_deref(), Some("1"));
            assert_eq!(m.reference.as_deref(), Some("2"));
            assert_eq!(
                (m.topic.as_str(), m.event.as_str()),
                ("realtime:a", "phx_join")
            );
            assert_eq!(m.payload, payload);
        }
        assert_eq!(
            encode(V2, None, "hb", "phoenix", "heartbeat", json!({})),
            r#"[null,"hb","phoenix","heartbeat",{}]"#
        );
    }

    #[test]
    fn kind4_frames_become_broadcasts() {
        let mut b = vec![4, 3, 1, 0, 1];
        b.extend_from_slice(b"t:ae{\"x\":1}");
        let m = Message::from_frame(&Frame::Binary(b), V2).expect("decodes");
        assert_eq!((m.topic.as_str(), m.event.as_str()), ("t:a", "broadcast"));
        assert_eq!(
            m.payload,
            json!({"type": "broadcast", "event": "e", "payload": {"x": 1}})
        );
        assert_eq!(m.binary, Some(("e".into(), b"{\"x\":1}".to_vec(), true)));
        assert!(Message::from_frame(&Frame::Binary(vec![4, 200, 0, 0, 1]), V2).is_none());
        assert!(Message::from_frame(&Frame::Close, V2).is_none());
    }
}
