#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use realtime_server::{Config, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-with-at-least-32-chars";
/// Generous bound so a broken server fails a test instead of hanging it; never a timing check.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn test_config() -> Config {
    Config {
        listen_addresses: "127.0.0.1".into(),
        port: 0,
        jwt_secret: Some(SECRET.into()),
        connect_error_delay: Duration::ZERO,
        join_error_delay: Duration::ZERO,
        ..Config::default()
    }
}

pub fn start(config: Config) -> (Server, SocketAddr) {
    let server = Server::start(config).expect("server starts");
    let addr = server.local_addrs()[0];
    (server, addr)
}

pub async fn stop(server: Server) {
    tokio::task::spawn_blocking(move || server.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn token_with(claims: Value) -> String {
    realtime_test_client::jwt::sign_claims(&claims, SECRET)
}

pub fn token() -> String {
    token_with(json!({"role": "anon", "exp": now() + 3600, "sub": "user-1"}))
}

pub async fn connect(addr: SocketAddr, vsn: &str) -> Ws {
    let url = format!(
        "ws://{addr}/realtime/v1/websocket?apikey={}&vsn={vsn}&log_level=info",
        token()
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connects")
        .0
}

/// Connects expecting a refusal; returns (status, body JSON).
pub async fn refused(url: String) -> (u16, Value) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("connection unexpectedly accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

pub async fn send_text(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

pub async fn send_binary(ws: &mut Ws, b: Bytes) {
    ws.send(Message::binary(b)).await.unwrap();
}

/// Next data frame (text or binary), skipping pings.
pub async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame arrives")
            .expect("socket open")
            .expect("no socket error");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("valid JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub async fn next_binary(ws: &mut Ws) -> Bytes {
    match next_frame(ws).await {
        Message::Binary(b) => b,
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// Joins `realtime:<sub>` over vsn 2.0.0 with `join_ref`, returns the reply payload.
pub async fn join_v2(ws: &mut Ws, sub: &str, join_ref: &str, config: Value) -> Value {
    send_text(
        ws,
        json!([join_ref, join_ref, format!("realtime:{sub}"), "phx_join",
            {"config": config, "access_token": token(), "version": "realtime-js/2.119.1"}]),
    )
    .await;
    let reply = next_json(ws).await;
    assert_eq!(reply[0], json!(join_ref), "{reply}");
    assert_eq!(reply[1], json!(join_ref));
    assert_eq!(reply[3], json!("phx_reply"));
    reply[4].clone()
}

pub async fn join_v1(ws: &mut Ws, sub: &str, join_ref: &str, config: Value) -> Value {
    send_text(
        ws,
        json!({"topic": format!("realtime:{sub}"), "event": "phx_join",
            "payload": {"config": config}, "ref": join_ref, "join_ref": join_ref}),
    )
    .await;
    let reply = next_json(ws).await;
    assert_eq!(reply["event"], json!("phx_reply"), "{reply}");
    assert_eq!(reply["ref"], json!(join_ref));
    assert!(
        reply.get("join_ref").is_none(),
        "V1 replies carry no join_ref"
    );
    reply["payload"].clone()
}

/// Minimal HTTP/1.1 client: returns (status, headers text, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response arrives")
        .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let len =
            usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + len]);
        b = &b[end + 2 + len + 2..];
    }
}

/// Connects with a tiny receive buffer: once this client stops reading, the server's writes to
/// it get stuck after a few kilobytes plus the server's own send buffer.
pub async fn connect_small_rcvbuf(addr: SocketAddr, vsn: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = format!(
        "ws://{addr}/realtime/v1/websocket?apikey={}&vsn={vsn}",
        token()
    );
    tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("connects")
        .0
}

/// Until `cond` holds, polling every 10 ms; panics after [`WAIT`].
pub async fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next authorization request the server asks the worker for (the test plays the worker).
pub async fn next_authorization(
    server: &std::sync::Arc<Server>,
) -> realtime_server::AuthorizationRequest {
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..2000 {
            if let Some(realtime_server::Event::Authorize(r)) =
                server.poll_events().into_iter().next()
            {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no authorization request");
    })
    .await
    .unwrap()
}
