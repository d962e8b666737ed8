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
    /// Set while [`Cluster::freeze`] holds its processes stopped.
    frozen: std::sync::atomic::AtomicBool,
}

/// Log lines that mean a server process died or the cluster reinitialized.
const CRASH_MARKERS: [&str; 3] = ["terminated by signal", "PANIC", "reinitializing"];

/// The JavaScript test workspace (`pgrx-tests/js`), checked to have `package` installed.
pub fn js_dir(package: &str) -> PathBuf {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        js.join("node_modules").join(package).exists(),
        "run `npm ci` in {} first (scripts/test does)",
        js.display()
    );
    js
}

/// Runs `program` in the JavaScript workspace with `env`, and returns whether it succeeded and
/// what it printed. Killed with its whole process group after `limit`, so a client that waits
/// forever fails its test instead of hanging the run.
pub fn run_js(
    program: &str,
    args: &[&str],
    env: &[(&str, String)],
    limit: Duration,
) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let js = js_dir("@supabase/supabase-js");
    let log = std::env::temp_dir().join(format!(
        "pg_realtime_js_{}_{}.log",
        std::process::id(),
        free_port()
    ));
    let out = std::fs::File::create(&log).expect("a log file for the JS run");
    let err = out.try_clone().expect("the log file, twice");
    let mut child = Command::new(program)
        .args(args)
        .current_dir(&js)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the JS run") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // The whole group: npm's node children hold the log open and would outlive it.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .output();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut said = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if status.is_none() {
        said.push_str(&format!("\n[killed after {limit:?}]\n"));
    }
    (status.is_some_and(|s| s.success()), said)
}

/// A port nobody listens on right now, and never handed out before in this process: the
/// system may give a port it just gave back again, and two clusters started by tests running
/// side by side would then share one (a worker's socket server would find its port taken by
/// the other cluster's postgres, and a test's handshake would reach that postgres).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

fn as_postgres(program: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .expect("runuser runs")
}

