//! The client side of one WebSocket: connecting from a chosen loopback source address, the
//! Phoenix join (vsn 2.0.0 JSON arrays), outgoing broadcasts, and reading the send stamp out of
//! whatever the server delivers (text frames, or binary kind-4 frames for messages that came
//! from the database or a kind-3 push).
//!
//! "Plain" mode talks to the peers (a LISTEN/NOTIFY bridge, nchan): no join, no heartbeat, and
//! the payload JSON is the whole frame.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use realtime_test_client::{binary, phoenix};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// How long a connect or a join may take before it counts as an error.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// realtime-js sends a heartbeat every 25 s; the server closes sockets idle for 60 s.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(25);
pub const HEARTBEAT: &str = r#"[null,"hb","phoenix","heartbeat",{}]"#;

#[derive(Clone, Debug)]
pub enum Protocol {
    /// pg_realtime: `base` is `ws://host:port/realtime/v1/websocket`.
    Phoenix { base: String, token: String },
    /// A peer: `{topic}` in the URLs is replaced by the topic name.
    Plain {
        sub_url: String,
        pub_url: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Subscriber,
    Publisher,
}

impl Protocol {
    pub fn is_phoenix(&self) -> bool {
        matches!(self, Protocol::Phoenix { .. })
    }

    fn url(&self, topic: &str, role: Role) -> Result<String, String> {
        match (self, role) {
            (Protocol::Phoenix { base, token }, _) => {
                Ok(format!("{base}?apikey={token}&vsn=2.0.0"))
            }
            (Protocol::Plain { sub_url, .. }, Role::Subscriber) => {
                Ok(sub_url.replace("{topic}", topic))
            }
            (Protocol::Plain { pub_url, .. }, Role::Publisher) => pub_url
                .as_ref()
                .map(|u| u.replace("{topic}", topic))
                .ok_or_else(|| "plain mode needs --pub-url to publish".to_owned()),
        }
    }
}

/// The `i`-th client's source address: 127.0.0.1 .. 127.0.0.n in turn. One source address
/// has about 28,000 ephemeral ports towards one server port; several addresses lift that.
pub fn source_addr(i: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i % n.clamp(1, 250)) as u8)
}

fn server_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("only ws:// URLs are supported: {url}"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{authority}: no IPv4 address"))
}

/// What a Phoenix join asks for beyond the defaults (public, presence off, broadcast self/ack
/// off, the connect-time token).
#[derive(Clone, Debug, Default)]
pub struct JoinOptions {
    /// `Some(key)` enables presence under that key.
    pub presence_key: Option<String>,
    pub private: bool,
    /// The channel's own token (a user's JWT), as realtime-js sends it; else the connect token.
    pub access_token: Option<String>,
    /// `broadcast.ack`: the server answers every broadcast with a `phx_reply`.
    pub ack: bool,
}

/// Opens a WebSocket for `topic` from `source`; for Phoenix also joins `realtime:<topic>`
/// with `options`.
pub async fn open_with(
    protocol: &Protocol,
    topic: &str,
    role: Role,
    source: Ipv4Addr,
    options: &JoinOptions,
) -> Result<Ws, String> {
    let setup = async {
        let mut ws = connect_ws(protocol, topic, role, source).await?;
        if let Protocol::Phoenix { token, .. } = protocol {
            join(&mut ws, topic, token, options).await?;
        }
        Ok(ws)
    };
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| "connect/join timed out".to_owned())?
}

/// Opens the WebSocket only (no join), within [`SETUP_TIMEOUT`].
pub async fn connect(
    protocol: &Protocol,
    topic: &str,
    role: Role,
    source: Ipv4Addr,
) -> Result<Ws, String> {
    tokio::time::timeout(SETUP_TIMEOUT, connect_ws(protocol, topic, role, source))
        .await
        .map_err(|_| "connect timed out".to_owned())?
}

async fn connect_ws(
    protocol: &Protocol,
    topic: &str,
    role: Role,
    source: Ipv4Addr,
) -> Result<Ws, String> {
    let url = protocol.url(topic, role)?;
    let server = server_addr(&url)?;
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server}: {e}"))?;
    // Latency is the point: no Nagle delay on small frames.
    stream.set_nodelay(true).ok();
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(ws_config()))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// tungstenite zeroes up to `read_buffer_size` bytes before every read attempt, including the
/// one that finds the socket empty; its 128 KiB default made that most of a receiver's CPU.
/// Larger frames still arrive whole, 16 KiB per read.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// The `phx_join` frame for `realtime:<topic>`: broadcast self off, ack, presence and privacy
/// as `options` say.
pub fn join_frame(
    join_ref: &str,
    topic: &str,
    connect_token: &str,
    options: &JoinOptions,
) -> String {
    let presence = match &options.presence_key {
        Some(key) => serde_json::json!({"enabled": true, "key": key}),
        None => serde_json::json!({"enabled": false}),
    };
    phoenix::encode(
        phoenix::V2,
        Some(join_ref),
        join_ref,
        &format!("realtime:{topic}"),
        "phx_join",
        serde_json::json!({
            "config": {
                "broadcast": {"self": false, "ack": options.ack},
                "presence": presence,
                "private": options.private
            },
            "access_token": options.access_token.as_deref().unwrap_or(connect_token)
        }),
    )
}

