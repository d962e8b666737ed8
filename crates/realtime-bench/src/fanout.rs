//! `fanout`: P publishers broadcast over WebSocket to T topics with S subscribers each, at a
//! fixed total rate. Client-to-client traffic never touches Postgres, so this measures the
//! network side of the worker alone.
//!
//! With `--private true` every socket joins a private channel as a signed-in user (a JWT with
//! `role: authenticated` and its own `sub`, sent as the channel's `access_token`) under RLS
//! policies the run installs through `--pg`: read and write broadcast on `bench_*`, and store
//! (`extension = 'persistence'`). `--persist true` (binary frames, private) sends every
//! message with the metadata `{"persist":true}`: the worker stores it in `realtime.messages`
//! and delivers it after the commit. `--ack true` asks for `broadcast.ack` on the publishers'
//! channels and measures send → ok reply. The run then also reads the database at the
//! window's edges (commits, WAL) and counts the window's stored rows and the transactions
//! that stored them.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};

use super::args::Args;
use super::client::{
    self, Frames, HEARTBEAT, HEARTBEAT_EVERY, Incoming, JoinOptions, Protocol, Role, Ws,
};
use super::common::{self, Common, DbReading, Report};
use super::stats::{self, Recorder, Window, latency_json, now_us, round2};
use realtime_test_client::jwt;

/// Publishers send in bursts on this tick: fine enough for smooth load, coarse enough that
/// the timer is not the work.
const TICK: Duration = Duration::from_millis(2);
/// How long a publisher waits after the window for the acks of the window's messages.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// The metadata of a stored broadcast, as realtime-js sends `send({..., persist: true})`.
const PERSIST_META: &str = r#"{"persist":true}"#;

/// What `--private` installs: signed-in users read, write and store broadcasts on the bench
/// topics (the persistence right is a second INSERT policy, as the README shows it).
const POLICIES: [(&str, &str); 3] = [
    (
        "bench_fanout_read",
        "FOR SELECT TO authenticated \
         USING (realtime.topic() LIKE 'bench\\_%' AND extension = 'broadcast')",
    ),
    (
        "bench_fanout_write",
        "FOR INSERT TO authenticated \
         WITH CHECK (realtime.topic() LIKE 'bench\\_%' AND extension = 'broadcast')",
    ),
    (
        "bench_fanout_persist",
        "FOR INSERT TO authenticated \
         WITH CHECK (realtime.topic() LIKE 'bench\\_%' AND extension = 'persistence')",
    ),
];

pub fn topic_name(i: usize) -> String {
    format!("bench_{i}")
}

#[derive(Default)]
pub struct Published {
    pub in_window: u64,
    pub errors: Recorder,
    /// With ack: the ok replies, stamped with their message's send time (latency = send → ok).
    pub acks: Recorder,
    /// With ack: messages refused (an error reply).
    pub refused: u64,
    /// With ack: messages of the window that got no reply within [`ACK_WAIT`] after it.
    pub unanswered: u64,
}

/// What every publisher sends beyond the payload.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pushes {
    /// `{"persist":true}` in every (binary) frame's metadata.
    pub persist: bool,
    /// The channel was joined with `broadcast.ack`: replies are awaited and timed.
    pub ack: bool,
}

/// The shape of a fan-out run: who publishes how much to whom.
#[derive(Clone, Debug)]
pub struct Shape {
    pub pubs: usize,
    pub topics: usize,
    pub subs: usize,
    /// Messages/s, all publishers together.
    pub rate: f64,
    pub size: usize,
    pub frames: Frames,
    /// Private channels, joined by signed-in users under the policies the run installs.
    pub private: bool,
    pub pushes: Pushes,
}

