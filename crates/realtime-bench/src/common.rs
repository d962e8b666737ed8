//! Options every scenario shares, connecting many sockets at once, the receive loop, and the
//! report (a table on stdout and a JSON file).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use super::args::Args;
use super::client::{self, HEARTBEAT, HEARTBEAT_EVERY, Incoming, JoinOptions, Protocol, Role, Ws};
use super::stats::{self, ProcSample, Recorder, Window, latency_json, proc_delta_json, round2};
use realtime_test_client::jwt;

#[derive(Clone)]
pub struct Common {
    pub protocol: Protocol,
    /// The cluster's `realtime.jwt_secret` (Phoenix only), for scenarios that sign user tokens.
    pub jwt_secret: Option<String>,
    /// libpq-style connection string of the cluster (finds the worker pid, sends SQL).
    pub pg: Option<String>,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub source_addrs: usize,
    pub connect_concurrency: usize,
    /// Process to watch instead of the pg_realtime worker (a peer server).
    pid: Option<i32>,
}

fn secs(args: &Args, key: &str, default: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(args.get(key, default)?).map_err(|e| format!("--{key}: {e}"))
}

impl Common {
    pub fn from_args(args: &Args) -> Result<Common, String> {
        let mut jwt_secret = None;
        let protocol = match args.string("protocol", "phoenix").as_str() {
            "phoenix" => {
                let secret = args
                    .opt("jwt-secret")
                    .or_else(|| std::env::var("REALTIME_JWT_SECRET").ok())
                    .ok_or("--jwt-secret (or REALTIME_JWT_SECRET) is required")?;
                let token = jwt::anon_token(&secret);
                jwt_secret = Some(secret);
                Protocol::Phoenix {
                    base: args.string("url", "ws://127.0.0.1:4000/realtime/v1/websocket"),
                    token,
                }
            }
            "plain" => Protocol::Plain {
                sub_url: args
                    .opt("sub-url")
                    .ok_or("--protocol plain needs --sub-url")?,
                pub_url: args.opt("pub-url"),
            },
            other => return Err(format!("--protocol: phoenix or plain, not {other:?}")),
        };
        Ok(Common {
            protocol,
            jwt_secret,
            pg: args.opt("pg"),
            warmup: secs(args, "warmup", 2.0)?,
            duration: secs(args, "duration", 10.0)?,
            drain: secs(args, "drain", 2.0)?,
            source_addrs: args.get("source-addrs", 4)?,
            connect_concurrency: args.get("connect-concurrency", 64)?,
            pid: args.get("pid", 0).map(|p: i32| (p > 0).then_some(p))?,
        })
    }

    /// The process whose RSS and CPU are reported: `--pid`, else the pg_realtime worker.
    pub fn watched_pid(&self) -> Option<i32> {
        if self.pid.is_some() {
            return self.pid;
        }
        let conn_str = self.pg.clone()?;
        blocking(move || {
            let mut c = postgres::Client::connect(&conn_str, postgres::NoTls).ok()?;
            c.query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_realtime'",
                &[],
            )
            .ok()
            .flatten()
            .map(|row| row.get(0))
        })
        .flatten()
    }

    /// A window that opens after the warm-up.
    pub fn window(&self) -> Window {
        let start_us = stats::now_us() + self.warmup.as_micros() as u64;
        Window {
            start_us,
            end_us: start_us + self.duration.as_micros() as u64,
        }
    }
}

/// Runs synchronous Postgres work on a plain thread: the `postgres` crate drives its own
/// runtime and refuses to run inside tokio's (spawn_blocking threads included).
pub fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(f).join().ok()
}

