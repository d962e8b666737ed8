//! Abuse: malformed frames, oversized messages, join storms, odd topics, presence floods, bad
//! tokens, half-open handshakes and bad REST bodies, all thrown at one real cluster.
//!
//! Every case ends with the same health check: the database did not restart (a connection
//! opened before any abuse still answers and the log shows no crash), and the worker, with the
//! same pid, still serves a fresh client a message sent from SQL.
//!
//! The cases are deterministic: random input comes from a seeded generator defined here. All
//! tests share one cluster (started by the first, stopped when the process exits), so a crash
//! in one case also fails the health check of the next.

use realtime_integration_tests::{BIN, Cluster, JWT_SECRET, Message, Socket, eventually, jwt};
use realtime_integration_tests::{Received as Got, Stream, receive};
use realtime_test_client::jwt::{b64url, sign_json};
use realtime_test_client::{binary, phoenix};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
/// The socket server's WebSocket message limit (`max_frame_bytes` in the server's config).
const FRAME_LIMIT: usize = 5_000_000;
/// The default `realtime.max_payload_size` (3000 kB).
const MAX_PAYLOAD: usize = 3000 * 1024;

// ---------------------------------------------------------------------------------------------
// One cluster for the whole file
// ---------------------------------------------------------------------------------------------

struct Fixture {
    /// Behind a lock because a cluster is not `Sync`.
    cluster: Mutex<Cluster>,
    data: String,
    ws_port: u16,
    /// Opened before any abuse; if the postmaster restarts, this connection dies with it.
    sentinel: Mutex<postgres::Client>,
    worker: i32,
    round: AtomicU64,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// Statics are never dropped, so the shared cluster is stopped when the test process exits.
extern "C" fn stop_shared_cluster() {
    if let Some(f) = FIXTURE.get() {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
            .args(["-D", &f.data, "stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&f.data);
    }
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let cluster = Cluster::start(
            "fuzz",
            &[
                // The many-sockets cases open a few hundred connections at once.
                "realtime.max_connections = 2000",
            ],
        );
        let sentinel = Mutex::new(cluster.connect());
        let worker = cluster.worker_pid().expect("the worker runs");
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_shared_cluster);
        }
        Fixture {
            data: cluster.path().to_string_lossy().into_owned(),
            ws_port: cluster.ws_port,
            cluster: Mutex::new(cluster),
            sentinel,
            worker,
            round: AtomicU64::new(0),
        }
    })
}

impl Fixture {
    fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.cluster.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn log(&self) -> String {
        self.with_cluster(Cluster::log)
    }
}

fn sentinel(f: &Fixture) -> MutexGuard<'_, postgres::Client> {
    // A failed case must not poison the connection for the cases after it.
    f.sentinel.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lines that mean a backend or the worker died and the postmaster restarted everything.
const CRASH_MARKERS: &[&str] = &[
    "terminated by signal",
    "PANIC",
    "reinitializing",
    "server process (PID",
    "all server processes terminated",
    "out of memory",
    "background worker \"pg_realtime\" (PID",
];

fn log_tail(f: &Fixture) -> String {
    let log = f.log();
    let start = log.len().saturating_sub(4000);
    let start = (start..log.len())
        .find(|i| log.is_char_boundary(*i))
        .unwrap_or(0);
    log[start..].to_string()
}

/// The database did not restart and the same worker still serves a fresh client.
fn health(case: &str) {
    let f = fixture();
    let n = f.round.fetch_add(1, Ordering::SeqCst);
    {
        let mut c = sentinel(f);
        let one: i32 = c
            .query_one("SELECT 1", &[])
            .unwrap_or_else(|e| {
                panic!(
                    "{case}: the connection opened before the abuse is gone ({e}); log:\n{}",
                    log_tail(f)
                )
            })
            .get(0);
        assert_eq!(one, 1);
    }
    let crashes = f.with_cluster(Cluster::crash_lines);
    assert!(crashes.is_empty(), "{case}: {}", crashes.join("\n"));
    let log = f.log();
    for marker in CRASH_MARKERS {
        assert!(
            !log.contains(marker),
            "{case}: the server log contains {marker:?}:\n{}",
            log_tail(f)
        );
    }
    assert_eq!(
        f.with_cluster(Cluster::worker_pid),
        Some(f.worker),
        "{case}: the worker was restarted or is gone:\n{}",
        log_tail(f)
    );
    let mut fresh = f
        .with_cluster(|c| Socket::try_connect(c, &jwt(json!({})), "2.0.0"))
        .unwrap_or_else(|e| panic!("{case}: a fresh client cannot connect: {e}"));
    let topic = format!("health-{n}");
    let reply = fresh.join(&topic, json!({}));
    assert_eq!(reply["status"], "ok", "{case}: health join: {reply}");
    sentinel(f)
        .execute(
            "SELECT realtime.send(jsonb_build_object('n', $1::int8), 'health', $2, private => false)",
            &[&(n as i64), &topic],
        )
        .unwrap_or_else(|e| panic!("{case}: realtime.send failed: {e}"));
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = fresh
            .recv_event("broadcast", left)
            .unwrap_or_else(|| panic!("{case}: the fresh client got no message from SQL"));
        if got.payload["event"] == "health" && got.payload["payload"]["n"] == json!(n) {
            break;
        }
    }
}

/// The worker's memory figures in kB (`VmRSS`, `VmHWM`), for the report of heavy cases.
fn worker_memory_kb() -> (u64, u64) {
    let f = fixture();
    let status = std::fs::read_to_string(format!("/proc/{}/status", f.worker)).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------------------------
// Deterministic random input
// ---------------------------------------------------------------------------------------------

/// xorshift64*: small, seeded, good enough to pick garbage.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// A WebSocket client that never panics on what the server does
// ---------------------------------------------------------------------------------------------

struct Ws {
    ws: Stream,
    vsn: &'static str,
    refs: u64,
    closed: bool,
}

fn ws_url(port: u16, token: &str, vsn: &str) -> String {
    format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={token}&vsn={vsn}")
}

impl Ws {
    fn open(vsn: &'static str) -> Ws {
        Self::open_with(&jwt(json!({})), vsn).expect("websocket connects")
    }

    fn open_with(token: &str, vsn: &'static str) -> Result<Ws, tungstenite::Error> {
        let f = fixture();
        let mut config = tungstenite::protocol::WebSocketConfig::default();
        config.max_message_size = Some(64 << 20);
        config.max_frame_size = Some(64 << 20);
        let (ws, _) = tungstenite::client::connect_with_config(
            ws_url(f.ws_port, token, vsn),
            Some(config),
            3,
        )?;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        }
        Ok(Ws {
            ws,
            vsn,
            refs: 0,
            closed: false,
        })
    }

    fn next_ref(&mut self) -> String {
        self.refs += 1;
        format!("f{}", self.refs)
    }

    fn send(&mut self, m: tungstenite::Message) -> bool {
        if self.closed {
            return false;
        }
        match self.ws.send(m) {
            Ok(()) => true,
            Err(_) => {
                self.closed = true;
                false
            }
        }
    }

    fn text(&mut self, text: impl Into<String>) -> bool {
        self.send(tungstenite::Message::text(text.into()))
    }

    fn binary(&mut self, bytes: Vec<u8>) -> bool {
        self.send(tungstenite::Message::binary(bytes))
    }

    fn push(
        &mut self,
        join_ref: Option<&str>,
        reference: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> bool {
        let text = phoenix::encode(self.vsn, join_ref, reference, topic, event, payload);
        self.text(text)
    }

    /// The next frame, or None if nothing arrives within `limit`.
    fn next(&mut self, limit: Duration) -> Option<Got> {
        if self.closed {
            return Some(Got::Closed(None));
        }
        let got = receive(&mut self.ws, limit)?;
        self.closed = matches!(got, Got::Closed(_));
        Some(got)
    }

    /// Reads until the server has been quiet for `quiet`; every text frame must be JSON.
    fn drain(&mut self, quiet: Duration) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(got) = self.next(quiet) {
            match got {
                Got::Closed(_) => break,
                other => {
                    if let Some(m) = self.decode(&other) {
                        out.push(m);
                    }
                }
            }
        }
        out
    }

    fn decode(&self, got: &Got) -> Option<Message> {
        let frame = match got {
            Got::Text(t) => match serde_json::from_str(t) {
                Ok(v) => realtime_integration_tests::Frame::Text(v),
                // Deeply nested JSON that a client relayed is still JSON; this client's parser
                // just stops at 128 levels.
                Err(e) if e.to_string().contains("recursion limit") => return None,
                Err(e) => panic!("the server sent text that is not JSON ({e}): {t:.300}"),
            },
            Got::Binary(b) => realtime_integration_tests::Frame::Binary(b.clone()),
            Got::Closed(_) => return None,
        };
        Message::from_frame(&frame, self.vsn)
    }

    /// Waits for the reply to `reference`, skipping everything else.
    fn reply_to(&mut self, reference: &str, limit: Duration) -> Option<Message> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let got = self.next(deadline.saturating_duration_since(Instant::now()))?;
            if let Got::Closed(_) = got {
                return None;
            }
            if let Some(m) = self.decode(&got)
                && m.event == "phx_reply"
                && m.reference.as_deref() == Some(reference)
            {
                return Some(m);
            }
        }
        None
    }

    /// The connection still answers a heartbeat.
    fn alive(&mut self) -> bool {
        let r = self.next_ref();
        self.push(None, &r, "phoenix", "heartbeat", json!({}))
            && self
                .reply_to(&r, WAIT)
                .is_some_and(|m| m.payload["status"] == "ok")
    }

    fn join(&mut self, topic: &str, config: Value) -> Value {
        let r = self.next_ref();
        self.push(Some(&r), &r, topic, "phx_join", json!({ "config": config }));
        self.reply_to(&r, Duration::from_secs(15))
            .map(|m| m.payload)
            .unwrap_or(Value::Null)
    }

    /// Waits until the server closes the connection (a Close frame or a reset).
    fn closes_within(&mut self, limit: Duration) -> Option<Option<u16>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(Got::Closed(code)) = self.next(Duration::from_millis(200)) {
                return Some(code);
            }
        }
        None
    }
}

