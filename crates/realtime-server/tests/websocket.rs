//! The WebSocket layer seen from a raw TCP socket: the upgrade's refusals, control frames,
//! fragmented messages and the close codes of protocol errors. supabase-js and the other tests
//! speak through a WebSocket library; this file writes the bytes itself.

use std::io::Cursor;
use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

mod common;
use common::{WAIT, start, stop, test_config, token};

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

fn upgrade_request(addr: SocketAddr, method: &str, extra: &str) -> String {
    format!(
        "{method} /realtime/v1/websocket?apikey={}&vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\n\
         {extra}Content-Length: 0\r\n\r\n",
        token()
    )
}

const GOOD_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n\
                            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Sends `request` and returns the response head and whatever followed it.
async fn handshake(addr: SocketAddr, request: &str) -> (TcpStream, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connects");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut got = Vec::new();
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    let mut body = got[head_end..].to_vec();
    // A refusal's body may come in a later read than its head.
    let length = head.to_ascii_lowercase().lines().find_map(|l| {
        l.strip_prefix("content-length: ")?
            .trim()
            .parse::<usize>()
            .ok()
    });
    if let Some(length) = length.filter(|_| !head.starts_with("HTTP/1.1 101")) {
        while body.len() < length {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
                .await
                .expect("the body")
                .expect("read");
            assert!(n > 0, "closed before the body ended");
            body.extend_from_slice(&buf[..n]);
        }
    }
    (tcp, head, body)
}

async fn upgraded(addr: SocketAddr) -> Client {
    let (tcp, head, rest) = handshake(addr, &upgrade_request(addr, "GET", GOOD_HEADERS)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    Client { tcp, unread: rest }
}

fn frame(opcode: OpCode, is_final: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        is_final,
        opcode,
        mask,
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    header
        .format(payload.len() as u64, &mut out)
        .expect("formats");
    let key = mask.unwrap_or([0; 4]);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    out
}

struct Client {
    tcp: TcpStream,
    unread: Vec<u8>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("sent");
    }

    /// The next server frame: opcode and payload; None when the server closed the connection.
    async fn next(&mut self) -> Option<(OpCode, Vec<u8>)> {
        loop {
            let mut cursor = Cursor::new(&self.unread[..]);
            if let Some((header, len)) = FrameHeader::parse(&mut cursor).expect("a valid frame") {
                assert!(header.mask.is_none(), "server frames are not masked");
                let start = cursor.position() as usize;
                let end = start + len as usize;
                if self.unread.len() >= end {
                    let payload = self.unread[start..end].to_vec();
                    self.unread.drain(..end);
                    return Some((header.opcode, payload));
                }
            }
            let mut buf = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut buf))
                .await
                .expect("a frame or the end")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.unread.extend_from_slice(&buf[..n]);
        }
    }

    async fn next_json(&mut self) -> Value {
        match self.next().await {
            Some((OpCode::Data(Data::Text), p)) => serde_json::from_slice(&p).expect("JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Expects a close frame with `code`, then the end of the connection.
    async fn closed_with(&mut self, code: u16) {
        match self.next().await {
            Some((OpCode::Control(Control::Close), p)) => {
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), code, "{p:?}");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        assert!(
            self.next().await.is_none(),
            "the server ends the connection"
        );
    }
}

fn heartbeat(r: &str) -> String {
    json!([null, r, "phoenix", "heartbeat", {}]).to_string()
}

#[tokio::test]
async fn requests_that_are_not_upgrades_are_refused_with_the_reason() {
    let (server, addr) = start(test_config());
    let cases = [
        // The route itself takes only GET.
        ("POST", GOOD_HEADERS.to_string(), "405", "allow: GET"),
        (
            "GET",
            GOOD_HEADERS.replace("Connection: Upgrade", "Connection: close"),
            "400",
            "Connection header",
        ),
        (
            "GET",
            GOOD_HEADERS.replace("Upgrade: websocket", "Upgrade: h2c"),
            "400",
            "Upgrade",
        ),
        (
            "GET",
            GOOD_HEADERS.replace("Version: 13", "Version: 8"),
            "400",
            "Version",
        ),
        (
            "GET",
            GOOD_HEADERS.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            "400",
            "Key",
        ),
    ];
    for (method, headers, status, says) in cases {
        let request = format!(
            "{}Content-Length: 0\r\n",
            upgrade_request(addr, method, &headers)
        )
        .replace(
            "\r\n\r\nContent-Length: 0\r\n",
            "\r\nContent-Length: 0\r\n\r\n",
        );
        let (_, head, body) = handshake(addr, &request).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{method} {headers}: {head}"
        );
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(says) || head.contains(says),
            "{says}: {head}{body}"
        );
    }
    stop(server).await;
}

