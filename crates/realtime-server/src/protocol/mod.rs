//! Phoenix wire formats spoken by realtime-js: vsn 1.0.0 JSON objects, vsn 2.0.0 JSON arrays and
//! the realtime binary kinds 3 (client user broadcast) and 4 (server user broadcast).
//! Decoders never panic: a frame they cannot understand becomes a [`DecodeError`] that the
//! connection logs and ignores.

pub mod binary;
pub mod v1;
pub mod v2;

use bytes::Bytes;
use serde_json::value::RawValue;

/// Serializer version chosen with the `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    /// Absent means 1.0.0 (Phoenix's server default); realtime-js sends 2.0.0.
    pub fn parse(param: Option<&str>) -> Option<Vsn> {
        match param {
            None | Some("1.0.0") => Some(Vsn::V1),
            Some("2.0.0") => Some(Vsn::V2),
            Some(_) => None,
        }
    }
}

/// A user payload as carried by binary frames and database messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// JSON text, forwarded without re-parsing where possible.
    Json(Bytes),
    Binary(Bytes),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(b) | Payload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &Bytes {
        match self {
            Payload::Json(b) | Payload::Binary(b) => b,
        }
    }
}

/// A client user broadcast decoded from a kind-3 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserBroadcast {
    pub event: String,
    pub payload: Payload,
    /// Metadata JSON object text (realtime-js only sends whitelisted keys such as `persist`).
    pub metadata: Option<Bytes>,
}

#[derive(Debug)]
pub enum InboundPayload {
    Json(Box<RawValue>),
    User(UserBroadcast),
}

/// One decoded client message.
#[derive(Debug)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: InboundPayload,
}

impl Inbound {
    pub fn json_payload(&self) -> Option<&RawValue> {
        match &self.payload {
            InboundPayload::Json(raw) => Some(raw),
            InboundPayload::User(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid JSON message: {0}")]
    Json(String),
    #[error("message has the wrong shape: {0}")]
    Shape(&'static str),
    #[error("binary frame truncated: {0}")]
    Truncated(&'static str),
    #[error("binary frame of unsupported kind {0}")]
    UnsupportedKind(u8),
    #[error("binary frame field {0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("binary frame has unknown payload encoding {0}")]
    Encoding(u8),
    #[error("binary frame JSON payload is not valid JSON")]
    PayloadJson,
    #[error("empty binary frame")]
    Empty,
    #[error("binary frames are not part of serializer 1.0.0")]
    BinaryOnV1,
}

/// Decodes a text frame with the connection's serializer.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Inbound, DecodeError> {
    match vsn {
        Vsn::V1 => v1::decode(text),
        Vsn::V2 => v2::decode(text),
    }
}

/// Decodes a binary frame (vsn 2.0.0 only).
pub fn decode_binary(vsn: Vsn, frame: &Bytes) -> Result<Inbound, DecodeError> {
    match vsn {
        Vsn::V1 => Err(DecodeError::BinaryOnV1),
        Vsn::V2 => binary::decode(frame),
    }
}

/// Encodes a text frame with the connection's serializer. `payload` must be JSON text.
/// vsn 1.0.0 carries no `join_ref` server → client.
pub fn encode_text(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    match vsn {
        Vsn::V1 => v1::encode(msg_ref, topic, event, payload),
        Vsn::V2 => v2::encode(join_ref, msg_ref, topic, event, payload),
    }
}

/// Phoenix refs are strings, but tolerate numbers from hand-written clients.
pub(crate) fn ref_from_json(v: &serde_json::Value) -> Result<Option<String>, DecodeError> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(DecodeError::Shape("ref/join_ref must be a string or null")),
    }
}

pub(crate) fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn json_opt_string(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_string(), json_string)
}