impl Shape {
    /// Reads `--pubs --topics --subs --rate --payload --frames --private --persist --ack`, with
    /// the given defaults.
    pub fn from_args(args: &Args, defaults: Shape) -> Result<Shape, String> {
        let persist = args.get("persist", defaults.pushes.persist)?;
        let frames_given = args.opt("frames");
        let shape = Shape {
            pubs: args.get("pubs", defaults.pubs)?,
            topics: args.get("topics", defaults.topics)?,
            subs: args.get("subs", defaults.subs)?,
            rate: args.get("rate", defaults.rate)?,
            size: args.get("payload", defaults.size)?,
            frames: match frames_given.as_deref() {
                // Only binary frames carry metadata.
                None if persist => Frames::Binary,
                None => defaults.frames,
                Some("text") => Frames::Text,
                Some("binary") => Frames::Binary,
                Some(other) => return Err(format!("--frames: text or binary, not {other:?}")),
            },
            private: args.get("private", defaults.private)? || persist,
            pushes: Pushes {
                persist,
                ack: args.get("ack", defaults.pushes.ack)?,
            },
        };
        if shape.pubs == 0 || shape.topics == 0 {
            return Err("--pubs and --topics must be at least 1".into());
        }
        if persist && shape.frames == Frames::Text {
            return Err(
                "--persist rides in binary frames' metadata: not with --frames text".into(),
            );
        }
        Ok(shape)
    }
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let defaults = Shape {
        pubs: 4,
        topics: 4,
        subs: 25,
        rate: 10_000.0,
        size: 100,
        frames: Frames::Text,
        private: false,
        pushes: Pushes::default(),
    };
    let shape = Shape::from_args(args, defaults)?;
    args.finish()?;
    run_shape(&common, &shape).await
}

/// One fan-out run of `shape`, timed by `common`'s warm-up, window and drain.
pub async fn run_shape(common: &Common, shape: &Shape) -> Result<Report, String> {
    let &Shape {
        pubs,
        topics,
        subs,
        rate,
        size,
        frames,
        private,
        pushes,
    } = shape;
    if private {
        let conn_str = common
            .pg
            .clone()
            .ok_or("--private needs --pg <connection string> to install its policies")?;
        common::blocking(move || install_policies(&conn_str))
            .ok_or("the setup thread panicked")??;
    }
    if (private || pushes.ack) && !common.protocol.is_phoenix() {
        return Err("--private, --persist and --ack speak Phoenix only".into());
    }
    let pid = common.watched_pid();

    let mut specs: Vec<(String, Role)> = Vec::new();
    for t in 0..topics {
        specs.extend((0..subs).map(|_| (topic_name(t), Role::Subscriber)));
    }
    specs.extend((0..pubs).map(|p| (topic_name(p % topics), Role::Publisher)));
    let mut joins = Vec::with_capacity(specs.len());
    for (i, (topic, role)) in specs.iter().enumerate() {
        let access_token = match (private, &common.jwt_secret) {
            (false, _) => None,
            (true, Some(secret)) => Some(jwt::token(
                secret,
                "authenticated",
                Some(&format!("user-{i}")),
            )),
            (true, None) => return Err("--private needs --jwt-secret".into()),
        };
        let options = JoinOptions {
            private,
            access_token,
            ack: pushes.ack && *role == Role::Publisher,
            ..JoinOptions::default()
        };
        joins.push((topic.clone(), *role, options));
    }
    let setup_started = Instant::now();
    let sockets = common::connect_many_with(
        &common.protocol,
        joins,
        0,
        common.source_addrs,
        common.connect_concurrency,
    )
    .await;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let window = common.window();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut setup = Recorder::default();
    let (mut receivers, mut publishers) = (Vec::new(), Vec::new());
    let pad = client::padding(size);
    let per_pub = rate / pubs as f64;
    for ((topic, role), socket) in specs.iter().zip(sockets) {
        let ws = match socket {
            Ok(ws) => ws,
            Err(e) => {
                setup.error(e);
                continue;
            }
        };
        match role {
            Role::Subscriber => receivers.push(tokio::spawn(common::receive(
                ws,
                window,
                stop_rx.clone(),
                common.protocol.is_phoenix(),
            ))),
            Role::Publisher => publishers.push(tokio::spawn(publish(
                ws,
                common.protocol.clone(),
                frames,
                pushes,
                topic.clone(),
                per_pub,
                window,
                pad.clone(),
            ))),
        }
    }

    // Sample the watched process (and, for private runs, the database) exactly over the
    // window.
    let database = if private { common.pg.clone() } else { None };
    sleep_until_us(window.start_us).await;
    let (worker0, me0) = stats::sample_worker_and_self(pid);
    let db0 = read_database(&database);
    sleep_until_us(window.end_us).await;
    let (worker1, me1) = stats::sample_worker_and_self(pid);
    let db1 = read_database(&database);

    let mut published = Published::default();
    for p in publishers {
        let r = p.await.map_err(|e| e.to_string())?;
        published.in_window += r.in_window;
        published.errors.merge(r.errors);
        published.acks.merge(r.acks);
        published.refused += r.refused;
        published.unanswered += r.unanswered;
    }
    tokio::time::sleep(common.drain).await;
    let _ = stop_tx.send(true);
    let mut received = Recorder::default();
    for r in receivers {
        received.merge(r.await.map_err(|e| e.to_string())?);
    }

    // Every publisher's topic has `subs` subscribers, none of them the publisher itself.
    let expected = published.in_window * subs as u64;
    let secs = window.secs();
    let mut report = Report::new("fanout");
    report.add(
        "params",
        json!({"pubs": pubs, "topics": topics, "subs_per_topic": subs, "rate": rate,
               "payload_bytes": size, "frames": format!("{frames:?}").to_lowercase(),
               "protocol": if common.protocol.is_phoenix() { "phoenix" } else { "plain" },
               "private": private, "persist": pushes.persist, "ack": pushes.ack,
               "duration_s": secs}),
    );
    report.add("sockets", specs.len() as u64);
    report.add("setup_seconds", round2(setup_secs));
    report.add(
        "published_per_sec",
        round2(published.in_window as f64 / secs),
    );
    report.add_deliveries(&received, expected, secs);
    if pushes.ack {
        report.add("acked", published.acks.in_window);
        report.add("ack_latency", latency_json(&published.acks.latency));
        report.add("refused", published.refused);
        report.add("unanswered", published.unanswered);
    }
    report.add_errors(&[&setup, &published.errors, &received]);
    report.add_processes((worker0, worker1), received.in_window, (me0, me1));
    if private || pushes.ack {
        report.add(
            "server_cpu_us_per_message",
            stats::cpu_us_per(worker0, worker1, published.in_window),
        );
    }
    if let (Some(db0), Some(db1), Some(conn_str)) = (db0, db1, database) {
        let stored = common::blocking(move || count_stored(&conn_str, window)).flatten();
        report.add_database(db0, db1, stored, published.in_window, secs);
    }
    Ok(report)
}

