//! The encoding of one broadcast message inside a ring entry.
//!
//! Layout: flags (1 byte: bit 0 private, bit 1 binary payload), the row's `inserted_at` (8
//! bytes), then topic, event and id, each as a u32 length and UTF-8 bytes, then the payload
//! (the rest). JSON payloads are stored as their text so the worker can forward them without
//! parsing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Json,
    Binary,
    /// Not a broadcast: the SQL-tracked presence of (topic, private) changed and must be
    /// re-read once the transaction is visible. Carries no payload.
    PresenceSync,
    /// Not a broadcast: a bus envelope a standby handed to the primary
    /// (`realtime._node_relay`); the payload is the encoded envelope.
    Relay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub event: &'a str,
    pub id: &'a str,
    /// The row's `inserted_at` (PostgreSQL's microseconds since 2000-01-01), its partition
    /// key: with `id` it finds the row again (0 when there is no row).
    pub inserted_at: i64,
    pub private: bool,
    pub kind: PayloadKind,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    NotUtf8,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("queued message is truncated"),
            DecodeError::NotUtf8 => f.write_str("queued message has a field that is not UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

const PRIVATE: u8 = 1;
const BINARY: u8 = 2;
const PRESENCE_SYNC: u8 = 4;
const RELAY: u8 = 8;

impl<'a> Message<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            1 + 8 + 12 + self.topic.len() + self.event.len() + self.id.len() + self.payload.len(),
        );
        let mut flags = 0;
        if self.private {
            flags |= PRIVATE;
        }
        match self.kind {
            PayloadKind::Json => {}
            PayloadKind::Binary => flags |= BINARY,
            PayloadKind::PresenceSync => flags |= PRESENCE_SYNC,
            PayloadKind::Relay => flags |= RELAY,
        }
        out.push(flags);
        out.extend_from_slice(&self.inserted_at.to_le_bytes());
        for field in [self.topic, self.event, self.id] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(self.payload);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let (&flags, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        if rest.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        let (inserted_at, mut rest) = rest.split_at(8);
        let mut at = [0u8; 8];
        at.copy_from_slice(inserted_at);
        let mut fields = [""; 3];
        for field in &mut fields {
            if rest.len() < 4 {
                return Err(DecodeError::Truncated);
            }
            let (len, after) = rest.split_at(4);
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if after.len() < len {
                return Err(DecodeError::Truncated);
            }
            let (text, after) = after.split_at(len);
            *field = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8)?;
            rest = after;
        }
        Ok(Message {
            topic: fields[0],
            event: fields[1],
            id: fields[2],
            inserted_at: i64::from_le_bytes(at),
            private: flags & PRIVATE != 0,
            kind: if flags & RELAY != 0 {
                PayloadKind::Relay
            } else if flags & PRESENCE_SYNC != 0 {
                PayloadKind::PresenceSync
            } else if flags & BINARY != 0 {
                PayloadKind::Binary
            } else {
                PayloadKind::Json
            },
            payload: rest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = Message {
            topic: "room:1",
            event: "INSERT",
            id: "5f0c7d3e-0000-4000-8000-000000000000",
            inserted_at: 851_043_723_000_001,
            private: true,
            kind: PayloadKind::Json,
            payload: br#"{"a":1}"#,
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        let b = Message {
            private: false,
            kind: PayloadKind::Binary,
            payload: &[0, 255, 1],
            ..m.clone()
        };
        assert_eq!(Message::decode(&b.encode()).unwrap(), b);
        let p = Message {
            event: "",
            id: "",
            kind: PayloadKind::PresenceSync,
            payload: &[],
            ..m.clone()
        };
        assert_eq!(Message::decode(&p.encode()).unwrap(), p);
        let r = Message {
            kind: PayloadKind::Relay,
            payload: &[1, 2, 3],
            ..p.clone()
        };
        assert_eq!(Message::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn rejects_truncated_and_bad_utf8() {
        let m = Message {
            topic: "t",
            event: "e",
            id: "i",
            inserted_at: -1,
            private: false,
            kind: PayloadKind::Json,
            payload: b"{}",
        };
        let bytes = m.encode();
        for cut in 0..bytes.len() - 2 {
            assert_eq!(
                Message::decode(&bytes[..cut]),
                Err(DecodeError::Truncated),
                "cut {cut}"
            );
        }
        let mut bad = bytes.clone();
        // The topic's one byte: after the flags, inserted_at and its length.
        bad[13] = 0xff;
        assert_eq!(Message::decode(&bad), Err(DecodeError::NotUtf8));
    }
}
