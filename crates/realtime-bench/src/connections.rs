//! `connections`: N joined, idle sockets; reports how much the worker's RSS grew per
//! connection, then proves they are all alive by sending one message per topic and counting
//! deliveries.
//!
//! One process may open at most 20,000 files here, so the sockets are spread over child
//! processes (this same binary, subcommand `connections-child`), each with a share and its own
//! slice of the 127.0.0.x source-address rotation. Parent and children talk over pipes:
//! a child prints `joined <ok> <failed> <seconds>`, waits for `ping` on stdin, then prints
//! `result <json>` once every socket got its message (or a timeout passed).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use super::args::Args;
use super::client::{Protocol, Role};
use super::common::{self, Common, Report};
use super::fanout::topic_name;
use super::stats::{self, Recorder, Window, latency_json, now_us, proc_delta_json, round2};

/// How long children wait for the liveness message before reporting what arrived.
const PING_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let count: usize = args.get("count", 1_000)?;
    let per_proc: usize = args.get("per-proc", 5_000)?;
    let topics: usize = args.get("topics", 100)?;
    let hold = Duration::try_from_secs_f64(args.get("hold", 5.0)?).map_err(|e| e.to_string())?;
    let threads: usize = args.get("child-threads", 1)?;
    args.finish()?;
    let Protocol::Phoenix { base, token } = &common.protocol else {
        return Err("connections speaks Phoenix only".into());
    };
    let conn_str = common
        .pg
        .clone()
        .ok_or("--pg <connection string> is required")?;
    let pid = common
        .watched_pid()
        .ok_or("cannot find the pg_realtime worker's pid")?;
    let topics = topics.max(1);

    let before = stats::sample(pid);
    let started = Instant::now();
    let extra = [
        "--topics".to_string(),
        topics.to_string(),
        "--url".into(),
        base.clone(),
    ];
    let mut children = common::spawn_children(
        &common,
        "connections-child",
        token,
        count,
        per_proc,
        threads,
        &extra,
    )?;
    let (joined, failed) = common::read_joined(&mut children).await?;
    let join_secs = started.elapsed().as_secs_f64();
    // Let allocations settle (buffers freed after the handshakes) before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = stats::sample(pid);
    tokio::time::sleep(hold).await;
    let held = stats::sample(pid);

    common::tell_all(&mut children, b"ping\n").await?;
    let topic_count = topics as i64;
    common::blocking(move || send_pings(&conn_str, topic_count))
        .ok_or("the ping thread panicked")??;

    let (mut received, mut errors, mut worst) = (0u64, 0u64, json!(null));
    let mut samples: Vec<Value> = Vec::new();
    for child in children {
        let result = child.finish(false, &[]).await?;
        received += result["received"].as_u64().unwrap_or(0);
        errors += result["errors"].as_u64().unwrap_or(0);
        if let Some(s) = result["error_samples"].as_array() {
            samples.extend(s.iter().cloned());
        }
        let max = |v: &Value| v["max_us"].as_u64().unwrap_or(0);
        if max(&result["latency"]) >= max(&worst) {
            worst = result["latency"].clone();
        }
    }
    samples.truncate(5);

    let per_conn = |s: Option<stats::ProcSample>| match (before, s) {
        (Some(b), Some(a)) if joined > 0 => {
            json!(round2(
                (a.rss_kib as f64 - b.rss_kib as f64) / joined as f64
            ))
        }
        _ => json!(null),
    };
    let mut report = Report::new("connections");
    report.add(
        "params",
        json!({"count": count, "per_proc": per_proc, "topics": topics,
               "source_addrs": common.source_addrs, "hold_s": hold.as_secs_f64()}),
    );
    report.add("joined", joined);
    report.add("failed", failed);
    report.add("join_seconds", round2(join_secs));
    report.add("joins_per_sec", round2(joined as f64 / join_secs.max(1e-9)));
    report.add("rss_growth_kib_per_conn", per_conn(loaded));
    report.add("rss_growth_kib_per_conn_after_hold", per_conn(held));
    report.add(
        "server_process_while_joining",
        proc_delta_json(before, loaded),
    );
    report.add("server_process_while_idle", proc_delta_json(loaded, held));
    report.add("ping_expected", joined);
    report.add("ping_received", received);
    report.add("ping_latency_worst_child", worst);
    report.add("errors", errors + failed);
    report.add("error_samples", json!(samples));
    Ok(report)
}