/// Opens one socket per `(topic, role)`, `concurrency` at a time; results keep their order.
/// `first_index` offsets the source-address rotation (child processes each get a share).
pub async fn connect_many(
    protocol: &Protocol,
    specs: &[(String, Role)],
    first_index: usize,
    source_addrs: usize,
    concurrency: usize,
) -> Vec<Result<Ws, String>> {
    let specs: Vec<_> = specs
        .iter()
        .map(|(topic, role)| (topic.clone(), *role, JoinOptions::default()))
        .collect();
    connect_many_with(protocol, specs, first_index, source_addrs, concurrency).await
}

/// [`connect_many`] with join options per socket.
pub async fn connect_many_with(
    protocol: &Protocol,
    specs: Vec<(String, Role, JoinOptions)>,
    first_index: usize,
    source_addrs: usize,
    concurrency: usize,
) -> Vec<Result<Ws, String>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(specs.len());
    for (i, (topic, role, options)) in specs.into_iter().enumerate() {
        let (gate, protocol) = (gate.clone(), protocol.clone());
        let source = client::source_addr(first_index + i, source_addrs);
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            client::open_with(&protocol, &topic, role, source, &options).await
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    out
}

/// Reads a subscriber socket until `stop` turns true (or, with `want`, until that many
/// messages of the window arrived): records stamps, sends heartbeats when speaking Phoenix.
pub async fn receive(
    ws: Ws,
    window: Window,
    stop: watch::Receiver<bool>,
    heartbeat: bool,
) -> Recorder {
    receive_until(ws, window, stop, heartbeat, None).await
}

pub async fn receive_until(
    mut ws: Ws,
    window: Window,
    mut stop: watch::Receiver<bool>,
    heartbeat: bool,
    want: Option<u64>,
) -> Recorder {
    let mut rec = Recorder::default();
    let start = tokio::time::Instant::now() + HEARTBEAT_EVERY;
    let mut beat = tokio::time::interval_at(start, HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            // `changed` rather than `wait_for`: the latter holds a lock guard across the await,
            // which makes the task !Send.
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            _ = beat.tick(), if heartbeat => {
                if let Err(e) = ws.send(Message::text(HEARTBEAT)).await {
                    rec.error(format!("heartbeat: {e}"));
                    break;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(m)) => match client::classify(&m) {
                    Incoming::Stamp(t) => {
                        rec.stamp(t, &window);
                        if want.is_some_and(|w| rec.in_window >= w) {
                            break;
                        }
                    }
                    Incoming::Other => {}
                    Incoming::Failure(f) => {
                        rec.error(f);
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                },
                Some(Err(e)) => {
                    rec.error(format!("read: {e}"));
                    break;
                }
                None => {
                    rec.error("closed");
                    break;
                }
            }
        }
    }
    close(ws).await;
    rec
}

/// A polite close, bounded: a stuck peer must not hold up the report.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// The database at one edge of a window: its committed transactions (as the statistics have
/// them) and the WAL position, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct DbReading {
    pub xact_commit: i64,
    pub wal_bytes: u64,
}