/// The `phx_leave` frame of the channel joined with `join_ref`.
pub fn leave_frame(join_ref: &str, msg_ref: &str, topic: &str) -> String {
    phoenix::encode(
        phoenix::V2,
        Some(join_ref),
        msg_ref,
        &format!("realtime:{topic}"),
        "phx_leave",
        serde_json::json!({}),
    )
}

/// The reply to the frame whose ref is `reference`: `Ok(None)` if `text` is something else,
/// `Ok(Some(()))` for an ok, `Err(reason)` for a refusal.
pub fn reply_to(text: &str, reference: &str) -> Result<Option<()>, String> {
    let Ok(serde_json::Value::Array(a)) = serde_json::from_str(text) else {
        return Ok(None);
    };
    let is_reply = a.get(1).and_then(|v| v.as_str()) == Some(reference)
        && a.get(3).and_then(|v| v.as_str()) == Some("phx_reply");
    if !is_reply {
        return Ok(None);
    }
    let status = a
        .get(4)
        .and_then(|p| p.get("status"))
        .and_then(|s| s.as_str());
    match status {
        Some("ok") => Ok(Some(())),
        _ => Err(format!(
            "refused: {}",
            a.get(4).cloned().unwrap_or_default()
        )),
    }
}

/// A `phx_reply` to a numeric ref (the refs [`broadcast`] gives): the ref, and Ok or the
/// refusal. None for anything else, including replies to other refs (joins, heartbeats).
pub fn numbered_reply(text: &str) -> Option<(u64, Result<(), String>)> {
    if !text.contains("\"phx_reply\"") {
        return None;
    }
    let serde_json::Value::Array(a) = serde_json::from_str(text).ok()? else {
        return None;
    };
    if a.get(3).and_then(|v| v.as_str()) != Some("phx_reply") {
        return None;
    }
    let reference = a.get(1)?.as_str()?.parse().ok()?;
    let payload = a.get(4).cloned().unwrap_or_default();
    match payload.get("status").and_then(|s| s.as_str()) {
        Some("ok") => Some((reference, Ok(()))),
        _ => Some((reference, Err(payload.to_string()))),
    }
}

/// Joins a channel and waits for the ok.
async fn join(ws: &mut Ws, topic: &str, token: &str, options: &JoinOptions) -> Result<(), String> {
    ws.send(Message::text(join_frame("1", topic, token, options)))
        .await
        .map_err(|e| format!("send join: {e}"))?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return Err(format!("closed while joining: {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read join reply: {e}")),
            None => return Err("closed while joining".into()),
        };
        match reply_to(text.as_str(), "1") {
            Ok(None) => continue,
            Ok(Some(())) => return Ok(()),
            Err(e) => return Err(format!("join {e}")),
        }
    }
}

/// The user payload every sender uses: `{"t":<µs>,"p":"xxx…"}`, padded to `size` bytes.
pub fn payload(t_us: u64, pad: &str) -> String {
    format!("{{\"t\":{t_us},\"p\":\"{pad}\"}}")
}

/// Padding so that `payload(now, pad)` is about `size` bytes long.
pub fn padding(size: usize) -> String {
    // `{"t":1700000000000000,"p":""}` is 29 bytes.
    "x".repeat(size.saturating_sub(29))
}

/// Wire format of a Phoenix client broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frames {
    /// `[join_ref, ref, topic, "broadcast", {type, event, payload}]`
    Text,
    /// kind 3, as realtime-js sends it; subscribers then receive kind-4 frames.
    Binary,
}

/// One outgoing broadcast on `realtime:<topic>`, its ref `seq`. `meta` (e.g. `{"persist":true}`)
/// rides in binary frames only, as realtime-js sends it.
pub fn broadcast(
    protocol: &Protocol,
    frames: Frames,
    topic: &str,
    seq: u64,
    meta: &str,
    body: &str,
) -> Message {
    if !protocol.is_phoenix() {
        return Message::text(body.to_owned());
    }
    let reference = seq.to_string();
    let full_topic = format!("realtime:{topic}");
    match frames {
        Frames::Text => Message::text(format!(
            r#"["1","{reference}","{full_topic}","broadcast",{{"type":"broadcast","event":"e","payload":{body}}}]"#
        )),
        Frames::Binary => Message::binary(binary::user_broadcast_push_with_meta(
            "1",
            &reference,
            &full_topic,
            "e",
            meta.as_bytes(),
            body.as_bytes(),
            true,
        )),
    }
}

