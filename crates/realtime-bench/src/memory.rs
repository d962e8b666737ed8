//! `memory`: how much private memory the worker holds, and whether it gives it back. The
//! worker's private memory is the `Anonymous:` line of `/proc/<pid>/smaps_rollup` (heap and
//! anonymous mappings, not the shared buffers nor the mapped binary), sampled every
//! `--sample-ms` while four phases run one after the other:
//!
//! 1. **fresh**: one client joins a public channel and leaves; the reading after it is the
//!    baseline;
//! 2. **flood**: one socket with the anon key sends private `phx_join`/`phx_leave` pairs for
//!    distinct topics as fast as it can for `--flood` seconds, reading whatever comes back.
//!    The server limits joins per connection and refuses the rest (rate limit, or
//!    unauthorized: the anon role reads no private channel), which is the point: a client may
//!    do this, and the worker must not keep what it took to refuse it;
//! 3. **fan-out**: the `fanout` scenario with its own options (`--pubs --topics --subs --rate
//!    --payload`, timed by `--warmup --duration --drain`);
//! 4. **idle**: nothing for `--idle` seconds.
//!
//! Reports the baseline, the peak of each phase, the readings after the fan-out and after the
//! idle phase, and how long into the idle phase the worker first held no more than the
//! baseline plus 16 MiB. Reading another user's smaps needs root (or the same user).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::args::Args;
use super::client::{self, Frames, JoinOptions, Protocol, Role};
use super::common::{self, Common, Report};
use super::fanout::{self, Shape};
use super::stats::{Recorder, now_us, round2};

const PHASES: [&str; 4] = ["fresh", "flood", "fanout", "idle"];
/// "Given back" means within this much of the fresh baseline.
const SETTLED_KIB: u64 = 16 * 1024;

/// The `Anonymous:` total of `/proc/<pid>/smaps_rollup`, in KiB.
pub fn anonymous_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Readings of one process: (seconds since the start, phase, KiB).
#[derive(Clone, Default)]
struct Samples(Arc<Mutex<Vec<(f64, usize, u64)>>>);

impl Samples {
    fn push(&self, at: f64, phase: usize, kib: u64) {
        if let Ok(mut v) = self.0.lock() {
            v.push((at, phase, kib));
        }
    }

    fn all(&self) -> Vec<(f64, usize, u64)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What the flooding socket sent and heard.
#[derive(Default)]
struct Flood {
    pairs_sent: u64,
    joins_ok: u64,
    rate_limited: u64,
    other_refusals: u64,
    errors: Recorder,
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let flood_secs: f64 = args.get("flood", 12.0)?;
    let idle_secs: f64 = args.get("idle", 30.0)?;
    let sample_every = Duration::from_millis(args.get("sample-ms", 250)?);
    let shape = Shape::from_args(
        args,
        Shape {
            pubs: 10,
            topics: 10,
            subs: 100,
            rate: 12_000.0,
            size: 100,
            frames: Frames::Text,
            private: false,
            pushes: fanout::Pushes::default(),
        },
    )?;
    args.finish()?;
    let Protocol::Phoenix { token, .. } = &common.protocol else {
        return Err("memory speaks Phoenix only".into());
    };
    let pid = common
        .watched_pid()
        .ok_or("memory needs the worker's pid: --pg <connection string> or --pid")?;
    anonymous_kib(pid).ok_or_else(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;

    let started = Instant::now();
    let phase = Arc::new(AtomicUsize::new(0));
    let samples = Samples::default();
    let sampler = {
        let (phase, samples) = (phase.clone(), samples.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sample_every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(kib) = anonymous_kib(pid) else { break };
                let at = started.elapsed().as_secs_f64();
                samples.push(at, phase.load(Ordering::Relaxed), kib);
            }
        })
    };
    // A reading taken between phases, recorded with the others.
    let reading = |p: usize| {
        let kib = anonymous_kib(pid);
        if let Some(kib) = kib {
            samples.push(started.elapsed().as_secs_f64(), p, kib);
        }
        kib
    };

