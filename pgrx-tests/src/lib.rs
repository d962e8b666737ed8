//! A throwaway PostgreSQL 15 cluster with pg_realtime preloaded, for integration tests.
//!
//! The extension must already be installed into the system PostgreSQL (`cargo pgrx install`);
//! `scripts/test` does that. Servers refuse to run as root, so the cluster runs as `postgres`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use realtime_test_client::phoenix;
/// Frames and messages as the tests see them (decoded by the shared test client).
pub use realtime_test_client::{Frame, Message};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The HS256 secret every test cluster is configured with.
pub const JWT_SECRET: &str = "integration-test-secret-with-at-least-32-bytes";

pub struct Cluster {
    pub data: PathBuf,
    pub pg_port: u16,
    pub ws_port: u16,
    /// Set by a test that SIGKILLs a server process itself: that crash (and only a SIGKILL) is
    /// not reported as one.
    killed_on_purpose: std::sync::atomic::AtomicBool,
}

/// Log lines that mean a server process died or the cluster reinitialized.
const CRASH_MARKERS: [&str; 3] = ["terminated by signal", "PANIC", "reinitializing"];

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn as_postgres(program: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .expect("runuser runs")
}

fn check(what: &str, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Cluster {
    /// A new cluster with the extension preloaded and created in database `postgres`.
    /// `settings` are extra postgresql.conf lines.
    pub fn start(name: &str, settings: &[&str]) -> Cluster {
        Self::start_with(name, settings, true)
    }

    /// Like [`Cluster::start`]; `preload: false` leaves pg_realtime out of
    /// shared_preload_libraries and does not create the extension.
    pub fn start_with(name: &str, settings: &[&str], preload: bool) -> Cluster {
        let data = PathBuf::from(format!("/tmp/pg_realtime_it/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(data.parent().expect("parent")).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres", "/tmp/pg_realtime_it"])
                .arg(&data)
                .output()
                .expect("chown"),
        );
        let data_str = data.to_str().expect("utf-8 path").to_owned();
        let data_str = data_str.as_str();
        check(
            "initdb",
            as_postgres(
                &format!("{BIN}/initdb"),
                &[
                    "-D",
                    data_str,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                ],
            ),
        );
        let cluster = Cluster {
            data,
            pg_port: free_port(),
            ws_port: free_port(),
            killed_on_purpose: std::sync::atomic::AtomicBool::new(false),
        };
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             max_prepared_transactions = 4\nrealtime.port = {}\nrealtime.listen_addresses = '127.0.0.1'\n\
             realtime.jwt_secret = '{JWT_SECRET}'\nrealtime.connect_error_delay = 0\nrealtime.join_error_delay = 0\n",
            cluster.pg_port, data_str, cluster.ws_port
        );
        if preload {
            conf.push_str("shared_preload_libraries = 'pg_realtime'\n");
        }
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = cluster.data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        cluster.pg_ctl(&["start", "-w"]);
        if preload {
            cluster.execute("CREATE EXTENSION pg_realtime");
            cluster.execute("SELECT realtime.setup_api_roles()");
            cluster.wait_for_server();
        }
        cluster
    }

    /// Waits until the worker accepts connections (it polls for the extension, so it starts
    /// serving a moment after CREATE EXTENSION, and again after a restart).
    pub fn wait_for_server(&self) {
        let ready = eventually(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", self.ws_port)).is_ok()
        });
        assert!(ready, "the worker did not start serving:\n{}", self.log());
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let log = self.data.join("server.log");
        let mut all = vec![
            "-D",
            self.data.to_str().expect("utf-8"),
            "-l",
            log.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(args);
        check("pg_ctl", as_postgres(&format!("{BIN}/pg_ctl"), &all));
    }

    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.pg_port
        )
    }

    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.connection_string(), postgres::NoTls).expect("connect")
    }

    /// Runs SQL in its own connection; panics on error.
    pub fn execute(&self, sql: &str) {
        self.connect()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// The pid of the pg_realtime background worker, if it runs (None while the server is
    /// unreachable, e.g. during crash recovery).
    pub fn worker_pid(&self) -> Option<i32> {
        let mut c = postgres::Client::connect(&self.connection_string(), postgres::NoTls).ok()?;
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'",
            &[],
        )
        .ok()
        .flatten()
        .map(|row| row.get(0))
    }

    pub fn path(&self) -> &Path {
        &self.data
    }

    /// Says that the test SIGKILLs a server process on purpose, so that the restart it causes
    /// is not reported as a crash (any other signal or a PANIC still is).
    pub fn expect_kill(&self) {
        self.killed_on_purpose
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The log lines that show a crash (a process that died by a signal, a PANIC, a restart of
    /// every backend).
    pub fn crash_lines(&self) -> Vec<String> {
        let expected = |l: &str| {
            self.killed_on_purpose
                .load(std::sync::atomic::Ordering::Relaxed)
                && (l.contains("terminated by signal 9") || l.contains("reinitializing"))
        };
        self.log()
            .lines()
            .filter(|l| CRASH_MARKERS.iter().any(|m| l.contains(m)) && !expected(l))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every test is also a crash test: whatever it did, no server process may have died.
        let crashes = if std::thread::panicking() {
            Vec::new()
        } else {
            self.crash_lines()
        };
        let _ = as_postgres(
            &format!("{BIN}/pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "stop",
                "-m",
                "immediate",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.data);
        assert!(
            crashes.is_empty(),
            "the server crashed during the test:\n{}",
            crashes.join("\n")
        );
    }
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held. Used to wait
/// for asynchronous effects, never to assert how long something took.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The SQLSTATE of a statement's outcome (`SUCCESSFUL_COMPLETION` when it succeeded).
pub fn sqlstate(result: Result<impl Sized, postgres::Error>) -> postgres::error::SqlState {
    match result {
        Ok(_) => postgres::error::SqlState::SUCCESSFUL_COMPLETION,
        Err(e) => e
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("no SQLSTATE in {e:?}")),
    }
}

/// An HS256 token for the test clusters' secret: `{"role": "anon", "iat": now, "exp": now +
/// 3600}` with `claims` merged over it.
pub fn jwt(claims: serde_json::Value) -> String {
    let now = realtime_test_client::jwt::now_secs();
    let mut all = serde_json::json!({"role": "anon", "iat": now, "exp": now + 3600});
    if let (Some(all), Some(extra)) = (all.as_object_mut(), claims.as_object()) {
        for (k, v) in extra {
            all.insert(k.clone(), v.clone());
        }
    }
    realtime_test_client::jwt::sign_claims(&all, JWT_SECRET)
}

/// A raw WebSocket client speaking the Phoenix protocol, for frame-level tests.
pub struct Socket {
    ws: Stream,
    pub vsn: &'static str,
    next_ref: u64,
}

impl Socket {
    pub fn connect(cluster: &Cluster, token: &str, vsn: &'static str) -> Socket {
        Self::try_connect(cluster, token, vsn).expect("websocket connects")
    }

    pub fn try_connect(
        cluster: &Cluster,
        token: &str,
        vsn: &'static str,
    ) -> Result<Socket, tungstenite::Error> {
        let url = format!(
            "ws://127.0.0.1:{}/realtime/v1/websocket?apikey={token}&vsn={vsn}",
            cluster.ws_port
        );
        let (ws, _) = tungstenite::connect(url)?;
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        }
        Ok(Socket {
            ws,
            vsn,
            next_ref: 0,
        })
    }

    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// Sends a message in this socket's serializer.
    pub fn push(
        &mut self,
        join_ref: Option<&str>,
        reference: &str,
        topic: &str,
        event: &str,
        payload: serde_json::Value,
    ) {
        let text = phoenix::encode(self.vsn, join_ref, reference, topic, event, payload);
        self.send_text(&text);
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(tungstenite::Message::text(text))
            .expect("send");
    }

    pub fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(tungstenite::Message::binary(bytes))
            .expect("send");
    }

    /// The next frame, or None when nothing arrives within `limit`.
    pub fn recv(&mut self, limit: Duration) -> Option<Frame> {
        Some(match receive(&mut self.ws, limit)? {
            Received::Text(t) => Frame::Text(serde_json::from_str(&t).expect("server sends JSON")),
            Received::Binary(b) => Frame::Binary(b),
            Received::Closed(_) => Frame::Close,
        })
    }

    /// Reads and discards whatever has arrived, without waiting; false once the server closed
    /// the socket.
    pub fn discard_arrived(&mut self) -> bool {
        let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_ref() else {
            return true;
        };
        s.set_nonblocking(true).ok();
        let open = loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Close(_)) => break false,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    break true;
                }
                Err(_) => break false,
            }
        };
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_nonblocking(false).ok();
        }
        open
    }

    /// Skips frames until one whose (topic, event) matches; None if none within `limit`.
    pub fn recv_event(&mut self, event: &str, limit: Duration) -> Option<Message> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(frame) = self.recv(deadline.saturating_duration_since(Instant::now())) {
                if let Some(m) = Message::from_frame(&frame, self.vsn)
                    && m.event == event
                {
                    return Some(m);
                }
                if matches!(frame, Frame::Close) {
                    return None;
                }
            }
        }
        None
    }

    /// Joins `realtime:<topic>` with `config`; returns the reply payload.
    pub fn join(&mut self, topic: &str, config: serde_json::Value) -> serde_json::Value {
        let r = self.next_ref();
        let full = format!("realtime:{topic}");
        self.push(
            Some(&r),
            &r,
            &full,
            "phx_join",
            serde_json::json!({"config": config}),
        );
        loop {
            let m = self
                .recv_event("phx_reply", Duration::from_secs(15))
                .expect("a join reply");
            if m.reference.as_deref() == Some(r.as_str()) {
                return m.payload;
            }
        }
    }
}

/// A client WebSocket over plain TCP, as the tests open them.
pub type Stream = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// One frame as it came off the socket.
#[derive(Debug)]
pub enum Received {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame (with its code, if it had one), or a broken connection (None).
    Closed(Option<u16>),
}

/// The next data or close frame of `ws` (whose read timeout bounds each wait), or None when
/// nothing arrives within `limit`. Pings and pongs are skipped.
pub fn receive(ws: &mut Stream, limit: Duration) -> Option<Received> {
    let deadline = Instant::now() + limit;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Some(Received::Text(t.as_str().into())),
            Ok(tungstenite::Message::Binary(b)) => return Some(Received::Binary(b.to_vec())),
            Ok(tungstenite::Message::Close(c)) => {
                return Some(Received::Closed(c.map(|c| u16::from(c.code))));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(_) => return Some(Received::Closed(None)),
        }
    }
}