/// A kind-3 (client broadcast) binary frame with a JSON payload.
fn kind3(join_ref: &str, reference: &str, topic: &str, event: &str, payload: &[u8]) -> Vec<u8> {
    binary::user_broadcast_push(join_ref, reference, topic, event, payload, true)
}

// ---------------------------------------------------------------------------------------------
// Raw TCP: hand-written HTTP and WebSocket frames
// ---------------------------------------------------------------------------------------------

fn tcp() -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", fixture().ws_port)).expect("tcp connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.set_write_timeout(Some(Duration::from_secs(30))).ok();
    s
}

/// Reads an HTTP response until the server closes (requests say `Connection: close`) or the
/// body announced by Content-Length is complete. Returns (status, body).
fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if let Some(len) = length
                && buf.len() >= end + 4 + len
            {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let Some(end) = find(&buf, b"\r\n\r\n") else {
        return (0, buf);
    };
    let status = String::from_utf8_lossy(&buf[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, buf[end + 4..].to_vec())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 request on its own connection. Returns (status, body); status 0 means the
/// server closed without an answer.
fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    http_within(Duration::from_secs(30), method, path, headers, body)
}

fn http_within(
    limit: Duration,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = tcp();
    s.set_read_timeout(Some(limit)).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut all = req.into_bytes();
    all.extend_from_slice(body);
    // The server may answer (e.g. 413) and close before reading everything.
    let _ = s.write_all(&all);
    read_response(&mut s)
}

fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(path_and_query: &str, key: Option<&str>, version: &str) -> String {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n"
    );
    if let Some(key) = key {
        req.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// A hand-made WebSocket connection, for frames no client library would send.
struct RawWs {
    s: TcpStream,
}

impl RawWs {
    fn open() -> RawWs {
        let mut s = tcp();
        let path = format!("/realtime/v1/websocket?apikey={}&vsn=2.0.0", jwt(json!({})));
        s.write_all(upgrade_request(&path, Some(KEY), "13").as_bytes())
            .expect("write upgrade");
        // Read the 101 response head byte by byte so no frame bytes are consumed.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("upgrade response");
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        RawWs { s }
    }

    /// Writes one client frame with `declared` as its length and `payload` as its bytes (which
    /// may be shorter, for truncated frames).
    fn frame(&mut self, first: u8, declared: u64, payload: &[u8], masked: bool) -> bool {
        let mut f = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        if declared < 126 {
            f.push(mask_bit | declared as u8);
        } else if declared <= 0xFFFF {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(declared as u16).to_be_bytes());
        } else {
            f.push(mask_bit | 127);
            f.extend_from_slice(&declared.to_be_bytes());
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        if masked {
            f.extend_from_slice(&mask);
        }
        f.extend(payload.iter().enumerate().map(
            |(i, b)| {
                if masked { b ^ mask[i % 4] } else { *b }
            },
        ));
        self.s.write_all(&f).is_ok()
    }

    fn whole(&mut self, first: u8, payload: &[u8]) -> bool {
        self.frame(first, payload.len() as u64, payload, true)
    }

    /// Reads server frames until a Close frame or the end of the stream; returns the close
    /// code if one came (1005 for a Close frame without one), or 0 for a bare end of stream
    /// or a reset. None if the connection stays open.
    fn closed_within(&mut self, limit: Duration) -> Option<u16> {
        self.s.set_read_timeout(Some(limit)).ok();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            // Parse whole frames from the front of the buffer.
            while buf.len() >= 2 {
                let len7 = (buf[1] & 0x7F) as usize;
                let (len, at) = match len7 {
                    126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                    127 if buf.len() >= 10 => (
                        u64::from_be_bytes(buf[2..10].try_into().unwrap_or([0; 8])) as usize,
                        10,
                    ),
                    126 | 127 => break,
                    n => (n, 2),
                };
                if buf.len() < at + len {
                    break;
                }
                if buf[0] & 0x0F == 8 {
                    let code = if len >= 2 {
                        u16::from_be_bytes([buf[at], buf[at + 1]])
                    } else {
                        1005
                    };
                    return Some(code);
                }
                buf.drain(..at + len);
            }
            match self.s.read(&mut chunk) {
                Ok(0) => return Some(0),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(_) => return Some(0),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed frames
// ---------------------------------------------------------------------------------------------

/// Values of every JSON type (and some extremes) to put where a field of another type belongs.
fn odd_values() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!("\u{0000}"),
        json!([]),
        json!([1, [2, [3]]]),
        json!({}),
        json!({"a": {"b": null}}),
        json!("é🙂\u{202e}"),
        json!("x".repeat(70_000)),
    ]
}

/// Valid messages of every event, to corrupt field by field.
fn base_messages(
    topic: &str,
) -> Vec<(
    Option<&'static str>,
    &'static str,
    String,
    &'static str,
    Value,
)> {
    let t = topic.to_string();
    vec![
        (None, "1", "phoenix".into(), "heartbeat", json!({})),
        (
            Some("2"),
            "2",
            t.clone(),
            "phx_join",
            json!({"config": {"broadcast": {"self": true}, "presence": {"enabled": true}}}),
        ),
        (
            Some("2"),
            "3",
            t.clone(),
            "broadcast",
            json!({"type": "broadcast", "event": "e", "payload": {"a": 1}}),
        ),
        (
            Some("2"),
            "4",
            t.clone(),
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"m": 1}}),
        ),
        (
            Some("2"),
            "5",
            t.clone(),
            "access_token",
            json!({"access_token": "garbage"}),
        ),
        (Some("2"), "6", t, "phx_leave", json!({})),
    ]
}