/// One `realtime.send` per topic, in one statement (one round trip, one transaction): every
/// joined socket should get exactly one message. The stamp is taken after connecting, so the
/// latency children report is statement + commit + delivery.
fn send_pings(conn_str: &str, topics: i64) -> Result<(), String> {
    let mut c = postgres::Client::connect(conn_str, postgres::NoTls).map_err(|e| e.to_string())?;
    let t = now_us() as i64;
    c.execute(
        "SELECT realtime.send(jsonb_build_object('t', $1::bigint), 'ping', 'bench_' || g, false) \
         FROM generate_series(0, $2::bigint - 1) AS g",
        &[&t, &topics],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// The child side: open `count` sockets, report, wait for `ping`, count deliveries.
pub async fn child(args: &Args) -> Result<(), String> {
    let count: usize = args.get("count", 0)?;
    let first: usize = args.get("first", 0)?;
    let topics: usize = args.get("topics", 100)?;
    let base = args.string("url", "ws://127.0.0.1:4000/realtime/v1/websocket");
    let source_addrs: usize = args.get("source-addrs", 4)?;
    let concurrency: usize = args.get("connect-concurrency", 64)?;
    args.finish()?;
    let token = std::env::var("REALTIME_BENCH_TOKEN").map_err(|_| "REALTIME_BENCH_TOKEN unset")?;
    let protocol = Protocol::Phoenix { base, token };

    // Global index i joins topic i % topics, so topics are shared across children.
    let specs: Vec<(String, Role)> = (first..first + count)
        .map(|i| (topic_name(i % topics.max(1)), Role::Subscriber))
        .collect();
    let started = Instant::now();
    let sockets = common::connect_many(&protocol, &specs, first, source_addrs, concurrency).await;
    // Nothing else is sent to these topics, so every stamped message counts.
    let window = Window {
        start_us: 0,
        end_us: u64::MAX,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut setup = Recorder::default();
    let mut tasks = Vec::new();
    for s in sockets {
        match s {
            Ok(ws) => tasks.push(tokio::spawn(common::receive_until(
                ws,
                window,
                stop_rx.clone(),
                true,
                Some(1),
            ))),
            Err(e) => setup.error(e),
        }
    }
    common::say_joined(tasks.len(), setup.errors, started.elapsed());

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = stdin.next_line().await;
    let deadline = tokio::time::sleep(PING_TIMEOUT);
    tokio::pin!(deadline);
    let mut all = Recorder::default();
    let mut pending = tasks.into_iter();
    // Gather in order; once the deadline passes, tell the rest to stop and gather them too.
    let mut stopped = false;
    for task in pending.by_ref() {
        let mut task = task;
        let rec = if stopped {
            task.await
        } else {
            tokio::select! {
                r = &mut task => r,
                _ = &mut deadline => {
                    stopped = true;
                    let _ = stop_tx.send(true);
                    task.await
                }
            }
        };
        all.merge(rec.map_err(|e| e.to_string())?);
    }
    all.errors += setup.errors;
    all.error_samples.extend(setup.error_samples);
    all.error_samples.truncate(5);
    let missing = count as u64 - all.in_window.min(count as u64);
    let result = json!({
        "received": all.in_window,
        "missing": missing,
        "errors": all.errors,
        "error_samples": all.error_samples,
        "latency": latency_json(&all.latency),
    });
    println!("result {result}");
    Ok(())
}
