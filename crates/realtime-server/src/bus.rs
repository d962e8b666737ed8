//! The bus between nodes: what one node tells the others, encoded as one [`Envelope`] per batch.
//!
//! Envelopes travel through PostgreSQL itself. A standby hands its envelopes to the primary
//! (`realtime._node_relay`, see [`link`]); the primary's worker writes every envelope — its own,
//! the relayed ones and the committed database messages, in delivery order — into the WAL as
//! a logical message, and each standby's worker reads them back from its own copy of the WAL.
//! So every node sees the same envelopes in the same order, and a standby that loses the
//! primary for a while resumes where its WAL left off.
//!
//! This module is the encoding and the per-node bookkeeping; [`crate::broker::replicated`]
//! applies envelopes to the local subscribers.

pub mod link;

use serde::{Deserialize, Serialize};

/// The prefix of the WAL logical messages that carry envelopes.
pub const WAL_PREFIX: &str = "pg_realtime";

/// One node's frames, in the order it produced them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending node's id, chosen at random when its worker starts: a restarted node is a
    /// new node, whose predecessor's presence expires with its lease.
    pub node: u64,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// A committed database message (only the primary sends these).
    Database {
        topic: String,
        private: bool,
        event: String,
        id: String,
        binary: bool,
        payload: Vec<u8>,
        offset: Option<crate::offset::Offset>,
    },
    /// A client broadcast (WebSocket or REST) made on the sending node.
    Broadcast {
        topic: String,
        private: bool,
        body: BroadcastBody,
    },
    /// A member tracked (or its meta updated) on the sending node. `owner` is the sending
    /// node's id for the channel that tracks.
    Track {
        topic: String,
        private: bool,
        owner: u64,
        key: String,
        meta: String,
    },
    Untrack {
        topic: String,
        private: bool,
        owner: u64,
    },
    /// The sending node has just started (or reconnected): every other node sends its members
    /// again, so the newcomer sees them.
    Hello { name: String },
    /// The sending node is alive; its members stay for another lease.
    Heartbeat { name: String },
    /// The SQL-tracked presence of a topic changed on the primary: re-read it.
    SqlPresence { topic: String, private: bool },
}

/// A client broadcast's body, as the sending node's socket or REST endpoint received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastBody {
    /// The complete JSON broadcast object, forwarded verbatim.
    JsonObject(Vec<u8>),
    /// A user broadcast: event, payload (JSON text or binary) and optional meta JSON.
    User {
        event: String,
        binary: bool,
        payload: Vec<u8>,
        meta: Option<Vec<u8>>,
    },
}

/// Why bytes are not an envelope.
#[derive(Debug, thiserror::Error)]
#[error("not a pg_realtime bus envelope: {0}")]
pub struct DecodeError(#[from] postcard::Error);

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain owned data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_garbage_is_refused() {
        let e = Envelope {
            node: 7,
            frames: vec![
                Frame::Database {
                    topic: "room".into(),
                    private: true,
                    event: "INSERT".into(),
                    id: "0b6f".into(),
                    binary: false,
                    payload: br#"{"a":1}"#.to_vec(),
                    offset: Some(crate::offset::Offset::new(0x1_0000_0028, 3)),
                },
                Frame::Broadcast {
                    topic: "room".into(),
                    private: false,
                    body: BroadcastBody::User {
                        event: "e".into(),
                        binary: true,
                        payload: vec![0, 1, 2],
                        meta: None,
                    },
                },
                Frame::Track {
                    topic: "room".into(),
                    private: false,
                    owner: 3,
                    key: "k".into(),
                    meta: "{}".into(),
                },
                Frame::Hello { name: "a".into() },
            ],
        };
        assert_eq!(Envelope::decode(&e.encode()).expect("decodes"), e);
        assert!(Envelope::decode(b"\xff\xff\xff").is_err());
        assert!(Envelope::decode(&[]).is_err());
    }
}