    // 1. fresh: one client joins and leaves, then the worker settles for a moment.
    let mut errors = Recorder::default();
    let source = client::source_addr(0, common.source_addrs);
    match client::open_with(
        &common.protocol,
        "memory_fresh",
        Role::Subscriber,
        source,
        &JoinOptions::default(),
    )
    .await
    {
        Ok(ws) => common::close(ws).await,
        Err(e) => errors.error(format!("fresh join: {e}")),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = reading(0);

    // 2. flood.
    phase.store(1, Ordering::Relaxed);
    let flood = flood(
        &common.protocol,
        token,
        Duration::try_from_secs_f64(flood_secs).map_err(|e| format!("--flood: {e}"))?,
    )
    .await;
    let after_flood = reading(1);

    // 3. fan-out.
    phase.store(2, Ordering::Relaxed);
    let fan = fanout::run_shape(&common, &shape).await?.to_json();
    let after_fanout = reading(2);

    // 4. idle.
    phase.store(3, Ordering::Relaxed);
    tokio::time::sleep(Duration::try_from_secs_f64(idle_secs).map_err(|e| format!("--idle: {e}"))?)
        .await;
    let after_idle = reading(3);
    sampler.abort();

    let all = samples.all();
    let peak = |p: usize| all.iter().filter(|s| s.1 == p).map(|s| s.2).max();
    let idle_started = all.iter().find(|s| s.1 == 3).map(|s| s.0);
    let settled_after = fresh.and_then(|fresh| {
        let start = idle_started?;
        all.iter()
            .find(|s| s.1 == 3 && s.2 <= fresh + SETTLED_KIB)
            .map(|s| round2(s.0 - start))
    });
    let mib = |kib: Option<u64>| kib.map(|k| round2(k as f64 / 1024.0));

    let mut report = Report::new("memory");
    report.add(
        "params",
        json!({"flood_s": flood_secs, "fanout_s": common.duration.as_secs_f64(),
               "idle_s": idle_secs, "sample_ms": sample_every.as_millis() as u64,
               "pubs": shape.pubs, "topics": shape.topics, "subs_per_topic": shape.subs,
               "rate": shape.rate, "payload_bytes": shape.size, "worker_pid": pid}),
    );
    report.add("fresh_mib", mib(fresh));
    report.add("flood_peak_mib", mib(peak(1)));
    report.add("after_flood_mib", mib(after_flood));
    report.add("fanout_peak_mib", mib(peak(2)));
    report.add("after_fanout_mib", mib(after_fanout));
    report.add("after_idle_mib", mib(after_idle));
    report.add(
        "flood_peak_over_fresh_mib",
        mib(peak(1).zip(fresh).map(|(p, f)| p.saturating_sub(f))),
    );
    report.add(
        "after_idle_over_fresh_mib",
        mib(after_idle.zip(fresh).map(|(a, f)| a.saturating_sub(f))),
    );
    report.add("idle_s_to_fresh_plus_16mib", settled_after);
    report.add("flood_pairs_sent", flood.pairs_sent);
    report.add("flood_joins_ok", flood.joins_ok);
    report.add("flood_rate_limited", flood.rate_limited);
    report.add("flood_other_refusals", flood.other_refusals);
    report.add(
        "fanout_deliveries_per_sec",
        fan["deliveries_per_sec"].clone(),
    );
    report.add("fanout_delivered_ratio", fan["delivered_ratio"].clone());
    report.add("fanout_latency", fan["latency"].clone());
    let fan_errors = fan["errors"].as_u64().unwrap_or(0);
    report.add("errors", errors.errors + flood.errors.errors + fan_errors);
    let mut samples_json: Vec<Value> = errors
        .error_samples
        .iter()
        .chain(&flood.errors.error_samples)
        .map(|e| json!(e))
        .collect();
    if let Some(Value::Array(more)) = fan.get("error_samples") {
        samples_json.extend(more.iter().cloned());
    }
    samples_json.truncate(5);
    report.add("error_samples", Value::Array(samples_json));
    report.add(
        "samples",
        json!(
            all.iter()
                .map(|(at, p, kib)| json!([round2(*at), PHASES[*p], kib]))
                .collect::<Vec<_>>()
        ),
    );
    Ok(report)
}

/// One anonymous socket sends private join/leave pairs for `secs`, as fast as the socket
/// takes them, and reads the replies meanwhile.
async fn flood(protocol: &Protocol, token: &str, secs: Duration) -> Flood {
    let mut out = Flood::default();
    let source = client::source_addr(1, 1);
    let ws = match client::connect(protocol, "", Role::Subscriber, source).await {
        Ok(ws) => ws,
        Err(e) => {
            out.errors.error(format!("flood connect: {e}"));
            return out;
        }
    };
    let (mut sink, mut stream) = ws.split();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let reader = tokio::spawn(async move {
        let mut heard = Flood::default();
        loop {
            tokio::select! {
                r = stop_rx.changed() => if r.is_err() || *stop_rx.borrow() { break },
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(t))) => match join_reply(t.as_str()) {
                        Some(Ok(())) => heard.joins_ok += 1,
                        Some(Err(reason)) if reason.contains("ClientJoinRateLimitReached") => {
                            heard.rate_limited += 1;
                        }
                        Some(Err(_)) => heard.other_refusals += 1,
                        None => {}
                    },
                    Some(Ok(Message::Close(c))) => {
                        heard.errors.error(format!("flood socket closed by server: {c:?}"));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        heard.errors.error(format!("flood read: {e}"));
                        break;
                    }
                    None => {
                        heard.errors.error("flood socket closed");
                        break;
                    }
                }
            }
        }
        (stream, heard)
    });

    let options = JoinOptions {
        private: true,
        ..JoinOptions::default()
    };
    let run_id = now_us() % 1_000_000_000;
    let deadline = Instant::now() + secs;
    // Flushed every few pairs: as fast as the socket takes them, without a syscall per frame.
    const BATCH: u64 = 32;
    'flood: while Instant::now() < deadline {
        for _ in 0..BATCH {
            let n = out.pairs_sent;
            let topic = format!("flood-{run_id}-{n}");
            let join_ref = (2 * n + 1).to_string();
            let join = client::join_frame(&join_ref, &topic, token, &options);
            let leave = client::leave_frame(&join_ref, &(2 * n + 2).to_string(), &topic);
            for frame in [join, leave] {
                if let Err(e) = sink.feed(Message::text(frame)).await {
                    out.errors.error(format!("flood send: {e}"));
                    break 'flood;
                }
            }
            out.pairs_sent += 1;
        }
        if let Err(e) = sink.flush().await {
            out.errors.error(format!("flood send: {e}"));
            break;
        }
    }
    // Replies still on their way are read for a moment, then the socket closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    match reader.await {
        Ok((stream, heard)) => {
            out.joins_ok = heard.joins_ok;
            out.rate_limited = heard.rate_limited;
            out.other_refusals = heard.other_refusals;
            out.errors.merge(heard.errors);
            if let Ok(ws) = sink.reunite(stream) {
                common::close(ws).await;
            }
        }
        Err(e) => out.errors.error(format!("flood reader: {e}")),
    }
    out
}