/// Drops and creates the bench policies in one transaction, so a concurrent run never sees
/// them missing.
fn install_policies(conn_str: &str) -> Result<(), String> {
    let mut c = postgres::Client::connect(conn_str, postgres::NoTls).map_err(|e| e.to_string())?;
    let mut sql = String::from("BEGIN; SELECT realtime.setup_api_roles();");
    for (name, body) in POLICIES {
        sql += &format!(
            " DROP POLICY IF EXISTS {name} ON realtime.messages; \
             CREATE POLICY {name} ON realtime.messages {body};"
        );
    }
    c.batch_execute(&(sql + " COMMIT"))
        .map_err(|e| format!("policy setup: {e}"))
}

fn read_database(conn_str: &Option<String>) -> Option<DbReading> {
    let conn_str = conn_str.clone()?;
    common::blocking(move || {
        let mut c = postgres::Client::connect(&conn_str, postgres::NoTls).ok()?;
        let row = c
            .query_one(
                "SELECT xact_commit, pg_current_wal_lsn()::text FROM pg_stat_database \
                 WHERE datname = current_database()",
                &[],
            )
            .ok()?;
        let lsn: String = row.try_get(1).ok()?;
        let (hi, lo) = lsn.split_once('/')?;
        Some(DbReading {
            xact_commit: row.try_get(0).ok()?,
            wal_bytes: (u64::from_str_radix(hi, 16).ok()? << 32)
                | u64::from_str_radix(lo, 16).ok()?,
        })
    })
    .flatten()
}

/// The window's stored messages (by their send stamp) and the transactions that stored them:
/// `inserted_at` is `now()`, the same for every row of one transaction.
fn count_stored(conn_str: &str, window: Window) -> Option<(i64, i64)> {
    let mut c = postgres::Client::connect(conn_str, postgres::NoTls).ok()?;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT inserted_at) FROM realtime.messages \
             WHERE private AND topic LIKE 'bench\\_%' AND jsonb_typeof(payload->'t') = 'number' \
               AND (payload->>'t')::numeric >= $1::text::numeric \
               AND (payload->>'t')::numeric < $2::text::numeric",
            &[&window.start_us.to_string(), &window.end_us.to_string()],
        )
        .ok()?;
    Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
}

