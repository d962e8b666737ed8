//! realtime binary frames. Every length prefix is one unsigned byte, every string UTF-8.
//!
//! kind 0 push (client → server; decoded for completeness, realtime-js never sends it):
//!   `0, join_ref_len, ref_len, topic_len, event_len, join_ref, ref, topic, event, payload(JSON)`
//! kind 3 user broadcast push (client → server):
//!   `3, join_ref_len, ref_len, topic_len, event_len, metadata_len, encoding,
//!    join_ref, ref, topic, event, metadata, payload`
//! kind 4 user broadcast (server → client):
//!   `4, topic_len, event_len, metadata_len, encoding, topic, event, metadata, payload`
//! Kinds 1 and 2 (Phoenix replies/broadcasts) are never produced: realtime-js cannot decode them.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use super::{DecodeError, Inbound, InboundPayload, Payload, UserBroadcast};

pub const KIND_PUSH: u8 = 0;
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
pub const KIND_USER_BROADCAST: u8 = 4;
pub const ENCODING_BINARY: u8 = 0;
pub const ENCODING_JSON: u8 = 1;

struct Reader<'a> {
    frame: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self
            .frame
            .get(self.pos)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.frame.len())
            .ok_or(DecodeError::Truncated(what))?;
        let out = self.frame.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    fn string(&mut self, len: usize, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8(what))
    }

    fn rest(&mut self) -> Bytes {
        let out = self.frame.slice(self.pos.min(self.frame.len())..);
        self.pos = self.frame.len();
        out
    }
}