#[test]
fn malformed_text_frames_are_ignored_or_answered() {
    let mut rng = Rng::new(0x5eed_0001);
    for vsn in ["2.0.0", "1.0.0"] {
        let mut s = Ws::open(vsn);
        let mut sent = 0usize;
        // Random bytes (made valid UTF-8 for the library; invalid UTF-8 is sent raw below).
        for _ in 0..300 {
            let n = rng.below(200);
            let junk = String::from_utf8_lossy(&rng.bytes(n)).into_owned();
            s.text(junk);
            sent += 1;
        }
        // Truncated JSON: every prefix of valid messages.
        let full = json!([
            "1",
            "1",
            "realtime:trunc",
            "phx_join",
            {"config": {"broadcast": {"self": true}}}
        ])
        .to_string();
        let full_v1 = json!({"topic": "realtime:trunc", "event": "phx_join", "payload": {"config": {}}, "ref": "1", "join_ref": "1"}).to_string();
        for text in [&full, &full_v1] {
            for cut in 0..text.len() {
                s.text(&text[..cut]);
                sent += 1;
            }
        }
        // Wrong types in every field of every kind of message, in both shapes.
        for (join_ref, reference, topic, event, payload) in base_messages("realtime:odd") {
            let v2 = json!([join_ref, reference, topic, event, payload]);
            let v1 = json!({"join_ref": join_ref, "ref": reference, "topic": topic, "event": event, "payload": payload});
            for odd in odd_values() {
                for i in 0..5 {
                    let mut m = v2.clone();
                    m[i] = odd.clone();
                    s.text(m.to_string());
                    sent += 1;
                }
                for field in ["join_ref", "ref", "topic", "event", "payload"] {
                    let mut m = v1.clone();
                    m[field] = odd.clone();
                    s.text(m.to_string());
                    let mut missing = v1.clone();
                    if let Some(o) = missing.as_object_mut() {
                        o.remove(field);
                    }
                    s.text(missing.to_string());
                    sent += 2;
                }
                // Payload fields of the wrong type, one level down.
                if let Value::Object(o) = &payload {
                    for k in o.keys() {
                        let mut p = payload.clone();
                        p[k] = odd.clone();
                        s.push(join_ref, reference, &topic, event, p);
                        sent += 1;
                    }
                }
            }
            // Arrays too short, too long, and nested.
            s.text(json!([join_ref, reference, topic, event]).to_string());
            s.text(json!([join_ref, reference, topic, event, payload, 1, 2, 3]).to_string());
            s.text(json!([[join_ref, reference, topic, event, payload]]).to_string());
            sent += 3;
            // Read the replies as we go, as a client would.
            s.drain(Duration::from_millis(20));
        }
        // Unknown events on a joined topic, and a huge ref.
        assert_eq!(s.join("realtime:odd-joined", json!({}))["status"], "ok");
        for event in [
            "nope",
            "",
            "PHX_JOIN",
            "phx_reply",
            "phx_close",
            "phx_error",
            "🙂",
        ] {
            s.push(Some("x"), "u", "realtime:odd-joined", event, json!({}));
        }
        let huge_ref = "r".repeat(1_000_000);
        s.push(None, &huge_ref, "phoenix", "heartbeat", json!({}));
        let reply = s
            .reply_to(&huge_ref, WAIT)
            .expect("a heartbeat with a 1 MB ref");
        assert_eq!(reply.payload["status"], "ok");
        // Deep JSON: as the whole frame, as the payload, and inside a join config.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        s.text(deep.clone());
        s.text(deep_obj.clone());
        s.text(format!(
            "[\"9\",\"9\",\"realtime:deep\",\"phx_join\",{{\"config\":{deep}}}]"
        ));
        s.text(format!(
            "{{\"topic\":\"realtime:deep\",\"event\":\"phx_join\",\"ref\":\"9\",\"payload\":{deep_obj}}}"
        ));
        s.text(format!(
            "[null,\"d\",\"realtime:odd-joined\",\"broadcast\",{{\"type\":\"broadcast\",\"event\":\"e\",\"payload\":{deep}}}]"
        ));
        s.text(format!(
            "[null,\"d\",\"realtime:odd-joined\",\"presence\",{{\"type\":\"presence\",\"event\":\"track\",\"payload\":{{\"m\":{deep}}}}}]"
        ));
        s.drain(Duration::from_millis(300));
        assert!(sent > 1000);
        assert!(
            s.alive(),
            "vsn {vsn}: the connection survives malformed text"
        );
        health(&format!("malformed text frames, vsn {vsn}"));
    }

    // Text frames that are not UTF-8 break the WebSocket protocol: the server may close that
    // connection, and nothing else.
    for payload in [
        &b"\xff\xfe\xfd"[..],
        b"[null,\"1\",\"phoenix\",\"heartbeat\",{\"a\":\"\xc3\x28\"}]",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
    ] {
        let mut raw = RawWs::open();
        raw.whole(0x81, payload);
        let _ = raw.closed_within(Duration::from_secs(2));
    }
    // A fragmented text message whose UTF-8 sequence is split across frames is valid.
    let mut raw = RawWs::open();
    let msg = "[null,\"split\",\"phoenix\",\"heartbeat\",{\"x\":\"é\"}]".as_bytes();
    let cut = msg.iter().position(|b| *b == 0xC3).expect("é") + 1;
    raw.whole(0x01, &msg[..cut]);
    raw.whole(0x80, &msg[cut..]);
    raw.whole(0x88, &1000u16.to_be_bytes());
    health("non-UTF-8 text frames");
}