/// The figures of one run, in order.
pub struct Report {
    scenario: String,
    rows: Vec<(String, Value)>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_owned(),
            rows: Vec::new(),
        }
    }

    pub fn add(&mut self, key: &str, value: impl Into<Value>) {
        self.rows.push((key.to_owned(), value.into()));
    }

    /// Deliveries per second, expected and received counts, the delivered ratio and the
    /// latency of the messages stamped inside the measurement window.
    pub fn add_deliveries(&mut self, received: &Recorder, expected: u64, secs: f64) {
        let ratio = |n: u64, d: u64| {
            if d > 0 {
                round2(n as f64 / d as f64)
            } else {
                0.0
            }
        };
        self.add(
            "deliveries_per_sec",
            round2(received.in_window as f64 / secs),
        );
        self.add("expected_deliveries", expected);
        self.add("received_deliveries", received.in_window);
        self.add("delivered_ratio", ratio(received.in_window, expected));
        self.add("latency", latency_json(&received.latency));
    }

    /// The errors of every stage: their count and the first five samples.
    pub fn add_errors(&mut self, stages: &[&Recorder]) {
        self.add("errors", stages.iter().map(|r| r.errors).sum::<u64>());
        let samples: Vec<&String> = stages
            .iter()
            .flat_map(|r| &r.error_samples)
            .take(5)
            .collect();
        self.add("error_samples", json!(samples));
    }

    /// The worker's and the generator's memory and CPU over the window (readings at its two
    /// edges), and the worker's CPU per delivery.
    pub fn add_processes(
        &mut self,
        worker: (Option<ProcSample>, Option<ProcSample>),
        deliveries: u64,
        generator: (Option<ProcSample>, Option<ProcSample>),
    ) {
        self.add("server_process", proc_delta_json(worker.0, worker.1));
        self.add(
            "server_cpu_us_per_delivery",
            stats::cpu_us_per(worker.0, worker.1, deliveries),
        );
        self.add(
            "generator_process",
            proc_delta_json(generator.0, generator.1),
        );
    }

    /// What the database did over the window: commits/s as `pg_stat_database.xact_commit` has
    /// them (sessions report theirs; the pg_realtime worker's do not show there), WAL bytes per
    /// message sent, and, when counted, the window's stored messages and the transactions that
    /// stored them (the worker's commits that carried rows).
    pub fn add_database(
        &mut self,
        before: DbReading,
        after: DbReading,
        stored: Option<(i64, i64)>,
        messages: u64,
        secs: f64,
    ) {
        let commits = after.xact_commit.saturating_sub(before.xact_commit);
        self.add("xact_commits_per_sec", round2(commits as f64 / secs));
        let wal = after.wal_bytes.saturating_sub(before.wal_bytes);
        self.add(
            "wal_bytes_per_message",
            if messages > 0 {
                json!(round2(wal as f64 / messages as f64))
            } else {
                json!(null)
            },
        );
        if let Some((rows, transactions)) = stored {
            self.add("stored_rows", rows);
            self.add("store_transactions", transactions);
            self.add(
                "store_transactions_per_sec",
                round2(transactions as f64 / secs),
            );
            if transactions > 0 {
                self.add(
                    "rows_per_store_transaction",
                    round2(rows as f64 / transactions as f64),
                );
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let mut map = serde_json::Map::new();
        map.insert("scenario".into(), json!(self.scenario));
        for (k, v) in &self.rows {
            map.insert(k.clone(), v.clone());
        }
        Value::Object(map)
    }

    /// Prints the table and writes the JSON file, if one was asked for.
    pub fn emit(&self, json_path: Option<&str>) -> Result<(), String> {
        println!("== {}", self.scenario);
        for (k, v) in &self.rows {
            println!("  {k:<28} {}", human(v));
        }
        if let Some(path) = json_path {
            let text = serde_json::to_string_pretty(&self.to_json()).map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(())
    }
}

/// Latency objects as "p50 … p99 … max …" in milliseconds; process objects as RSS and CPU.
fn human(v: &Value) -> String {
    let ms = |k: &str| v.get(k).and_then(Value::as_f64).map(|us| us / 1000.0);
    if let (Some(p50), Some(p95), Some(p99), Some(max)) =
        (ms("p50_us"), ms("p95_us"), ms("p99_us"), ms("max_us"))
    {
        return format!("p50 {p50:.2} ms  p95 {p95:.2} ms  p99 {p99:.2} ms  max {max:.2} ms");
    }
    if let (Some(before), Some(after), Some(cpu)) = (
        v.get("rss_before_kib").and_then(Value::as_u64),
        v.get("rss_after_kib").and_then(Value::as_u64),
        v.get("cpu_percent").and_then(Value::as_f64),
    ) {
        return format!(
            "RSS {:.1} -> {:.1} MiB  CPU {cpu:.0}% of one core",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
    }
    match v {
        // Time series (the memory scenario's readings) are for the JSON file.
        Value::Array(a) if a.len() > 8 => format!("{} readings (see the JSON)", a.len()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A child process of the generator holding a share of the sockets (one process may open at
/// most 20,000 files). Parent and child talk over pipes: one line per command and per answer.
/// Reads a child's closing `result <json>` line.
pub async fn read_result(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    progress: &[&str],
) -> Result<Value, String> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        if progress.iter().any(|p| line.starts_with(p)) {
            continue;
        }
        return line
            .strip_prefix("result ")
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| format!("child said {line:?} instead of result"));
    }
}

pub struct Child {
    pub process: tokio::process::Child,
    pub pid: Option<i32>,
    pub lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    pub stdin: tokio::process::ChildStdin,
}

impl Child {
    /// Ends the child: says `stop` on its stdin first when asked, closes it, reads its
    /// `result` line (skipping lines that start with one of `progress`) and waits for it to
    /// exit.
    pub async fn finish(self, say_stop: bool, progress: &[&str]) -> Result<Value, String> {
        let Child {
            mut process,
            mut lines,
            mut stdin,
            ..
        } = self;
        if say_stop {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(b"stop\n")
                .await
                .map_err(|e| e.to_string())?;
        }
        drop(stdin);
        let result = read_result(&mut lines, progress).await?;
        let _ = process.wait().await;
        Ok(result)
    }
}

/// Starts `subcommand` of this binary once per share of `total` sockets (at most `per_proc`
/// each, with `--count` and `--first`), with the shared connection options and `extra`.
pub fn spawn_children(
    common: &Common,
    subcommand: &str,
    token: &str,
    total: usize,
    per_proc: usize,
    threads: usize,
    extra: &[String],
) -> Result<Vec<Child>, String> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    let mut first = 0;
    while first < total {
        let n = per_proc.max(1).min(total - first);
        let mut process = tokio::process::Command::new(&exe)
            .arg(subcommand)
            .args(["--count", &n.to_string(), "--first", &first.to_string()])
            .args(extra)
            .args(["--source-addrs", &common.source_addrs.to_string()])
            .args([
                "--connect-concurrency",
                &common.connect_concurrency.to_string(),
            ])
            .args(["--threads", &threads.to_string()])
            // The token rides in the environment, not on a command line anyone can read.
            .env("REALTIME_BENCH_TOKEN", token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        let stdout = process.stdout.take().ok_or("child stdout")?;
        let stdin = process.stdin.take().ok_or("child stdin")?;
        let pid = process.id().map(|p| p as i32);
        children.push(Child {
            process,
            pid,
            lines: tokio::io::BufReader::new(stdout).lines(),
            stdin,
        });
        first += n;
    }
    Ok(children)
}

/// Sends one command line to every child.
pub async fn tell_all(children: &mut [Child], command: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    for child in children {
        child
            .stdin
            .write_all(command)
            .await
            .map_err(|e| e.to_string())?;
        child.stdin.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A child's half of [`read_joined`]: prints `joined <ok> <failed> <seconds>`.
pub fn say_joined(ok: usize, failed: u64, took: Duration) {
    println!("joined {ok} {failed} {:.2}", took.as_secs_f64());
}

/// Reads every child's `joined <ok> <failed> <seconds>` line; returns the sums of ok and failed.
pub async fn read_joined(children: &mut [Child]) -> Result<(u64, u64), String> {
    let (mut joined, mut failed) = (0u64, 0u64);
    for child in children {
        let line = child.lines.next_line().await.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.as_deref().unwrap_or("").split_whitespace().collect();
        match words.as_slice() {
            ["joined", ok, bad, _] => {
                joined += ok.parse::<u64>().unwrap_or(0);
                failed += bad.parse::<u64>().unwrap_or(0);
            }
            _ => return Err(format!("child said {line:?} instead of joined")),
        }
    }
    Ok((joined, failed))
}