pub async fn sleep_until_us(t_us: u64) {
    let now = now_us();
    if t_us > now {
        tokio::time::sleep(Duration::from_micros(t_us - now)).await;
    }
}

/// Sends `rate` messages/s on one socket until the window closes. The stamp is taken as each
/// message is written, so a publisher that falls behind shows as a lower published rate, not
/// as hidden latency.
/// With `pushes.ack` every reply is matched to its message by ref and timed from the same
/// stamp; after the window it waits up to [`ACK_WAIT`] for the window's last acks.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    mut ws: Ws,
    protocol: Protocol,
    frames: Frames,
    pushes: Pushes,
    topic: String,
    rate: f64,
    window: Window,
    pad: String,
) -> Published {
    let mut out = Published::default();
    let started = Instant::now();
    let max_burst = ((rate * 0.05) as u64).max(1);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut beat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let mut sent = 0u64;
    let meta = if pushes.persist { PERSIST_META } else { "" };
    // With ack: the send stamp of every message still waiting for its reply, by ref.
    let mut waiting: HashMap<u64, u64> = HashMap::new();
    'run: loop {
        tokio::select! {
            _ = tick.tick() => {
                if now_us() >= window.end_us {
                    break;
                }
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                for _ in 0..due.saturating_sub(sent).min(max_burst) {
                    let t = now_us();
                    let body = client::payload(t, &pad);
                    let msg = client::broadcast(&protocol, frames, &topic, sent, meta, &body);
                    if let Err(e) = ws.feed(msg).await {
                        out.errors.error(format!("publish: {e}"));
                        break 'run;
                    }
                    if pushes.ack {
                        waiting.insert(sent, t);
                    }
                    sent += 1;
                    if window.contains(t) {
                        out.in_window += 1;
                    }
                }
                if let Err(e) = ws.flush().await {
                    out.errors.error(format!("publish: {e}"));
                    break;
                }
            }
            _ = beat.tick(), if protocol.is_phoenix() => {
                if ws.send(Message::text(HEARTBEAT)).await.is_err() {
                    out.errors.error("heartbeat failed");
                    break;
                }
            }
            msg = ws.next() => if !read_reply(msg, &mut waiting, &window, &mut out) {
                break;
            }
        }
    }
    // The acks of the window's last messages come after it (a stored one after its commit).
    let in_window = |waiting: &HashMap<u64, u64>| waiting.values().any(|t| window.contains(*t));
    if pushes.ack && in_window(&waiting) {
        let deadline = Instant::now() + ACK_WAIT;
        while in_window(&waiting) {
            let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
                break;
            };
            if !read_reply(msg, &mut waiting, &window, &mut out) {
                break;
            }
        }
    }
    out.unanswered = waiting.values().filter(|t| window.contains(**t)).count() as u64;
    common::close(ws).await;
    out
}

/// Handles what a publisher's socket said: an ack (timed against its message's send stamp),
/// a refusal (counted), anything else harmless; false when the publisher must stop.
fn read_reply(
    msg: Option<Result<Message, tungstenite::Error>>,
    waiting: &mut HashMap<u64, u64>,
    window: &Window,
    out: &mut Published,
) -> bool {
    let m = match msg {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            out.errors.error(format!("publisher read: {e}"));
            return false;
        }
        None => {
            out.errors.error("publisher socket closed");
            return false;
        }
    };
    if let Message::Text(text) = &m
        && let Some((reference, answer)) = client::numbered_reply(text.as_str())
        && let Some(t) = waiting.remove(&reference)
    {
        match answer {
            Ok(()) => out.acks.stamp(t, window),
            Err(why) => {
                out.refused += 1;
                out.errors.error(format!("refused: {why}"));
            }
        }
        return true;
    }
    if let Incoming::Failure(f) = client::classify(&m) {
        out.errors.error(format!("publisher: {f}"));
        return false;
    }
    true
}