#[test]
fn malformed_binary_frames_are_ignored() {
    let mut rng = Rng::new(0x5eed_0002);
    let mut s = Ws::open("2.0.0");
    assert_eq!(
        s.join("realtime:bin", json!({"broadcast": {"self": true}}))["status"],
        "ok"
    );
    let mut v1 = Ws::open("1.0.0");
    assert_eq!(v1.join("realtime:bin", json!({}))["status"], "ok");
    // Random frames, biased towards the kinds the server decodes.
    for i in 0..2000 {
        let n = rng.below(64);
        let mut f = rng.bytes(n);
        if let Some(first) = f.first_mut() {
            *first = *rng.pick(&[0, 1, 2, 3, 4, 5, 255, *first]);
        }
        s.binary(f);
        if i % 250 == 0 {
            s.drain(Duration::from_millis(10));
        }
    }
    // Structured lies about lengths, for every kind.
    let topic = "realtime:bin";
    let good = kind3("1", "2", topic, "ev", br#"{"a":1}"#);
    for kind in [0u8, 1, 2, 3, 4, 5, 200, 255] {
        let mut f = good.clone();
        f[0] = kind;
        for cut in 0..f.len() {
            s.binary(f[..cut].to_vec());
        }
        for field in 1..7 {
            let mut g = f.clone();
            g[field] = 255;
            s.binary(g);
        }
    }
    // Bad metadata, unknown encodings, invalid UTF-8 in strings, bad JSON payloads.
    let mut meta = vec![3, 1, 1, topic.len() as u8, 2, 5, 1];
    meta.extend_from_slice(b"12");
    meta.extend_from_slice(topic.as_bytes());
    meta.extend_from_slice(b"ev{{{{{{}");
    s.binary(meta);
    for encoding in [2u8, 9, 255] {
        let mut g = good.clone();
        g[6] = encoding;
        s.binary(g);
    }
    let mut bad_utf8 = good.clone();
    bad_utf8[7 + 2 + 3] = 0xFF;
    s.binary(bad_utf8);
    for payload in [
        &b"not json"[..],
        b"",
        b"\xff\xfe",
        b"[1,2",
        b"\"just a string\"",
        b"null",
    ] {
        s.binary(kind3("1", "3", topic, "ev", payload));
    }
    // Deep JSON inside a kind-3 payload: the vsn 1.0.0 subscriber needs it as JSON.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    s.binary(kind3("1", "4", topic, "deep", deep.as_bytes()));
    // A binary frame on a vsn 1.0.0 connection.
    v1.binary(good.clone());
    s.drain(Duration::from_millis(300));
    v1.drain(Duration::from_millis(100));
    assert!(
        s.alive(),
        "the vsn 2.0.0 connection survives bad binary frames"
    );
    assert!(
        v1.alive(),
        "the vsn 1.0.0 connection survives a binary frame"
    );
    health("malformed binary frames");
}

// ---------------------------------------------------------------------------------------------
// Size limits
// ---------------------------------------------------------------------------------------------

/// A vsn 2.0.0 broadcast text frame of exactly `size` bytes.
fn broadcast_of_size(reference: &str, topic: &str, size: usize) -> String {
    let head = format!(
        "[\"1\",\"{reference}\",\"{topic}\",\"broadcast\",{{\"type\":\"broadcast\",\"event\":\"e\",\"payload\":{{\"x\":\""
    );
    let tail = "\"}}]";
    let fill = size - head.len() - tail.len();
    format!("{head}{}{tail}", "a".repeat(fill))
}

#[test]
fn frames_up_to_the_limit_are_handled_and_past_it_close_the_socket() {
    let topic = "realtime:sizes";
    let mut s = Ws::open("2.0.0");
    let config = json!({"broadcast": {"ack": true}});
    assert_eq!(s.join(topic, config.clone())["status"], "ok");
    // A payload just under max_payload_size is delivered; the ack says ok.
    let mut watcher = Ws::open("2.0.0");
    assert_eq!(watcher.join(topic, json!({}))["status"], "ok");
    s.text(broadcast_of_size("under", topic, MAX_PAYLOAD - 1000));
    let ack = s.reply_to("under", WAIT).expect("ack of a 3 MB broadcast");
    assert_eq!(ack.payload["status"], "ok", "{:?}", ack.payload);
    let got = watcher.drain(Duration::from_millis(500));
    assert!(got.iter().any(|m| m.event == "broadcast"), "delivered");
    // A frame of exactly the limit is read; its payload is over max_payload_size.
    s.text(broadcast_of_size("limit", topic, FRAME_LIMIT));
    let reply = s
        .reply_to("limit", WAIT)
        .expect("a frame at the limit is read");
    assert_eq!(
        reply.payload,
        json!({"status": "error", "response": "payload_size_exceeded"})
    );
    assert!(s.alive());
    // One byte more closes that connection (1009 = message too big), and only that one.
    s.text(broadcast_of_size("over", topic, FRAME_LIMIT + 1));
    let closed = s.closes_within(WAIT);
    assert!(closed.is_some(), "a frame past the limit closes the socket");
    assert!(matches!(closed, Some(None | Some(1009))), "{closed:?}");
    assert!(watcher.alive(), "other connections are unaffected");
    health("a text frame one byte past the limit");

    let mut b = Ws::open("2.0.0");
    b.binary(vec![3u8; FRAME_LIMIT + 1]);
    assert!(b.closes_within(WAIT).is_some(), "binary past the limit");
    health("a binary frame past the limit");

    // Lengths the frame header announces but never sends, and fragments summing past it.
    let mut raw = RawWs::open();
    raw.frame(0x82, u64::MAX >> 1, b"abc", true);
    // A clean close: a Close frame (today without a status code), not just a reset.
    let code = raw.closed_within(WAIT);
    assert!(
        matches!(code, Some(c) if c != 0),
        "a 2^63-byte header: {code:?}"
    );
    let mut raw = RawWs::open();
    raw.frame(0x81, (FRAME_LIMIT + 1) as u64, b"[", true);
    let code = raw.closed_within(WAIT);
    assert!(
        matches!(code, Some(c) if c != 0),
        "a header past the limit: {code:?}"
    );
    let mut raw = RawWs::open();
    let piece = vec![b'a'; 1_000_000];
    raw.whole(0x01, &piece);
    for _ in 0..5 {
        if !raw.whole(0x00, &piece) {
            break;
        }
    }
    raw.whole(0x80, &piece);
    let code = raw.closed_within(WAIT);
    assert!(
        matches!(code, Some(c) if c != 0),
        "fragments summing past the limit: {code:?}"
    );
    // Protocol violations: unmasked client frame, reserved opcodes, RSV bits, a 126-byte ping,
    // a continuation with nothing to continue.
    for (first, payload, masked) in [
        (0x81u8, &b"[]"[..], false),
        (0x83, b"x", true),
        (0x8B, b"x", true),
        (0xF1, b"[]", true),
        (0x89, &[0u8; 126][..], true),
        (0x80, b"x", true),
        (0x09, b"", true),
    ] {
        let mut raw = RawWs::open();
        raw.frame(first, payload.len() as u64, payload, masked);
        let _ = raw.closed_within(Duration::from_secs(2));
    }
    health("WebSocket protocol violations");
}

// ---------------------------------------------------------------------------------------------
// Join storms
// ---------------------------------------------------------------------------------------------

#[test]
fn join_storms() {
    let mut s = Ws::open("2.0.0");
    let mut ok = 0;
    let limited = std::sync::atomic::AtomicUsize::new(0);
    let count_limited = |got: &[Message]| {
        let n = got
            .iter()
            .filter(|m| {
                m.payload["response"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("ClientJoinRateLimitReached"))
            })
            .count();
        limited.fetch_add(n, Ordering::Relaxed);
    };
    for i in 0..400 {
        let private = i % 4 == 3;
        let topic = format!("realtime:storm-{}", i % 37);
        let r = s.next_ref();
        s.push(
            Some(&r),
            &r,
            &topic,
            "phx_join",
            json!({"config": {"private": private, "presence": {"enabled": i % 2 == 0}}}),
        );
        let l = s.next_ref();
        s.push(Some(&r), &l, &topic, "phx_leave", json!({}));
        if i % 50 == 49 {
            let got = s.drain(Duration::from_millis(50));
            count_limited(&got);
            ok += got
                .iter()
                .filter(|m| m.event == "phx_reply" && m.payload["status"] == "ok")
                .count();
        }
    }
    let got = s.drain(Duration::from_millis(500));
    count_limited(&got);
    ok += got
        .iter()
        .filter(|m| m.event == "phx_reply" && m.payload["status"] == "ok")
        .count();
    assert!(
        limited.load(Ordering::Relaxed) > 0,
        "a storm of joins was never rate-limited"
    );
    // The burst of joins (50) goes through: every public pair gives two ok replies; private
    // joins with no policy are refused. Past the burst, joins are refused with the rate limit.
    assert!(ok >= 60, "ok replies: {ok}");
    assert!(s.alive(), "the storming connection still answers");
    drop(s);
    health("400 join/leave pairs on one socket");

    // Joins without leaves, paced under realtime.joins_per_second (20), stop at
    // max_channels_per_connection (100).
    let mut s = Ws::open("2.0.0");
    let mut reasons = Vec::new();
    for i in 0..110 {
        if i >= 40 {
            std::thread::sleep(Duration::from_millis(60));
        }
        let reply = s.join(&format!("realtime:many-{i}"), json!({}));
        reasons.push(reply);
    }
    assert!(reasons[..100].iter().all(|r| r["status"] == "ok"));
    for r in &reasons[100..] {
        assert_eq!(
            r["response"]["reason"], "ChannelRateLimitReached: Too many channels",
            "{r}"
        );
    }
    drop(s);

    // Many sockets join one topic at once, then all of them receive one message from SQL.
    let n = 200;
    let threads: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let vsn = if i % 2 == 0 { "2.0.0" } else { "1.0.0" };
                let mut s = Ws::open(vsn);
                let reply = s.join("realtime:crowd", json!({}));
                (s, reply)
            })
        })
        .collect();
    let mut sockets: Vec<Ws> = threads
        .into_iter()
        .map(|t| {
            let (s, reply) = t.join().expect("joiner thread");
            assert_eq!(reply["status"], "ok", "{reply}");
            s
        })
        .collect();
    sentinel(fixture())
        .batch_execute(
            "SELECT realtime.send('{\"hi\":1}', 'crowd-event', 'crowd', private => false)",
        )
        .expect("send");
    for (i, s) in sockets.iter_mut().enumerate() {
        let got = s.drain(Duration::from_millis(300));
        let got = if got.iter().any(|m| m.event == "broadcast") {
            got
        } else {
            s.drain(WAIT)
        };
        assert!(
            got.iter()
                .any(|m| m.event == "broadcast" && m.payload["event"] == "crowd-event"),
            "socket {i} got {got:?}"
        );
    }
    drop(sockets);
    health("200 sockets joining at once");
}

