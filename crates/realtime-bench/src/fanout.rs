//! `fanout`: P publishers broadcast over WebSocket to T topics with S subscribers each, at a
//! fixed total rate. Client-to-client traffic never touches Postgres, so this measures the
//! network side of the worker alone.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::args::Args;
use super::client::{self, Frames, HEARTBEAT, HEARTBEAT_EVERY, Incoming, Protocol, Role, Ws};
use super::common::{self, Common, Report};
use super::stats::{self, Recorder, Window, now_us, round2};

/// Publishers send in bursts on this tick: fine enough for smooth load, coarse enough that
/// the timer is not the work.
const TICK: Duration = Duration::from_millis(2);

pub fn topic_name(i: usize) -> String {
    format!("bench_{i}")
}

#[derive(Default)]
pub struct Published {
    pub in_window: u64,
    pub errors: Recorder,
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
}

impl Shape {
    /// Reads `--pubs --topics --subs --rate --payload --frames`, with the given defaults.
    pub fn from_args(args: &Args, defaults: Shape) -> Result<Shape, String> {
        let shape = Shape {
            pubs: args.get("pubs", defaults.pubs)?,
            topics: args.get("topics", defaults.topics)?,
            subs: args.get("subs", defaults.subs)?,
            rate: args.get("rate", defaults.rate)?,
            size: args.get("payload", defaults.size)?,
            frames: match args.opt("frames").as_deref() {
                None => defaults.frames,
                Some("text") => Frames::Text,
                Some("binary") => Frames::Binary,
                Some(other) => return Err(format!("--frames: text or binary, not {other:?}")),
            },
        };
        if shape.pubs == 0 || shape.topics == 0 {
            return Err("--pubs and --topics must be at least 1".into());
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
    } = shape;
    let pid = common.watched_pid();

    let mut specs: Vec<(String, Role)> = Vec::new();
    for t in 0..topics {
        specs.extend((0..subs).map(|_| (topic_name(t), Role::Subscriber)));
    }
    specs.extend((0..pubs).map(|p| (topic_name(p % topics), Role::Publisher)));
    let setup_started = Instant::now();
    let sockets = common::connect_many(
        &common.protocol,
        &specs,
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
                topic.clone(),
                per_pub,
                window,
                pad.clone(),
            ))),
        }
    }

    // Sample the watched process exactly over the window.
    sleep_until_us(window.start_us).await;
    let (worker0, me0) = stats::sample_worker_and_self(pid);
    sleep_until_us(window.end_us).await;
    let (worker1, me1) = stats::sample_worker_and_self(pid);

    let mut published = Published::default();
    for p in publishers {
        let r = p.await.map_err(|e| e.to_string())?;
        published.in_window += r.in_window;
        published.errors.merge(r.errors);
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
               "duration_s": secs}),
    );
    report.add("sockets", specs.len() as u64);
    report.add("setup_seconds", round2(setup_secs));
    report.add(
        "published_per_sec",
        round2(published.in_window as f64 / secs),
    );
    report.add_deliveries(&received, expected, secs);
    report.add_errors(&[&setup, &published.errors, &received]);
    report.add_processes((worker0, worker1), received.in_window, (me0, me1));
    Ok(report)
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
pub async fn publish(
    mut ws: Ws,
    protocol: Protocol,
    frames: Frames,
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
                    let msg = client::broadcast(&protocol, frames, &topic, sent, &body);
                    if let Err(e) = ws.feed(msg).await {
                        out.errors.error(format!("publish: {e}"));
                        break 'run;
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
                if ws.send(tokio_tungstenite::tungstenite::Message::text(HEARTBEAT)).await.is_err() {
                    out.errors.error("heartbeat failed");
                    break;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(m)) => {
                    if let Incoming::Failure(f) = client::classify(&m) {
                        out.errors.error(format!("publisher: {f}"));
                        break;
                    }
                }
                Some(Err(e)) => {
                    out.errors.error(format!("publisher read: {e}"));
                    break;
                }
                None => {
                    out.errors.error("publisher socket closed");
                    break;
                }
            }
        }
    }
    common::close(ws).await;
    out
}