/// A reply to one of the flood's joins (odd refs; leaves have even ones): `Ok` or the refusal.
fn join_reply(text: &str) -> Option<Result<(), String>> {
    let Ok(Value::Array(a)) = serde_json::from_str(text) else {
        return None;
    };
    let msg_ref: u64 = a.get(1)?.as_str()?.parse().ok()?;
    if msg_ref.is_multiple_of(2) || a.get(3)?.as_str()? != "phx_reply" {
        return None;
    }
    let payload = a.get(4)?;
    match payload.get("status")?.as_str()? {
        "ok" => Some(Ok(())),
        _ => Some(Err(payload.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_replies_to_joins_only() {
        let ok = r#"["1","1","realtime:a","phx_reply",{"status":"ok","response":{}}]"#;
        let leave = r#"["1","2","realtime:a","phx_reply",{"status":"ok","response":{}}]"#;
        let limited = r#"["3","3","realtime:b","phx_reply",{"status":"error","response":{"reason":"ClientJoinRateLimitReached: Too many joins per second"}}]"#;
        assert_eq!(join_reply(ok), Some(Ok(())));
        assert_eq!(join_reply(leave), None);
        assert!(join_reply(limited).is_some_and(|r| r.is_err_and(|e| e.contains("RateLimit"))));
        assert_eq!(join_reply("not json"), None);
    }

    #[test]
    fn reads_the_anonymous_line() {
        assert!(anonymous_kib(std::process::id() as i32).is_some_and(|kib| kib > 0));
    }
}