/// Private joins each cost the worker a read check; pairs sent at network speed must not stall
/// delivery from SQL to everyone else.
#[test]
fn a_private_join_storm_does_not_stall_delivery() {
    let mut s = Ws::open("2.0.0");
    for i in 0..3000 {
        let topic = format!("realtime:private-storm-{}", i % 50);
        let r = format!("p{i}");
        s.push(
            Some(&r),
            &r,
            &topic,
            "phx_join",
            json!({"config": {"private": true, "presence": {"enabled": i % 2 == 0}}}),
        );
        s.push(Some(&r), &format!("l{i}"), &topic, "phx_leave", json!({}));
        if i % 500 == 499 {
            s.drain(Duration::from_millis(1));
        }
    }
    let started = Instant::now();
    health("right after 3000 private join/leave pairs");
    eprintln!(
        "health check after the private storm took {:?}",
        started.elapsed()
    );
    // A private join of another client is answered while the storm's checks drain.
    let mut other = Ws::open("2.0.0");
    let reply = other.join("realtime:after-storm", json!({"private": true}));
    assert_eq!(reply["status"], "error", "{reply}");
    s.drain(Duration::from_millis(200));
    assert!(s.alive());
    health("after a private join storm");
}

/// A subscriber that stops reading is disconnected once `realtime.outbound_queue` frames wait
/// for it; the publisher and everyone else carry on.
#[test]
fn a_client_that_never_reads_is_disconnected() {
    let topic = "realtime:firehose";
    let mut sleeper = Ws::open("2.0.0");
    assert_eq!(sleeper.join(topic, json!({}))["status"], "ok");
    let mut publisher = Ws::open("2.0.0");
    assert_eq!(publisher.join(topic, json!({}))["status"], "ok");
    let payload = format!("{{\"x\":\"{}\"}}", "f".repeat(10_000));
    for i in 0..4000 {
        publisher.binary(kind3(
            "1",
            &i.to_string(),
            topic,
            "flood",
            payload.as_bytes(),
        ));
    }
    assert!(publisher.alive(), "the publisher is not held back");
    health("a subscriber that never reads");
    // Reading now drains what the kernel held, then finds the connection closed.
    let closed = sleeper.closes_within(Duration::from_secs(30));
    assert!(closed.is_some(), "the slow subscriber was disconnected");
    health("after the slow subscriber was dropped");
}

// ---------------------------------------------------------------------------------------------
// Odd topics
// ---------------------------------------------------------------------------------------------

#[test]
fn odd_topics() {
    let mut s = Ws::open("2.0.0");
    let mut v1 = Ws::open("1.0.0");
    // Without the realtime: prefix a topic matches no channel.
    for topic in ["", "room", "phoenix:x", "REALTIME:x", " realtime:x"] {
        for ws in [&mut s, &mut v1] {
            let reply = ws.join(topic, json!({}));
            assert_eq!(
                reply,
                json!({"status": "error", "response": {"reason": "unmatched topic"}}),
                "{topic:?}"
            );
        }
    }
    let reply = s.join("realtime:", json!({}));
    assert_eq!(
        reply["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );
    // Topics that are valid text: joined, and a message sent from SQL arrives.
    let long_unicode = "é🙂".repeat(40);
    let deliverable = [
        "é",
        "日本語",
        "🙂🙃👨‍👩‍👧",
        "\u{202e}tfel-ot-thgir\u{202c}",
        "שלום",
        "%00",
        "a b\tc\r\n",
        "'; DROP TABLE realtime.messages; --",
        "realtime:realtime:",
        long_unicode.as_str(),
    ];
    for (i, sub) in deliverable.iter().enumerate() {
        let topic = format!("realtime:{sub}");
        assert_eq!(s.join(&topic, json!({}))["status"], "ok", "{sub:?}");
        sentinel(fixture())
            .execute(
                "SELECT realtime.send(jsonb_build_object('i', $1::int4), 'odd', $2, private => false)",
                &[&(i as i32), sub],
            )
            .unwrap_or_else(|e| panic!("send to {sub:?}: {e}"));
        let got = s.drain(Duration::from_millis(300));
        let got = if got.iter().any(|m| m.event == "broadcast") {
            got
        } else {
            s.drain(Duration::from_secs(3))
        };
        assert!(
            got.iter().any(|m| m.event == "broadcast"
                && m.topic == topic
                && m.payload["payload"]["i"] == json!(i)),
            "{sub:?}: {got:?}"
        );
    }
    // Topics Postgres text cannot hold or the database refuses: joining must not hurt.
    let huge = "t".repeat(100_000);
    let huge_unicode = "🙂".repeat(25_000);
    for sub in [
        "\u{0000}",
        "a\u{0000}b",
        huge.as_str(),
        huge_unicode.as_str(),
    ] {
        let topic = format!("realtime:{sub}");
        for private in [false, true] {
            let reply = s.join(&topic, json!({"private": private}));
            assert!(
                reply["status"] == "ok" || reply["status"] == "error",
                "{reply}"
            );
        }
        let reply = v1.join(&topic, json!({}));
        assert!(reply["status"] == "ok" || reply["status"] == "error");
    }
    s.drain(Duration::from_millis(200));
    assert!(s.alive());
    assert!(v1.alive());
    health("odd topics");
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

fn track(s: &mut Ws, topic: &str, meta: Value) -> Option<Message> {
    let r = s.next_ref();
    s.push(
        None,
        &r,
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": meta}),
    );
    s.reply_to(&r, WAIT)
}

#[test]
fn presence_floods() {
    // More calls than presence_calls_limit (5 per window) close the channel, as Supabase does.
    let mut s = Ws::open("2.0.0");
    let topic = "realtime:flood";
    let config = json!({"presence": {"enabled": true, "key": "flooder"}});
    assert_eq!(s.join(topic, config)["status"], "ok");
    for i in 0..5 {
        let reply = track(&mut s, topic, json!({"i": i})).expect("track reply");
        assert_eq!(reply.payload["status"], "ok");
    }
    let r = s.next_ref();
    s.push(
        Some("1"),
        &r,
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"i": 5}}),
    );
    for _ in 0..500 {
        s.push(
            Some("1"),
            "x",
            topic,
            "presence",
            json!({"type": "presence", "event": "track", "payload": {}}),
        );
    }
    let got = s.drain(Duration::from_millis(500));
    assert!(
        got.iter().any(|m| m.event == "system"
            && m.payload["message"] == "Client presence rate limit exceeded"),
        "{got:?}"
    );
    assert!(got.iter().any(|m| m.event == "phx_close"));
    assert!(s.alive());
    health("a flood of track frames");

    // Big metas from many clients, each just under realtime.max_presence_meta_size (32 kB);
    // each later joiner gets the whole state.
    let (rss0, _) = worker_memory_kb();
    let big = "m".repeat(30_000);
    let mut trackers = Vec::new();
    for i in 0..20 {
        let mut t = Ws::open("2.0.0");
        let key = format!("big-{i}");
        let config = json!({"presence": {"enabled": true, "key": key}});
        assert_eq!(t.join("realtime:heavy", config)["status"], "ok");
        let reply = track(&mut t, "realtime:heavy", json!({"blob": big})).expect("track");
        assert_eq!(reply.payload["status"], "ok");
        t.drain(Duration::from_millis(20));
        trackers.push(t);
    }
    // A meta over realtime.max_presence_meta_size is refused; one over max_payload_size
    // closes that channel.
    let mut over = Ws::open("2.0.0");
    let config = json!({"presence": {"enabled": true, "key": "over"}});
    assert_eq!(over.join("realtime:heavy", config)["status"], "ok");
    over.drain(Duration::from_millis(200));
    let reply = track(
        &mut over,
        "realtime:heavy",
        json!({"blob": "m".repeat(40_000)}),
    )
    .expect("track reply");
    assert_eq!(reply.payload["status"], "error", "{:?}", reply.payload);
    assert!(
        reply.payload["response"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("Presence meta is too large")),
        "{:?}",
        reply.payload
    );
    let r = over.next_ref();
    over.push(
        Some("1"),
        &r,
        "realtime:heavy",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"blob": "m".repeat(MAX_PAYLOAD + 10)}}),
    );
    let got = over.drain(Duration::from_millis(1000));
    assert!(
        got.iter()
            .any(|m| m.event == "system" && m.payload["message"] == "Track message size exceeded"),
        "{:?}",
        got.iter().map(|m| &m.event).collect::<Vec<_>>()
    );
    let mut late = Ws::open("2.0.0");
    assert_eq!(
        late.join("realtime:heavy", json!({"presence": {"enabled": true}}))["status"],
        "ok"
    );
    let state = late
        .drain(Duration::from_millis(500))
        .into_iter()
        .find(|m| m.event == "presence_state")
        .expect("presence_state");
    assert_eq!(
        state.payload.as_object().map(|o| o.len()),
        Some(20),
        "the late joiner sees all 20 keys"
    );
    let (rss1, hwm1) = worker_memory_kb();
    eprintln!("worker memory: rss {rss0} kB before, {rss1} kB after 20 x 1 MB metas (hwm {hwm1})");
    drop(trackers);
    drop(late);
    health("20 presence metas of 1 MB each");

    // A meta with a NUL character: Postgres jsonb cannot store it; the worker must cope.
    let mut a = Ws::open("2.0.0");
    let config = json!({"presence": {"enabled": true, "key": "nul"}});
    assert_eq!(a.join("realtime:nul-room", config)["status"], "ok");
    let reply = track(&mut a, "realtime:nul-room", json!({"a": "\u{0000}"})).expect("track");
    assert!(reply.payload["status"] == "ok" || reply.payload["status"] == "error");
    assert!(a.alive());
    health("a presence meta containing NUL");
}