/// The directory of a new cluster called `name`, absent, in a parent the postgres user owns.
fn fresh_data_dir(name: &str) -> PathBuf {
    let data = PathBuf::from(format!("/tmp/pg_realtime_it/{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(data.parent().expect("parent")).expect("mkdir");
    check(
        "chown",
        Command::new("chown")
            .args(["postgres:postgres", "/tmp/pg_realtime_it"])
            .output()
            .expect("chown"),
    );
    data
}

/// The log line of a worker that serves.
const READY_LINE: &str = "pg_realtime: worker ready";

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
        Self::create(name, settings, preload, false)
    }

    /// `replication`: standbys may be made from this cluster with [`Cluster::start_standby`].
    fn create(name: &str, settings: &[&str], preload: bool, replication: bool) -> Cluster {
        let data = fresh_data_dir(name);
        std::fs::create_dir_all(&data).expect("mkdir");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
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
        let cluster = Cluster::new(data, free_port(), free_port());
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             max_prepared_transactions = 4\nrealtime.port = {}\nrealtime.listen_addresses = '127.0.0.1'\n\
             realtime.jwt_secret = '{JWT_SECRET}'\nrealtime.connect_error_delay = 0\nrealtime.join_error_delay = 0\n",
            cluster.pg_port, data_str, cluster.ws_port
        );
        if preload {
            conf.push_str("shared_preload_libraries = 'pg_realtime'\n");
        }
        if replication {
            // Explicit although they are PostgreSQL 15's defaults: a standby copies this file,
            // and hot_standby is what lets it serve.
            conf.push_str(&format!(
                "wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\n\
                 wal_keep_size = '256MB'\nrealtime.node_name = '{name}'\n"
            ));
            let hba = cluster.data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            if !rules.lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>()
                    == ["host", "replication", "all", "127.0.0.1/32", "trust"]
            }) {
                rules.push_str("\nhost replication all 127.0.0.1/32 trust\n");
                std::fs::write(&hba, rules).expect("write pg_hba.conf");
            }
        }
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        cluster.append_conf(&conf);
        cluster.pg_ctl(&["start", "-w"]);
        if preload {
            cluster.execute("CREATE EXTENSION pg_realtime");
            cluster.execute("SELECT realtime.setup_api_roles()");
            // Its own worker's word, not just an open port, which could be someone else's.
            cluster.wait_until_serving(0);
        }
        cluster
    }

    fn new(data: PathBuf, pg_port: u16, ws_port: u16) -> Cluster {
        Cluster {
            data,
            pg_port,
            ws_port,
            killed_on_purpose: std::sync::atomic::AtomicBool::new(false),
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Appends lines to postgresql.conf (later lines win).
    fn append_conf(&self, lines: &str) {
        let conf_path = self.data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(lines);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
    }

    /// Like [`Cluster::start`], as a primary that standbys can be made from: replication from
    /// 127.0.0.1 is trusted, and `realtime.node_name` is `name`.
    pub fn start_primary(name: &str, settings: &[&str]) -> Cluster {
        Self::create(name, settings, true, true)
    }

    /// A hot standby of `primary` (which must come from [`Cluster::start_primary`]), made the
    /// usual way (`pg_basebackup -R`), with its own ports, `realtime.node_name = name` and
    /// `settings`; returns once its worker serves. The extension comes with the base backup.
    pub fn start_standby(primary: &Cluster, name: &str, settings: &[&str]) -> Cluster {
        Self::start_standby_with(primary, name, settings, true)
    }

    /// Like [`Cluster::start_standby`]; `serve: false` returns as soon as the standby accepts
    /// SQL connections, without waiting for its worker.
    pub fn start_standby_with(
        primary: &Cluster,
        name: &str,
        settings: &[&str],
        serve: bool,
    ) -> Cluster {
        let data = fresh_data_dir(name);
        let data_str = data.to_str().expect("utf-8 path").to_owned();
        let primary_port = primary.pg_port.to_string();
        check(
            "pg_basebackup",
            as_postgres(
                &format!("{BIN}/pg_basebackup"),
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary_port,
                    "-U",
                    "postgres",
                    "-D",
                    &data_str,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ],
            ),
        );
        // The primary logs into its data directory, so the copy starts with the primary's log:
        // this node's crash check and log waits must read only its own lines.
        let _ = std::fs::remove_file(data.join("server.log"));
        let standby = Cluster::new(data, free_port(), free_port());
        let mut conf = format!(
            "\n# standby {name}\nport = {}\nunix_socket_directories = '{data_str}'\n\
             realtime.port = {}\nrealtime.node_name = '{name}'\n",
            standby.pg_port, standby.ws_port
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        standby.append_conf(&conf);
        standby.pg_ctl(&["start", "-w"]);
        if serve {
            standby.wait_until_serving(0);
        }
        standby
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-w", "-m", "fast"]);
    }

    /// Starts a stopped or killed server again; returns once its worker serves.
    pub fn start_again(&self) {
        let mark = self.log().len();
        self.pg_ctl(&["start", "-w"]);
        self.wait_until_serving(mark);
    }

    /// `pg_ctl restart -m fast`; returns once the new worker serves.
    pub fn restart(&self) {
        let mark = self.log().len();
        self.pg_ctl(&["restart", "-w", "-m", "fast"]);
        self.wait_until_serving(mark);
    }

    /// The node dies at once, as when its machine goes down: SIGKILL to the postmaster and
    /// every process it started, none of which gets to say goodbye. Not reported as a crash.
    pub fn kill(&self) {
        self.expect_kill();
        let Some(postmaster) = self.postmaster_pid() else {
            return;
        };
        // Stopped first, so that it starts no process between the listing of its children and
        // its death.
        signal(postmaster, "STOP");
        let mut doomed = children_of(postmaster);
        doomed.insert(0, postmaster);
        for &pid in &doomed {
            signal(pid, "KILL");
        }
        let gone = eventually(Duration::from_secs(30), || {
            doomed.iter().all(|&pid| !process_alive(pid))
        });
        assert!(gone, "processes {doomed:?} survived SIGKILL");
        // A new postmaster refuses to start while the old one is a zombie nobody reaped yet
        // (its lock file names a process that still exists).
        eventually(Duration::from_secs(30), || proc_stat(postmaster).is_none());
    }

    /// The node goes silent without closing anything, as behind a network partition: SIGSTOP
    /// to the postmaster and every process it started, until [`Cluster::thaw`] (or drop).
    pub fn freeze(&self) {
        let Some(postmaster) = self.postmaster_pid() else {
            return;
        };
        self.frozen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // The postmaster first, so that it starts no process that would escape.
        signal(postmaster, "STOP");
        for pid in children_of(postmaster) {
            signal(pid, "STOP");
        }
    }

    /// Lets the processes stopped by [`Cluster::freeze`] run again.
    pub fn thaw(&self) {
        if !self
            .frozen
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let Some(postmaster) = self.postmaster_pid() else {
            return;
        };
        for pid in children_of(postmaster) {
            signal(pid, "CONT");
        }
        signal(postmaster, "CONT");
    }

    /// `SELECT pg_promote()`: the standby becomes a primary.
    pub fn promote(&self) {
        let promoted: bool = self
            .connect()
            .query_one("SELECT pg_promote(true, 60)", &[])
            .unwrap_or_else(|e| panic!("pg_promote: {e:?}"))
            .get(0);
        assert!(promoted, "the standby was not promoted:\n{}", self.log());
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> bool {
        self.connect()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap_or_else(|e| panic!("pg_is_in_recovery: {e:?}"))
            .get(0)
    }

    /// Whether `line` appears in the server log within `limit`.
    pub fn wait_for_log(&self, line: &str, limit: Duration) -> bool {
        self.wait_for_log_since(0, line, limit)
    }

    /// Whether `line` appears in the server log after its first `mark` bytes (a length of
    /// [`Cluster::log`] taken earlier) within `limit`.
    pub fn wait_for_log_since(&self, mark: usize, line: &str, limit: Duration) -> bool {
        eventually(limit, || {
            self.log()
                .get(mark..)
                .is_some_and(|after| after.contains(line))
        })
    }

    /// Waits until a worker logged that it serves after the log's first `mark` bytes and its
    /// port accepts connections.
    fn wait_until_serving(&self, mark: usize) {
        let ready = self.wait_for_log_since(mark, READY_LINE, Duration::from_secs(60));
        assert!(ready, "the worker did not start serving:\n{}", self.log());
        self.wait_for_server();
    }

    /// The base URL of the worker's HTTP and WebSocket server, as supabase-js takes it.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ws_port)
    }

    /// A libpq URL of the server, as node-postgres takes it.
    pub fn pg_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port)
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
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

    /// Bounded in time like the tests' sockets: a statement that blocks fails its test after
    /// two minutes instead of hanging the run.
    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=30 \
             options='-c statement_timeout=120s'",
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
        // Stopped processes would not act on the stop signal, and would outlive the test.
        self.thaw();
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

fn signal(pid: i32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .output();
}

/// The state letter and parent of a process, from /proc.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may itself hold spaces and parentheses.
    let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let parent = rest.next()?.parse().ok()?;
    Some((state, parent))
}

