//! `database`: N Postgres connections send at a fixed total rate, one message per transaction
//! (`SELECT realtime.send(...)` in autocommit), and WebSocket subscribers measure send→receive
//! latency. The stamp is taken just before the statement is sent, so the latency includes the
//! statement and its commit: what a user of `realtime.send` actually waits for.
//!
//! `--sql notify` runs the same load as INSERT + `pg_notify` for the LISTEN/NOTIFY bridge peer;
//! `--sql bare-notify` only calls `pg_notify` (nothing is kept: the simplest bridge a user could
//! build, and the fastest commit there is).
//! `--per-tx N` sends N messages per transaction (one statement, as a bulk write whose rows a
//! trigger broadcasts would); `--rate` still counts messages.

use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;

use super::args::Args;
use super::client::{self, Role};
use super::common::{self, Common, Report};
use super::fanout::{sleep_until_us, topic_name};
use super::stats::{self, Recorder, Window, histogram, latency_json, now_us, round2};

pub const SEND_SQL: &str = "SELECT realtime.send(jsonb_build_object('t', $1::bigint, 'p', $2::text), 'e', $3::text, false)";
/// The do-it-yourself equivalent: keep the row (as `realtime.send` does) and NOTIFY it, in one
/// statement. Needs `bench.plain_messages` (scripts/bench creates it).
const NOTIFY_SQL: &str = "WITH row AS (\
       INSERT INTO bench.plain_messages (topic, extension, payload, event, private) \
       VALUES ($3::text, 'broadcast', jsonb_build_object('t', $1::bigint, 'p', $2::text), 'e', false) \
       RETURNING payload) \
     SELECT pg_notify($3::text, (SELECT payload::text FROM row))";

/// The bridge with nothing kept: one `pg_notify` per message.
const BARE_NOTIFY_SQL: &str =
    "SELECT pg_notify($3::text, jsonb_build_object('t', $1::bigint, 'p', $2::text)::text)";

/// The same statements with `$4` messages each, told apart by `n` (NOTIFY folds identical
/// payloads of one transaction into one).
const SEND_MANY_SQL: &str = "SELECT count(realtime.send(jsonb_build_object('t', $1::bigint, 'p', $2::text, 'n', g), 'e', $3::text, false)) \
     FROM generate_series(1, $4::int) AS g";
const NOTIFY_MANY_SQL: &str = "WITH rows AS (\
       INSERT INTO bench.plain_messages (topic, extension, payload, event, private) \
       SELECT $3::text, 'broadcast', jsonb_build_object('t', $1::bigint, 'p', $2::text, 'n', g), 'e', false \
         FROM generate_series(1, $4::int) AS g \
       RETURNING payload) \
     SELECT count(pg_notify($3::text, payload::text)) FROM rows";
const BARE_NOTIFY_MANY_SQL: &str = "SELECT count(pg_notify($3::text, \
       jsonb_build_object('t', $1::bigint, 'p', $2::text, 'n', g)::text)) \
     FROM generate_series(1, $4::int) AS g";

fn sql_label(sql: &str) -> &'static str {
    if sql == SEND_SQL || sql == SEND_MANY_SQL {
        "realtime.send"
    } else if sql == BARE_NOTIFY_SQL || sql == BARE_NOTIFY_MANY_SQL {
        "pg_notify"
    } else {
        "insert + pg_notify"
    }
}

pub struct Sent {
    pub in_window: u64,
    /// Client-side duration of each statement, commit included.
    pub statement: Histogram<u64>,
    pub errors: Recorder,
}

