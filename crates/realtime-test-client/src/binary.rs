//! The Supabase binary broadcast frames (realtime-js, vsn 2.0.0).
//!
//! - kind 3, client → server: `kind, join_ref_len, ref_len, topic_len, event_len, meta_len,
//!   encoding`, then join_ref, ref, topic, event, meta, payload;
//! - kind 4, server → client: `kind, topic_len, event_len, meta_len, encoding`, then topic,
//!   event, meta, payload.
//!
//! Lengths are one byte each; encoding 0 is raw bytes, 1 is JSON.

/// A user broadcast pushed by a client.
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
/// A user broadcast delivered to a client.
pub const KIND_USER_BROADCAST: u8 = 4;
/// The payload is raw bytes.
pub const ENCODING_BINARY: u8 = 0;
/// The payload is JSON.
pub const ENCODING_JSON: u8 = 1;

/// A kind-3 frame as realtime-js builds it (no metadata). Lengths are truncated to one byte as
/// they are on the wire, so callers can build frames that lie about them.
pub fn user_broadcast_push(
    join_ref: &str,
    reference: &str,
    topic: &str,
    event: &str,
    payload: &[u8],
    json: bool,
) -> Vec<u8> {
    user_broadcast_push_with_meta(join_ref, reference, topic, event, b"", payload, json)
}

/// A kind-3 frame carrying `meta`, as realtime-js sends `send({..., persist})`:
/// `{"persist":true}` or `{"persist":{"ttl":N}}`. Empty `meta` is [`user_broadcast_push`].
pub fn user_broadcast_push_with_meta(
    join_ref: &str,
    reference: &str,
    topic: &str,
    event: &str,
    meta: &[u8],
    payload: &[u8],
    json: bool,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(
        7 + join_ref.len()
            + reference.len()
            + topic.len()
            + event.len()
            + meta.len()
            + payload.len(),
    );
    f.extend_from_slice(&[
        KIND_USER_BROADCAST_PUSH,
        join_ref.len() as u8,
        reference.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        if json { ENCODING_JSON } else { ENCODING_BINARY },
    ]);
    for s in [join_ref, reference, topic, event] {
        f.extend_from_slice(s.as_bytes());
    }
    f.extend_from_slice(meta);
    f.extend_from_slice(payload);
    f
}

/// The parts of a kind-4 frame, borrowed from it (nothing is checked beyond the lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserBroadcast<'a> {
    pub topic: &'a [u8],
    pub event: &'a [u8],
    pub meta: &'a [u8],
    pub encoding: u8,
    pub payload: &'a [u8],
}

/// Splits a kind-4 frame; None if it is another kind or shorter than its lengths say.
pub fn decode_user_broadcast(b: &[u8]) -> Option<UserBroadcast<'_>> {
    if b.first() != Some(&KIND_USER_BROADCAST) {
        return None;
    }
    let header = b.get(1..5)?;
    let (topic_len, event_len, meta_len) =
        (header[0] as usize, header[1] as usize, header[2] as usize);
    let mut at = 5;
    let mut take = |n: usize| {
        let s = b.get(at..at + n);
        at += n;
        s
    };
    let topic = take(topic_len)?;
    let event = take(event_len)?;
    let meta = take(meta_len)?;
    Some(UserBroadcast {
        topic,
        event,
        meta,
        encoding: header[3],
        payload: b.get(at..)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind3_layout() {
        let f = user_broadcast_push("1", "22", "realtime:t", "ev", b"{}", true);
        assert_eq!(f[..7], [3, 1, 2, 10, 2, 0, 1]);
        assert_eq!(&f[7..], b"122realtime:tev{}");
        assert_eq!(
            user_broadcast_push("", "", "", "", b"\x00", false),
            [3, 0, 0, 0, 0, 0, 0, 0]
        );
        let m = user_broadcast_push_with_meta(
            "1",
            "2",
            "realtime:t",
            "e",
            br#"{"persist":true}"#,
            b"{}",
            true,
        );
        assert_eq!(m[..7], [3, 1, 1, 10, 1, 16, 1]);
        assert_eq!(&m[7..], br#"12realtime:te{"persist":true}{}"#);
    }

    #[test]
    fn kind4_split() {
        let mut b = vec![4, 10, 1, 2, 0];
        b.extend_from_slice(b"realtime:ae{}\x01\x02");
        let m = decode_user_broadcast(&b).expect("well-formed");
        assert_eq!(
            (m.topic, m.event, m.meta, m.encoding, m.payload),
            (&b"realtime:a"[..], &b"e"[..], &b"{}"[..], 0, &[1u8, 2][..])
        );
        assert_eq!(decode_user_broadcast(&[4, 200]), None);
        assert_eq!(decode_user_broadcast(&[4, 200, 0, 0, 1]), None);
        assert_eq!(decode_user_broadcast(&[3, 0, 0, 0, 1]), None);
        assert_eq!(
            decode_user_broadcast(&[4, 0, 0, 0, 1]).map(|m| m.payload),
            Some(&[][..])
        );
    }
}