fn opt(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn valid_json(b: &[u8]) -> bool {
    serde_json::from_slice::<&RawValue>(b).is_ok()
}

pub fn decode(frame: &Bytes) -> Result<Inbound, DecodeError> {
    let mut r = Reader { frame, pos: 0 };
    let kind = r.u8("kind").map_err(|_| DecodeError::Empty)?;
    match kind {
        KIND_PUSH => {
            let join_ref_len = r.u8("header")? as usize;
            let ref_len = r.u8("header")? as usize;
            let topic_len = r.u8("header")? as usize;
            let event_len = r.u8("header")? as usize;
            let join_ref = opt(r.string(join_ref_len, "join_ref")?);
            let msg_ref = opt(r.string(ref_len, "ref")?);
            let topic = r.string(topic_len, "topic")?;
            let event = r.string(event_len, "event")?;
            let payload = r.rest();
            let text = std::str::from_utf8(&payload).map_err(|_| DecodeError::Utf8("payload"))?;
            let raw =
                RawValue::from_string(text.to_string()).map_err(|_| DecodeError::PayloadJson)?;
            Ok(Inbound {
                join_ref,
                msg_ref,
                topic,
                event,
                payload: InboundPayload::Json(raw),
            })
        }
        KIND_USER_BROADCAST_PUSH => {
            let join_ref_len = r.u8("header")? as usize;
            let ref_len = r.u8("header")? as usize;
            let topic_len = r.u8("header")? as usize;
            let event_len = r.u8("header")? as usize;
            let metadata_len = r.u8("header")? as usize;
            let encoding = r.u8("header")?;
            let join_ref = opt(r.string(join_ref_len, "join_ref")?);
            let msg_ref = opt(r.string(ref_len, "ref")?);
            let topic = r.string(topic_len, "topic")?;
            let event = r.string(event_len, "user event")?;
            let metadata = r.bytes(metadata_len, "metadata")?;
            let metadata = if metadata.is_empty() {
                None
            } else if valid_json(&metadata) {
                Some(metadata)
            } else {
                return Err(DecodeError::Json("metadata is not valid JSON".into()));
            };
            let body = r.rest();
            let payload = match encoding {
                ENCODING_BINARY => Payload::Binary(body),
                ENCODING_JSON => {
                    if !valid_json(&body) {
                        return Err(DecodeError::PayloadJson);
                    }
                    Payload::Json(body)
                }
                other => return Err(DecodeError::Encoding(other)),
            };
            Ok(Inbound {
                join_ref,
                msg_ref,
                topic,
                event: "broadcast".to_string(),
                payload: InboundPayload::User(UserBroadcast {
                    event,
                    payload,
                    metadata,
                }),
            })
        }
        other => Err(DecodeError::UnsupportedKind(other)),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} is longer than 255 bytes and cannot be put in a binary frame")]
pub struct TooLong(pub &'static str);

fn len_u8(len: usize, what: &'static str) -> Result<u8, TooLong> {
    u8::try_from(len).map_err(|_| TooLong(what))
}

/// Encodes a kind-4 user broadcast.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    metadata: Option<&[u8]>,
    payload: &Payload,
) -> Result<Bytes, TooLong> {
    let metadata = metadata.unwrap_or(&[]);
    let (encoding, body) = match payload {
        Payload::Json(b) => (ENCODING_JSON, b),
        Payload::Binary(b) => (ENCODING_BINARY, b),
    };
    let mut out =
        BytesMut::with_capacity(5 + topic.len() + event.len() + metadata.len() + body.len());
    out.put_u8(KIND_USER_BROADCAST);
    out.put_u8(len_u8(topic.len(), "topic")?);
    out.put_u8(len_u8(event.len(), "event")?);
    out.put_u8(len_u8(metadata.len(), "metadata")?);
    out.put_u8(encoding);
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(metadata);
    out.put_slice(body);
    Ok(out.freeze())
}

/// Encodes a kind-3 frame as realtime-js does (used by tests and tools).
pub fn encode_user_broadcast_push(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    metadata: Option<&[u8]>,
    payload: &Payload,
) -> Result<Bytes, TooLong> {
    let metadata = metadata.unwrap_or(&[]);
    let (encoding, body) = match payload {
        Payload::Json(b) => (ENCODING_JSON, b),
        Payload::Binary(b) => (ENCODING_BINARY, b),
    };
    let mut out = BytesMut::new();
    out.put_u8(KIND_USER_BROADCAST_PUSH);
    out.put_u8(len_u8(join_ref.len(), "join_ref")?);
    out.put_u8(len_u8(msg_ref.len(), "ref")?);
    out.put_u8(len_u8(topic.len(), "topic")?);
    out.put_u8(len_u8(event.len(), "event")?);
    out.put_u8(len_u8(metadata.len(), "metadata")?);
    out.put_u8(encoding);
    out.put_slice(join_ref.as_bytes());
    out.put_slice(msg_ref.as_bytes());
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(metadata);
    out.put_slice(body);
    Ok(out.freeze())
}

/// A decoded kind-4 frame (what realtime-js sees); used by tests.
#[derive(Debug, PartialEq, Eq)]
pub struct UserBroadcastOut {
    pub topic: String,
    pub event: String,
    pub metadata: Option<Bytes>,
    pub payload: Payload,
}

pub fn decode_user_broadcast(frame: &Bytes) -> Result<UserBroadcastOut, DecodeError> {
    let mut r = Reader { frame, pos: 0 };
    match r.u8("kind").map_err(|_| DecodeError::Empty)? {
        KIND_USER_BROADCAST => {}
        other => return Err(DecodeError::UnsupportedKind(other)),
    }
    let topic_len = r.u8("header")? as usize;
    let event_len = r.u8("header")? as usize;
    let metadata_len = r.u8("header")? as usize;
    let encoding = r.u8("header")?;
    let topic = r.string(topic_len, "topic")?;
    let event = r.string(event_len, "user event")?;
    let metadata = r.bytes(metadata_len, "metadata")?;
    let body = r.rest();
    let payload = match encoding {
        ENCODING_BINARY => Payload::Binary(body),
        ENCODING_JSON => Payload::Json(body),
        other => return Err(DecodeError::Encoding(other)),
    };
    Ok(UserBroadcastOut {
        topic,
        event,
        metadata: if metadata.is_empty() {
            None
        } else {
            Some(metadata)
        },
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind3_example() -> Bytes {
        let mut v = vec![0x03, 0x01, 0x02, 0x0F, 0x06, 0x00, 0x01];
        v.extend_from_slice(b"312realtime:room-1cursor{\"x\":1}");
        Bytes::from(v)
    }

    #[test]
    fn decodes_the_kind3_example() {
        let m = decode(&kind3_example()).unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("3"));
        assert_eq!(m.msg_ref.as_deref(), Some("12"));
        assert_eq!(m.topic, "realtime:room-1");
        assert_eq!(m.event, "broadcast");
        match m.payload {
            InboundPayload::User(u) => {
                assert_eq!(u.event, "cursor");
                assert_eq!(u.payload, Payload::Json(Bytes::from_static(b"{\"x\":1}")));
                assert_eq!(u.metadata, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn kind3_round_trip_binary_with_metadata() {
        let payload = Payload::Binary(Bytes::from_static(&[0, 159, 146, 150, 255]));
        let f = encode_user_broadcast_push(
            "1",
            "2",
            "realtime:x",
            "ev",
            Some(b"{\"persist\":true}"),
            &payload,
        )
        .unwrap();
        let m = decode(&f).unwrap();
        let InboundPayload::User(u) = m.payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(u.payload, payload);
        assert_eq!(u.metadata.as_deref(), Some(&b"{\"persist\":true}"[..]));
    }

    #[test]
    fn kind3_empty_refs_are_none() {
        let f = encode_user_broadcast_push(
            "",
            "",
            "realtime:x",
            "e",
            None,
            &Payload::Json("{}".into()),
        )
        .unwrap();
        let m = decode(&f).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref, None);
    }

    #[test]
    fn kind4_matches_the_documented_layout() {
        let f = encode_user_broadcast(
            "realtime:room-1",
            "new",
            Some(b"{\"id\":\"abc\"}"),
            &Payload::Json(Bytes::from_static(b"{\"text\":\"hi\"}")),
        )
        .unwrap();
        assert_eq!(&f[..5], &[4, 15, 3, 12, 1]);
        let d = decode_user_broadcast(&f).unwrap();
        assert_eq!(d.topic, "realtime:room-1");
        assert_eq!(d.event, "new");
        assert_eq!(d.metadata.as_deref(), Some(&b"{\"id\":\"abc\"}"[..]));
        assert_eq!(
            d.payload,
            Payload::Json(Bytes::from_static(b"{\"text\":\"hi\"}"))
        );
    }

    #[test]
    fn kind4_binary_empty_metadata() {
        let f = encode_user_broadcast(
            "t",
            "e",
            None,
            &Payload::Binary(Bytes::from_static(b"\x00\x01")),
        )
        .unwrap();
        assert_eq!(&f[..], &[4, 1, 1, 0, 0, b't', b'e', 0, 1]);
    }

    #[test]
    fn kind4_refuses_long_fields() {
        let long = "x".repeat(256);
        assert_eq!(
            encode_user_broadcast(&long, "e", None, &Payload::Json("{}".into())),
            Err(TooLong("topic"))
        );
        assert!(
            encode_user_broadcast("t", &long[..255], None, &Payload::Json("{}".into())).is_ok()
        );
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_rejected_without_panic() {
        let f = kind3_example();
        // Cutting into the header or strings is an error; cutting only the payload makes it
        // invalid JSON, also an error.
        for cut in 0..f.len() {
            assert!(decode(&f.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn length_prefixes_larger_than_the_frame() {
        let f = Bytes::from_static(&[3, 255, 255, 255, 255, 255, 1, b'a']);
        assert!(matches!(decode(&f), Err(DecodeError::Truncated(_))));
        let f = Bytes::from_static(&[0, 9, 0, 0, 0]);
        assert!(matches!(decode(&f), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn invalid_utf8_and_encodings() {
        let mut v = vec![3, 0, 0, 2, 1, 0, 0];
        v.extend_from_slice(&[0xff, 0xfe, b'e']);
        assert_eq!(
            decode(&Bytes::from(v)).unwrap_err(),
            DecodeError::Utf8("topic")
        );
        let mut v = vec![3, 0, 0, 1, 1, 0, 7];
        v.extend_from_slice(b"te{}");
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::Encoding(7))
        ));
        let mut v = vec![3, 0, 0, 1, 1, 0, 1];
        v.extend_from_slice(b"te{not json");
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::PayloadJson)
        ));
        let mut v = vec![3, 0, 0, 1, 1, 2, 1];
        v.extend_from_slice(b"te{[{}");
        assert!(matches!(decode(&Bytes::from(v)), Err(DecodeError::Json(_))));
    }

    #[test]
    fn unsupported_and_empty() {
        assert_eq!(decode(&Bytes::new()).unwrap_err(), DecodeError::Empty);
        for k in [1u8, 2, 4, 5, 255] {
            assert_eq!(
                decode(&Bytes::from(vec![k, 0, 0])).unwrap_err(),
                DecodeError::UnsupportedKind(k)
            );
        }
    }

    #[test]
    fn kind0_push() {
        let mut v = vec![0, 1, 1, 7, 9];
        v.extend_from_slice(b"12phoenixheartbeat{}");
        let m = decode(&Bytes::from(v)).unwrap();
        assert_eq!(m.topic, "phoenix");
        assert_eq!(m.event, "heartbeat");
        assert_eq!(m.msg_ref.as_deref(), Some("2"));
        assert_eq!(m.json_payload().unwrap().get(), "{}");
    }
}