/// One client's meta with `"\u0000"` must not stop others' presence from reaching
/// `realtime.presence()`: jsonb refuses NUL, and the mirror writes metas in batches.
#[test]
fn a_nul_meta_does_not_hide_other_clients_presence_from_sql() {
    let mut a = Ws::open("2.0.0");
    let mut b = Ws::open("2.0.0");
    for (s, key) in [(&mut a, "a"), (&mut b, "b")] {
        let config = json!({"presence": {"enabled": true, "key": key}});
        assert_eq!(s.join("realtime:mirror", config)["status"], "ok");
    }
    let ra = a.next_ref();
    let rb = b.next_ref();
    // Both in the same instant, so they share a mirror batch.
    a.push(
        Some("1"),
        &ra,
        "realtime:mirror",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"a": "\u{0000}"}}),
    );
    b.push(
        Some("1"),
        &rb,
        "realtime:mirror",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"ok": true}}),
    );
    let seen = eventually(WAIT, || {
        sentinel(fixture())
            .query_one(
                "SELECT count(*) FROM realtime.presence('mirror') WHERE key = 'b'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    });
    let log = fixture().log();
    let related: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("presence") || l.contains("\\u0000"))
        .collect();
    assert!(
        seen,
        "b's presence reaches SQL; log:\n{}",
        related.join("\n")
    );
    health("presence mirror with a NUL meta");
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The refusal of a WebSocket connect: (status, `error` text).
fn connect_refusal(token: &str) -> Option<(u16, String)> {
    match Ws::open_with(token, "2.0.0") {
        Err(tungstenite::Error::Http(response)) => {
            let body = json_body(response.body().as_deref().unwrap_or_default());
            Some((
                response.status().as_u16(),
                body["error"].as_str().unwrap_or_default().to_string(),
            ))
        }
        Err(e) => panic!("{token:.40}: connect failed without an HTTP answer: {e}"),
        Ok(_) => None,
    }
}

#[test]
fn bad_tokens_are_refused() {
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let exp = now() + 3600;
    let header_only = b64url(hs.to_string().as_bytes());
    let none_token = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(json!({"role": "anon", "exp": exp}).to_string().as_bytes())
    );
    let malformed = "The token provided is not a valid JWT";
    let cases: Vec<(String, &str)> = vec![
        ("garbage".into(), malformed),
        ("a.b.c".into(), malformed),
        ("...".into(), malformed),
        ("🙂.🙂.🙂".into(), malformed),
        (none_token.clone(), malformed),
        (
            sign_json(&hs, &json!({"role": "anon", "exp": exp}), "wrong-secret"),
            "Failed to validate JWT signature",
        ),
        (
            sign_json(
                &json!({"alg": "HS512", "typ": "JWT"}),
                &json!({"role": "anon", "exp": exp}),
                JWT_SECRET,
            ),
            "Failed to validate JWT signature",
        ),
        (
            sign_json(&hs, &json!({"role": "anon", "exp": now() - 10}), JWT_SECRET),
            "Token has expired",
        ),
        (
            sign_json(&hs, &json!({"role": "anon"}), JWT_SECRET),
            "Fields `role` and `exp` are required in JWT",
        ),
        (
            sign_json(&hs, &json!({"role": "", "exp": exp}), JWT_SECRET),
            "Fields `role` and `exp` are required in JWT",
        ),
        (
            sign_json(&hs, &json!({"role": 5, "exp": exp}), JWT_SECRET),
            "Fields `role` and `exp` are required in JWT",
        ),
        (
            sign_json(&hs, &json!({"role": "anon", "exp": "soon"}), JWT_SECRET),
            malformed,
        ),
        (sign_json(&hs, &json!([1, 2]), JWT_SECRET), malformed),
    ];
    // A valid header with nothing after it: either refusal text is fair.
    let refusal = connect_refusal(&format!("{header_only}.."));
    assert!(
        matches!(&refusal, Some((401, r)) if r == malformed || r == "Failed to validate JWT signature"),
        "{refusal:?}"
    );
    for (token, reason) in &cases {
        let refusal = connect_refusal(token);
        assert_eq!(
            refusal,
            Some((401, reason.to_string())),
            "token {token:.60}"
        );
    }
    health("bad connect tokens");

    // A 100 kB token in the query string: refused as too long a URI (or as a JWT).
    let huge_valid = jwt(json!({"pad": "p".repeat(100_000)}));
    let huge_garbage = "g".repeat(100_000);
    for token in [&huge_valid, &huge_garbage] {
        let mut s = tcp();
        let path = format!("/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
        let _ = s.write_all(upgrade_request(&path, Some(KEY), "13").as_bytes());
        let (status, _) = read_response(&mut s);
        assert!(
            status == 414 || status == 401,
            "a 100 kB token in the query string: {status}"
        );
    }
    // The same in the x-api-key header: garbage gets the documented refusal, a valid token is
    // just a token.
    let header_upgrade = |token: &str| {
        let mut s = tcp();
        let mut req = upgrade_request("/realtime/v1/websocket?vsn=2.0.0", Some(KEY), "13");
        req.insert_str(req.len() - 2, &format!("x-api-key: {token}\r\n"));
        let _ = s.write_all(req.as_bytes());
        s
    };
    let mut s = header_upgrade(&huge_garbage);
    let (status, body) = read_response(&mut s);
    assert_eq!(
        (status, json_body(&body)),
        (
            401,
            json!({"error": "The token provided is not a valid JWT"})
        )
    );
    let mut s = header_upgrade(&huge_valid);
    assert_eq!(read_response_head(&mut s), Some(101));
    // Many refused connects at the same moment.
    let threads: Vec<_> = (0..100)
        .map(|i| {
            std::thread::spawn(move || {
                let token = if i % 2 == 0 {
                    format!("garbage-{i}")
                } else {
                    sign_json(
                        &json!({"alg": "HS256", "typ": "JWT"}),
                        &json!({"role": "anon", "exp": now() + 60}),
                        "wrong-secret",
                    )
                };
                connect_refusal(&token).map(|(status, _)| status)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), Some(401));
    }
    health("100 kB tokens and 100 concurrent refusals at connect");

    // Tokens a channel gets later: bad ones close that channel with a system error.
    let mut s = Ws::open("2.0.0");
    let refresh_cases: Vec<(String, &str)> = vec![
        ("garbage".into(), "The token provided is not a valid JWT"),
        (none_token, "The token provided is not a valid JWT"),
        (
            huge_garbage.clone(),
            "The token provided is not a valid JWT",
        ),
        (
            sign_json(&hs, &json!({"role": "anon", "exp": exp}), "wrong-secret"),
            "Failed to validate JWT signature",
        ),
        (
            sign_json(&hs, &json!({"role": "anon", "exp": now() - 10}), JWT_SECRET),
            "Token has expired",
        ),
        (
            sign_json(&hs, &json!({"role": "anon"}), JWT_SECRET),
            "Fields `role` and `exp` are required in JWT",
        ),
    ];
    for (i, (token, message)) in refresh_cases.iter().enumerate() {
        let topic = format!("realtime:refresh-{i}");
        assert_eq!(s.join(&topic, json!({}))["status"], "ok");
        let r = s.next_ref();
        s.push(
            Some("1"),
            &r,
            &topic,
            "access_token",
            json!({"access_token": token}),
        );
        let got = s.drain(Duration::from_millis(300));
        let system = got
            .iter()
            .find(|m| m.event == "system" && m.topic == topic)
            .unwrap_or_else(|| panic!("refresh {i}: no system message in {got:?}"));
        let text = system.payload["message"].as_str().unwrap_or_default();
        assert!(text.starts_with(message), "refresh {i}: {text}");
        assert!(
            got.iter()
                .any(|m| m.event == "phx_close" && m.topic == topic)
        );
    }
    // A huge but valid token is just a token.
    assert_eq!(s.join("realtime:refresh-big", json!({}))["status"], "ok");
    s.push(
        Some("1"),
        "big",
        "realtime:refresh-big",
        "access_token",
        json!({"access_token": huge_valid}),
    );
    let got = s.drain(Duration::from_millis(300));
    assert!(!got.iter().any(|m| m.event == "phx_close"), "{got:?}");
    // Join with a bad access_token in the payload: the documented join reasons.
    let r = s.next_ref();
    s.push(
        Some(&r),
        &r,
        "realtime:join-token",
        "phx_join",
        json!({"config": {}, "access_token": "garbage"}),
    );
    let reply = s.reply_to(&r, WAIT).expect("join reply");
    assert_eq!(
        reply.payload["response"]["reason"],
        "MalformedJWT: The token provided is not a valid JWT"
    );
    assert!(s.alive());
    health("bad tokens after connect");

    // Roles Postgres does not know or that mean something else: connect works, private
    // joins with no policies on realtime.messages are refused, and nothing breaks.
    for role in ODD_ROLES {
        let token = sign_json(&hs, &json!({"role": role, "exp": exp}), JWT_SECRET);
        let mut s = Ws::open_with(&token, "2.0.0").expect("connects");
        let reply = s.join("realtime:role-check", json!({"private": true}));
        assert_eq!(reply["status"], "error", "role {role:?}: {reply}");
        let reason = reply["response"]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("Unauthorized: "),
            "role {role:?}: {reason}"
        );
        assert_eq!(s.join("realtime:role-public", json!({}))["status"], "ok");
    }
    health("unknown roles");
}

const ODD_ROLES: [&str; 4] = ["nosuchrole", "anon; DROP TABLE x", "\u{0000}", "ANON"];

/// A role the database does not know is refused with a reason that says so (a clearer answer
/// than Supabase's generic one, which gives no hint that the token is at fault).
#[test]
fn unknown_roles_get_a_reason_naming_the_role() {
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    for role in ODD_ROLES {
        let token = sign_json(&hs, &json!({"role": role, "exp": now() + 3600}), JWT_SECRET);
        let mut s = Ws::open_with(&token, "2.0.0").expect("connects");
        let reply = s.join("realtime:role-check", json!({"private": true}));
        let reason = reply["response"]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("Unauthorized: ") && reason.contains("role"),
            "role {role:?}: {reply}"
        );
    }
    health("unknown roles");
}

/// `role: "none"` is Postgres's RESET ROLE: as the worker is a superuser session, a token
/// with it (or with a superuser's name) must not bypass row-level security.
#[test]
fn roles_that_mean_superuser_are_refused_private_access() {
    let exp = now() + 3600;
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    for role in ["none", "postgres"] {
        let token = sign_json(&hs, &json!({"role": role, "exp": exp}), JWT_SECRET);
        // Refused at connect (`none` is never a role) or at join (a superuser).
        let Ok(mut s) = Ws::open_with(&token, "2.0.0") else {
            continue;
        };
        let reply = s.join("realtime:su-check", json!({"private": true}));
        assert_eq!(reply["status"], "error", "role {role:?}: {reply}");
    }
    health("superuser roles");
}

// ---------------------------------------------------------------------------------------------
// Half-open handshakes
// ---------------------------------------------------------------------------------------------

#[test]
fn half_open_handshakes() {
    let token = jwt(json!({}));
    let path = format!("/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
    let full = upgrade_request(&path, Some(KEY), "13");
    let mut held: Vec<TcpStream> = Vec::new();
    // TCP connections that never say anything.
    for _ in 0..100 {
        held.push(tcp());
    }
    // Half an upgrade request.
    for i in 0..100 {
        let mut s = tcp();
        let cut = 1 + (i * 7) % (full.len() - 2);
        let _ = s.write_all(&full.as_bytes()[..cut]);
        held.push(s);
    }
    // Upgraded, then half a frame header or half a frame body.
    for i in 0..50 {
        let mut raw = RawWs::open();
        if i % 2 == 0 {
            let _ = raw.s.write_all(&[0x81]);
        } else {
            raw.frame(0x81, 1000, b"[null,\"1\",", true);
        }
        held.push(raw.s);
    }
    health("250 half-open connections held");
    // Bad handshakes are refused with a client error.
    for (key, version) in [
        (None, "13"),
        (Some(KEY), "12"),
        (Some(KEY), "x"),
        (Some(KEY), ""),
    ] {
        let mut s = tcp();
        let _ = s.write_all(upgrade_request(&path, key, version).as_bytes());
        let (status, _) = read_response(&mut s);
        assert!(
            (400..500).contains(&status),
            "key {key:?} version {version:?}: {status}"
        );
    }
    // Keys that are not 16 bytes of base64: whatever the answer, nothing breaks.
    for key in [
        "",
        "!!!",
        "a",
        &"A".repeat(10_000),
        "dGhlIHNhbXBsZSBub25jZQ",
    ] {
        let mut s = tcp();
        let _ = s.write_all(upgrade_request(&path, Some(key), "13").as_bytes());
        let _ = read_response_head(&mut s);
    }
    // Requests that are not HTTP, or not the right HTTP.
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /realtime/v1/websocket HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /realtime/v1/websocket HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /realtime/v1/websocket?apikey=%ZZ&vsn=%FF HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET /realtime/v1/websocket HTTP/9.9\r\n\r\n",
    ] {
        let mut s = tcp();
        let _ = s.write_all(junk);
        let _ = read_response_head(&mut s);
    }
    // Drop mid-frame on a joined connection.
    for _ in 0..20 {
        let mut raw = RawWs::open();
        let join =
            br#"["1","1","realtime:dropped","phx_join",{"config":{"presence":{"enabled":true}}}]"#;
        raw.whole(0x81, join);
        raw.frame(0x81, 500, b"[\"1\",\"2\",\"realtime:dropped\"", true);
        drop(raw);
    }
    // Many of these at the same time, from threads.
    let threads: Vec<_> = (0..40)
        .map(|i| {
            let full = full.clone();
            std::thread::spawn(move || {
                let mut s = tcp();
                let _ = s.write_all(&full.as_bytes()[..(i * 13) % full.len()]);
                std::thread::sleep(Duration::from_millis(200));
                drop(s);
                let mut raw = RawWs::open();
                raw.frame(0x82, 100_000, &[3u8; 100], true);
                drop(raw);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    health("bad and dropped handshakes");
    drop(held);
    health("after the half-open connections closed");
}

fn read_response_head(s: &mut TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&buf, b"\r\n\r\n").is_none() {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

const BATCH: &str = "/realtime/v1/api/broadcast";

#[test]
fn bad_rest_bodies() {
    let token = jwt(json!({}));
    let bearer = format!("Bearer {token}");
    let auth: &[(&str, &str)] = &[
        ("Authorization", &bearer),
        ("Content-Type", "application/json"),
    ];
    let valid = br#"{"messages":[{"topic":"rest","event":"e","payload":{"a":1}}]}"#;
    // Missing or bad auth.
    for headers in [
        &[("Content-Type", "application/json")][..],
        &[("Authorization", "Bearer garbage")],
        &[("Authorization", "Basic dXNlcjpwYXNz")],
        &[("Authorization", "Bearer")],
        &[("apikey", "")],
    ] {
        let (status, body) = http("POST", BATCH, headers, valid);
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(json_body(&body), json!({"message": "Unauthorized"}));
        let (status, _) = http(
            "POST",
            "/realtime/v1/api/broadcast/t/events/e",
            headers,
            b"{}",
        );
        assert_eq!(status, 401);
    }
    // Bodies that are not a batch.
    let blank = json!({"errors": {"messages": ["can't be blank"]}});
    for body in [
        &b""[..],
        b"not json",
        b"{",
        b"[]",
        b"null",
        b"{\"messages\": 5}",
        b"{\"messages\": \"x\"}",
        b"{\"messages\": {}}",
        b"{\"messages\": null}",
        b"\xff\xfe",
    ] {
        let (status, got) = http("POST", BATCH, auth, body);
        assert_eq!(status, 422, "{}", String::from_utf8_lossy(body));
        assert_eq!(json_body(&got), blank);
    }
    // Messages of the wrong shape: 422 with one error object per message.
    let (status, got) = http(
        "POST",
        BATCH,
        auth,
        br#"{"messages":[5,{"topic":1,"event":"","payload":[],"private":"maybe","id":7},{}]}"#,
    );
    assert_eq!(status, 422);
    let errors = json_body(&got);
    assert_eq!(
        errors["errors"]["messages"][0]["message"],
        json!(["is invalid"])
    );
    assert_eq!(
        errors["errors"]["messages"][1]["private"],
        json!(["is invalid"])
    );
    // An array of 100k numbers.
    let (_, hwm0) = worker_memory_kb();
    let numbers = format!("{{\"messages\":[{}0]}}", "0,".repeat(99_999));
    let started = Instant::now();
    let (status, got) = http("POST", BATCH, auth, numbers.as_bytes());
    assert_eq!(status, 422);
    let (_, hwm1) = worker_memory_kb();
    eprintln!(
        "100k numbers: {} byte response, worker VmHWM {hwm0} -> {hwm1} kB, {:?}",
        got.len(),
        started.elapsed()
    );
    health("a REST batch of 100k numbers");
    // Huge strings: a payload over max_payload_size, a topic of 1 MB, a body over the limit.
    let big_payload = format!(
        "{{\"messages\":[{{\"topic\":\"rest\",\"event\":\"e\",\"payload\":{{\"x\":\"{}\"}}}}]}}",
        "a".repeat(MAX_PAYLOAD + 10)
    );
    let (status, got) = http("POST", BATCH, auth, big_payload.as_bytes());
    assert_eq!(status, 422);
    assert_eq!(
        json_body(&got)["errors"]["messages"][0]["payload"],
        json!(["Payload size exceeds tenant limit"])
    );
    let big_topic = format!(
        "{{\"messages\":[{{\"topic\":\"{}\",\"event\":\"{}\",\"payload\":{{}}}}]}}",
        "t".repeat(1_000_000),
        "e".repeat(1_000_000)
    );
    let (status, _) = http("POST", BATCH, auth, big_topic.as_bytes());
    assert!(status == 202 || status == 422, "{status}");
    let over = vec![b' '; FRAME_LIMIT + 1];
    let (status, _) = http("POST", BATCH, auth, &over);
    assert_eq!(status, 413, "a body past the limit");
    health("huge REST strings");

    // The single-message endpoint.
    let single = "/realtime/v1/api/broadcast/rest/events/e";
    for (ctype, body, want) in [
        ("text/plain", &b"{}"[..], 415),
        ("", b"{}", 415),
        ("application/x-www-form-urlencoded", b"a=1", 415),
        ("multipart/form-data; boundary=x", b"--x--", 415),
        ("application/json", b"not json", 422),
        ("application/json", b"{", 422),
        ("application/json", b"", 422),
        ("application/json; charset=utf-8", b"{\"a\":1}", 202),
        ("application/octet-stream", b"\x00\xff\x00", 202),
    ] {
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", ctype)];
        let (status, got) = http("POST", single, &headers, body);
        assert_eq!(
            status,
            want,
            "{ctype:?} {:?}: {}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&got)
        );
    }
    let octet = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/octet-stream"),
    ];
    let (status, _) = http("POST", single, &octet, &vec![0u8; MAX_PAYLOAD + 1]);
    assert_eq!(status, 422, "a single payload over max_payload_size");
    // Bodies that are JSON but not objects, and an empty binary body: accepted or refused,
    // both are answers.
    for (ctype, body) in [
        ("APPLICATION/JSON", &b"[1,2]"[..]),
        ("application/json", b"5"),
        ("application/octet-stream", b""),
    ] {
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", ctype)];
        let (status, _) = http("POST", single, &headers, body);
        assert!(status == 202 || status == 422, "{ctype}: {status}");
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (status, _) = http("POST", single, auth, deep.as_bytes());
    assert!(status == 202 || status == 422, "deep JSON: {status}");
    // Odd paths.
    for path in [
        "/realtime/v1/api/broadcast/%00/events/%FF",
        "/realtime/v1/api/broadcast//events/e",
        "/realtime/v1/api/broadcast/t/events/",
        "/realtime/v1/api/broadcast/%F0%9F%99%82/events/%E2%80%AE",
        "/realtime/v1/api/broadcast/..%2F..%2F/events/e",
    ] {
        let (status, _) = http("POST", path, auth, b"{}");
        assert!((200..500).contains(&status), "{path}: {status}");
    }
    health("bad single-message REST requests");

    // Broken HTTP: a Content-Length longer than the body, garbage chunked encoding, GET.
    let mut s = tcp();
    let _ = s.write_all(
        format!(
            "POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\nContent-Length: 100000\r\n\r\n{{\"messages\":"
        )
        .as_bytes(),
    );
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = read_response(&mut s);
    let mut s = tcp();
    let _ = s.write_all(
        format!(
            "POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    let (status, _) = read_response(&mut s);
    assert!(
        status == 0 || status == 400,
        "bad chunked encoding: {status}"
    );
    let (status, _) = http("GET", BATCH, auth, b"");
    assert_eq!(status, 405);
    let (status, _) = http("OPTIONS", BATCH, &[], b"");
    assert_eq!(status, 204);

    // After all that, a valid request still reaches a subscriber.
    let mut sub = Ws::open("2.0.0");
    assert_eq!(sub.join("realtime:rest", json!({}))["status"], "ok");
    let (status, _) = http("POST", BATCH, auth, valid);
    assert_eq!(status, 202);
    let got = sub.drain(Duration::from_millis(500));
    assert!(
        got.iter()
            .any(|m| m.event == "broadcast" && m.payload["payload"] == json!({"a": 1})),
        "{got:?}"
    );
    health("bad REST requests");
}

/// A 5 MB batch of numbers must not cost the worker gigabytes (it once did: the batch was
/// parsed into one `Value` and an error object built per element), and is answered briefly.
#[test]
fn a_5_mb_rest_batch_stays_small_in_memory() {
    let token = jwt(json!({}));
    let bearer = format!("Bearer {token}");
    let auth = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = format!(
        "{{\"messages\":[{}1]}}",
        "1,".repeat((FRAME_LIMIT - 20) / 2)
    );
    let (_, hwm0) = worker_memory_kb();
    let started = Instant::now();
    let (status, got) = http_within(
        Duration::from_secs(300),
        "POST",
        BATCH,
        &auth,
        body.as_bytes(),
    );
    let (_, hwm1) = worker_memory_kb();
    eprintln!(
        "status {status} after {:?}, response {} bytes, VmHWM {hwm0} -> {hwm1} kB",
        started.elapsed(),
        got.len()
    );
    assert_eq!(status, 422);
    assert!(
        hwm1.saturating_sub(hwm0) < 100_000,
        "VmHWM grew by {} kB",
        hwm1 - hwm0
    );
    assert!(got.len() < 1_000_000, "response of {} bytes", got.len());
    health("a 5 MB REST batch");
}