/// A process that has exited but was not reaped yet counts as gone.
fn process_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| proc_stat(pid).is_some_and(|(_, p)| p == parent))
                .collect()
        })
        .unwrap_or_default()
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
    /// Once the socket ended: the close frame's code, or None when it ended without one (an
    /// error or end of stream), for failure messages.
    pub ended_with: Option<Option<u16>>,
    /// When it ended without a close frame: the client library's error.
    pub broke_with: Option<String>,
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
        let ws = connect_bounded(&url, cluster.ws_port)?;
        Ok(Socket {
            ws,
            vsn,
            next_ref: 0,
            ended_with: None,
            broke_with: None,
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
        Some(match receive_or_why(&mut self.ws, limit)? {
            Ok(Received::Text(t)) => {
                Frame::Text(serde_json::from_str(&t).expect("server sends JSON"))
            }
            Ok(Received::Binary(b)) => Frame::Binary(b),
            Ok(Received::Closed(code)) => {
                self.ended_with = Some(code);
                Frame::Close
            }
            Err(why) => {
                self.ended_with = Some(None);
                self.broke_with = Some(why);
                Frame::Close
            }
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

/// How long a WebSocket handshake may take before the test fails instead of hanging: a
/// server that accepts the TCP connection but never answers the upgrade must not block a
/// test run forever.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// `tungstenite::connect` with a bounded TCP connect and handshake; reads on the returned
/// stream time out after 200 ms, so every receive loop can keep its own deadline.
pub fn connect_bounded(url: &str, port: u16) -> Result<Stream, tungstenite::Error> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = std::net::TcpStream::connect_timeout(&address, HANDSHAKE_LIMIT)?;
    tcp.set_read_timeout(Some(HANDSHAKE_LIMIT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_LIMIT))?;
    let (ws, _) = tungstenite::client(url, tungstenite::stream::MaybeTlsStream::Plain(tcp))
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => {
                tungstenite::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "websocket handshake timed out",
                ))
            }
        })?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
    }
    Ok(ws)
}

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
    receive_or_why(ws, limit).map(|r| r.unwrap_or(Received::Closed(None)))
}

/// [`receive`], telling a broken connection's error (what the client's WebSocket library
/// said: a reset, an end of stream, a frame it could not parse) from a close frame.
pub fn receive_or_why(ws: &mut Stream, limit: Duration) -> Option<Result<Received, String>> {
    let deadline = Instant::now() + limit;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                return Some(Ok(Received::Text(t.as_str().into())));
            }
            Ok(tungstenite::Message::Binary(b)) => return Some(Ok(Received::Binary(b.to_vec()))),
            Ok(tungstenite::Message::Close(c)) => {
                return Some(Ok(Received::Closed(c.map(|c| u16::from(c.code)))));
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
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}