#[tokio::test]
async fn pings_are_answered_and_fragments_are_joined() {
    let (server, addr) = start(test_config());
    let mut c = upgraded(addr).await;
    c.send(&frame(
        OpCode::Control(Control::Ping),
        true,
        Some(MASK),
        b"are you there",
    ))
    .await;
    assert_eq!(
        c.next().await,
        Some((OpCode::Control(Control::Pong), b"are you there".to_vec()))
    );
    // One heartbeat in three fragments, with a ping between two of them.
    let text = heartbeat("7");
    let (a, rest) = text.as_bytes().split_at(5);
    let (b, d) = rest.split_at(9);
    let mut bytes = frame(OpCode::Data(Data::Text), false, Some(MASK), a);
    bytes.extend(frame(OpCode::Data(Data::Continue), false, Some(MASK), b));
    bytes.extend(frame(OpCode::Control(Control::Ping), true, Some(MASK), b""));
    bytes.extend(frame(OpCode::Data(Data::Continue), true, Some(MASK), d));
    c.send(&bytes).await;
    assert_eq!(
        c.next().await,
        Some((OpCode::Control(Control::Pong), vec![]))
    );
    let reply = c.next_json().await;
    assert_eq!(reply[1], "7", "{reply}");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    stop(server).await;
}

#[tokio::test]
async fn a_clients_close_is_answered_with_its_code() {
    let (server, addr) = start(test_config());
    let mut c = upgraded(addr).await;
    let mut payload = 4001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"done");
    c.send(&frame(
        OpCode::Control(Control::Close),
        true,
        Some(MASK),
        &payload,
    ))
    .await;
    c.closed_with(4001).await;
    stop(server).await;
}

#[tokio::test]
async fn protocol_errors_close_with_their_codes_and_others_go_on() {
    let (server, addr) = start(test_config());
    let max = test_config().max_frame_bytes as u64;
    let mut reserved = frame(
        OpCode::Data(Data::Text),
        true,
        Some(MASK),
        heartbeat("1").as_bytes(),
    );
    reserved[0] |= 0x20;
    let too_big = {
        // Only the header: the refusal must not wait for (or buffer) the payload.
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Binary),
            mask: Some(MASK),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(max + 1, &mut out).expect("formats");
        out
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked",
            frame(
                OpCode::Data(Data::Text),
                true,
                None,
                heartbeat("1").as_bytes(),
            ),
            1002,
        ),
        ("reserved bit", reserved, 1002),
        (
            "continuation first",
            frame(OpCode::Data(Data::Continue), true, Some(MASK), b"x"),
            1002,
        ),
        (
            "invalid UTF-8",
            frame(
                OpCode::Data(Data::Text),
                true,
                Some(MASK),
                &[b'[', 0xc3, 0x28],
            ),
            1007,
        ),
        ("over the frame limit", too_big, 1009),
    ];
    let mut bystander = upgraded(addr).await;
    for (name, bytes, code) in cases {
        let mut c = upgraded(addr).await;
        c.send(&bytes).await;
        eprintln!("{name}");
        c.closed_with(code).await;
        // Nobody else noticed.
        bystander
            .send(&frame(
                OpCode::Data(Data::Text),
                true,
                Some(MASK),
                heartbeat(name).as_bytes(),
            ))
            .await;
        assert_eq!(bystander.next_json().await[1], name);
    }
    stop(server).await;
}

/// A shutdown while the server is in the middle of writing large frames to a client that reads
/// slowly: the client gets the frames being written whole, then the close frame (not a close
/// frame inside a half-written one).
#[tokio::test]
async fn a_close_during_a_large_write_comes_after_the_frame_it_interrupted() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let (server, addr) = start(test_config());
    let mut slow = common::connect_small_rcvbuf(addr, "2.0.0").await;
    common::join_v2(&mut slow, "big", "1", json!({"broadcast": {"self": false}})).await;
    let mut sender = common::connect(addr, "2.0.0").await;
    common::join_v2(
        &mut sender,
        "big",
        "1",
        json!({"broadcast": {"self": false}}),
    )
    .await;
    // More than the kernel buffers between the two (a 4 KiB receive window and a send buffer
    // of at most a few MB): the server's write must stop part way through.
    let big = "x".repeat(2_500_000);
    for i in 0..3 {
        common::send_text(
            &mut sender,
            json!([null, i.to_string(), "realtime:big", "broadcast",
                {"type": "broadcast", "event": "big", "payload": {"i": i, "p": big}}]),
        )
        .await;
    }
    // Time for the server to start writing them (if the shutdown came first, the client would
    // get the close alone and the test would fail below, not pass).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stopping =
        tokio::task::spawn_blocking(move || server.shutdown(std::time::Duration::from_secs(10)));
    let mut got = Vec::new();
    let close = loop {
        match tokio::time::timeout(WAIT, slow.next())
            .await
            .expect("a frame")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("a whole JSON frame");
                got.push(v[4]["payload"]["i"].clone());
            }
            Some(Ok(Message::Close(frame))) => break frame,
            other => panic!("expected broadcasts then a close frame, got {other:?}"),
        }
    };
    // What was queued but not yet being written is not sent after a shutdown; what was being
    // written is finished first.
    assert!(
        !got.is_empty(),
        "the frame being written when the shutdown came"
    );
    let expected: Vec<Value> = (0..got.len()).map(|i| json!(i)).collect();
    assert_eq!(got, expected);
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    stopping.await.expect("shut down");
}