#[allow(clippy::too_many_arguments)]
pub fn sender(
    conn_str: String,
    sql: &'static str,
    per_tx: i32,
    index: usize,
    conns: usize,
    topics: usize,
    rate: f64,
    window: Window,
    pad: String,
) -> Sent {
    let mut out = Sent {
        in_window: 0,
        statement: histogram(),
        errors: Recorder::default(),
    };
    let mut client = match postgres::Client::connect(&conn_str, postgres::NoTls) {
        Ok(c) => c,
        Err(e) => {
            out.errors.error(format!("connect: {e}"));
            return out;
        }
    };
    let stmt = match client.prepare(sql) {
        Ok(s) => s,
        Err(e) => {
            out.errors.error(format!("prepare: {e}"));
            return out;
        }
    };
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        // Open loop: message k is due at k/rate; if late, send at once (the achieved rate
        // then shows the shortfall).
        let due = started + Duration::from_secs_f64(sent as f64 * f64::from(per_tx) / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let t = now_us();
        if t >= window.end_us {
            break;
        }
        // Spread each connection's messages over all topics.
        let topic = topic_name((index + sent as usize * conns) % topics);
        let result = if per_tx == 1 {
            client.execute(&stmt, &[&(t as i64), &pad, &topic])
        } else {
            client.execute(&stmt, &[&(t as i64), &pad, &topic, &per_tx])
        };
        let took = now_us().saturating_sub(t).max(1);
        sent += 1;
        match result {
            Ok(_) if window.contains(t) => {
                out.in_window += per_tx as u64;
                out.statement.saturating_record(took);
            }
            Ok(_) => {}
            Err(e) => out.errors.error(format!("send: {e}")),
        }
    }
    out
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let conns: usize = args.get("conns", 8)?;
    let topics: usize = args.get("topics", 10)?;
    let subs: usize = args.get("subs", 10)?;
    let rate: f64 = args.get("rate", 1_000.0)?;
    let size: usize = args.get("payload", 100)?;
    let per_tx: i32 = args.get("per-tx", 1)?;
    let sql = match (args.string("sql", "realtime").as_str(), per_tx) {
        (_, n) if n < 1 => return Err("--per-tx must be at least 1".into()),
        ("realtime", 1) => SEND_SQL,
        ("realtime", _) => SEND_MANY_SQL,
        ("notify", 1) => NOTIFY_SQL,
        ("notify", _) => NOTIFY_MANY_SQL,
        ("bare-notify", 1) => BARE_NOTIFY_SQL,
        ("bare-notify", _) => BARE_NOTIFY_MANY_SQL,
        (other, _) => {
            return Err(format!(
                "--sql: realtime, notify or bare-notify, not {other:?}"
            ));
        }
    };
    args.finish()?;
    let conn_str = common
        .pg
        .clone()
        .ok_or("--pg <connection string> is required")?;
    if conns == 0 || topics == 0 || rate <= 0.0 {
        return Err("--conns, --topics and --rate must be positive".into());
    }
    let pid = common.watched_pid();

    let specs: Vec<(String, Role)> = (0..topics)
        .flat_map(|t| (0..subs).map(move |_| (topic_name(t), Role::Subscriber)))
        .collect();
    let sockets = common::connect_many(
        &common.protocol,
        &specs,
        0,
        common.source_addrs,
        common.connect_concurrency,
    )
    .await;
    let window = common.window();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut setup = Recorder::default();
    let mut receivers = Vec::new();
    for socket in sockets {
        match socket {
            Ok(ws) => receivers.push(tokio::spawn(common::receive(
                ws,
                window,
                stop_rx.clone(),
                common.protocol.is_phoenix(),
            ))),
            Err(e) => setup.error(e),
        }
    }

    let pad = client::padding(size);
    let senders: Vec<_> = (0..conns)
        .map(|i| {
            let (conn_str, pad) = (conn_str.clone(), pad.clone());
            let per_conn = rate / conns as f64;
            thread::spawn(move || {
                sender(
                    conn_str, sql, per_tx, i, conns, topics, per_conn, window, pad,
                )
            })
        })
        .collect();

    sleep_until_us(window.start_us).await;
    let (worker0, me0) = stats::sample_worker_and_self(pid);
    sleep_until_us(window.end_us).await;
    let (worker1, me1) = stats::sample_worker_and_self(pid);

    // The senders stop at the window's end; joining them blocks this runtime thread only
    // briefly, while the receivers keep running on the other workers.
    let joined = tokio::task::block_in_place(|| {
        senders
            .into_iter()
            .map(|h| h.join().map_err(|_| "a sender thread panicked".to_owned()))
            .collect::<Result<Vec<Sent>, String>>()
    })?;
    let mut statement = histogram();
    let (mut sent_in_window, mut send_errors) = (0u64, Recorder::default());
    for s in joined {
        sent_in_window += s.in_window;
        let _ = statement.add(&s.statement);
        send_errors.merge(s.errors);
    }
    tokio::time::sleep(common.drain).await;
    let _ = stop_tx.send(true);
    let mut received = Recorder::default();
    for r in receivers {
        received.merge(r.await.map_err(|e| e.to_string())?);
    }

    let expected = sent_in_window * subs as u64;
    let secs = window.secs();
    let mut report = Report::new("database");
    report.add(
        "params",
        json!({"conns": conns, "topics": topics, "subs_per_topic": subs, "rate": rate,
               "payload_bytes": size, "messages_per_transaction": per_tx,
               "sql": sql_label(sql),
               "duration_s": secs}),
    );
    report.add("sent_per_sec", round2(sent_in_window as f64 / secs));
    report.add_deliveries(&received, expected, secs);
    report.add("statement_latency", latency_json(&statement));
    report.add_errors(&[&setup, &send_errors, &received]);
    report.add_processes((worker0, worker1), received.in_window, (me0, me1));
    Ok(report)
}