/// What a received frame means to the benchmark.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A benchmark message sent at this time (µs since the epoch).
    Stamp(u64),
    /// A reply, heartbeat answer or anything else harmless.
    Other,
    /// The server closed the channel or the socket, or said something went wrong.
    Failure(String),
}

pub fn classify(msg: &Message) -> Incoming {
    match msg {
        Message::Text(t) => classify_bytes(t.as_bytes()),
        Message::Binary(b) => match kind4_payload(b) {
            Some(p) => classify_bytes(p),
            None => Incoming::Failure(format!("unexpected binary frame of {} bytes", b.len())),
        },
        Message::Close(c) => Incoming::Failure(format!("closed by server: {c:?}")),
        _ => Incoming::Other,
    }
}

fn classify_bytes(b: &[u8]) -> Incoming {
    if let Some(t) = find_stamp(b) {
        return Incoming::Stamp(t);
    }
    let text = String::from_utf8_lossy(b);
    if text.contains("\"phx_error\"")
        || text.contains("\"phx_close\"")
        || text.contains("\"status\":\"error\"")
    {
        Incoming::Failure(text.chars().take(200).collect())
    } else {
        Incoming::Other
    }
}

/// The user payload of a kind-4 frame.
fn kind4_payload(b: &[u8]) -> Option<&[u8]> {
    binary::decode_user_broadcast(b).map(|m| m.payload)
}

/// The value of `"t": <digits>` — found by scanning rather than parsing the JSON, because the
/// receivers are the benchmark's own bottleneck at high fan-out. Postgres renders JSON with
/// spaces around the colon (`"t" : 1` from json, `"t": 1` from jsonb), so those are skipped.
pub fn find_stamp(b: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\"";
    let mut from = 0;
    while let Some(pos) = b[from..].windows(KEY.len()).position(|w| w == KEY) {
        let mut at = from + pos + KEY.len();
        let skip_spaces = |at: &mut usize| {
            while b.get(*at) == Some(&b' ') {
                *at += 1;
            }
        };
        skip_spaces(&mut at);
        if b.get(at) == Some(&b':') {
            at += 1;
            skip_spaces(&mut at);
            let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 {
                return std::str::from_utf8(&b[at..at + digits]).ok()?.parse().ok();
            }
        }
        from = at;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_in_text_and_kind4_frames() {
        let text = Message::text(
            r#"[null,null,"realtime:a","broadcast",{"type":"broadcast","event":"e","payload":{"t":42,"p":"x"}}]"#,
        );
        assert_eq!(classify(&text), Incoming::Stamp(42));
        let mut b = vec![4, 10, 1, 0, 1];
        b.extend_from_slice(b"realtime:ae{\"t\":7}");
        assert_eq!(classify(&Message::binary(b)), Incoming::Stamp(7));
        assert_eq!(
            classify(&Message::binary(vec![4, 200])),
            Incoming::Failure("unexpected binary frame of 2 bytes".into())
        );
        assert_eq!(
            classify(&Message::text(
                r#"[null,"hb","phoenix","phx_reply",{"status":"ok","response":{}}]"#
            )),
            Incoming::Other
        );
    }

    #[test]
    fn stamps_as_postgres_renders_them() {
        assert_eq!(find_stamp(br#"{"p": "x", "t": 12}"#), Some(12));
        assert_eq!(find_stamp(br#"{"t" : 34, "p" : "x"}"#), Some(34));
        assert_eq!(find_stamp(br#"{"t": "no"}"#), None);
    }

    #[test]
    fn replies_to_numbered_refs() {
        let ok = r#"["1","7","realtime:a","phx_reply",{"status":"ok","response":{"id":"x"}}]"#;
        assert_eq!(numbered_reply(ok), Some((7, Ok(()))));
        let refused =
            r#"["1","8","realtime:a","phx_reply",{"status":"error","response":{"reason":"no"}}]"#;
        assert!(matches!(numbered_reply(refused), Some((8, Err(_)))));
        let heartbeat = r#"[null,"hb","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(numbered_reply(heartbeat), None);
        assert_eq!(
            numbered_reply(r#"[null,null,"realtime:a","broadcast",{}]"#),
            None
        );
    }

    #[test]
    fn payload_has_the_requested_size() {
        assert_eq!(payload(1_700_000_000_000_000, &padding(100)).len(), 100);
    }
}
