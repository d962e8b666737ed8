//! `presence-room`: a big room built up slowly, then what one newcomer and one member's join
//! or leave cost in it.
//!
//! K members (keys `m0` … `m<K-1>`) join one topic with presence enabled and track once,
//! `--batch` of them at a time with `--pause` between batches (spread over child processes as
//! in `presence`: subcommand `presence-room-child`). Once every member tracked and the room
//! settled, the parent repeats `--samples` times, one after the other:
//!
//! 1. a newcomer socket (connected beforehand) sends `phx_join` with presence enabled under
//!    the key `probe`: the time until its `presence_state` arrives, which must hold all K
//!    members;
//! 2. the newcomer tracks `{"s": <sample>}`: the time until every one of the K members
//!    received a `presence_diff` joining `probe` with that meta (the slowest member's time;
//!    the fastest one's too);
//! 3. the newcomer closes its socket: the same for the `presence_diff` leaving `probe`.
//!
//! A room of K tracked members plus the newcomer holds K + 1 keys: when `--pg` is given and
//! `realtime.max_presence_keys` is lower, the run raises it (`ALTER SYSTEM`) and says so.
//!
//! Members do not keep the room's state: they look at a frame's event only, and search a
//! `presence_diff` for the probe's key before parsing it (two small frames per sample), so the
//! generator's share of the two cores stays small. Building the room still moves every
//! earlier member's meta to every joiner (its `presence_state`): about K²/2 metas.
//!
//! Parent and children talk over pipes: a child builds its share and prints
//! `joined <ok> <failed> <seconds>`, then `seen <event> <first_us> <last_us> <members>` once
//! every live member of it received the probe's event (event 2s is sample s's join, 2s + 1 its
//! leave), and `result <json>` after `stop`.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::args::Args;
use super::client::{self, HEARTBEAT, HEARTBEAT_EVERY, Incoming, JoinOptions, Protocol, Role, Ws};
use super::common::{self, Common, Report};
use super::presence::{Refs, Room, Scan, head, presence_map};
use super::stats::{self, Recorder, histogram, latency_json, now_us, proc_delta_json};

/// The newcomer's presence key.
const PROBE: &str = "probe";
/// The ref of each member's track push (its join used "1").
const TRACK_REF: &str = "2";

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let members: usize = args.get("members", 1_000)?;
    let per_proc: usize = args.get("per-proc", 5_000)?;
    let batch: usize = args.get("batch", 500)?;
    let pause: f64 = args.get("pause", 1.0)?;
    let settle: f64 = args.get("settle", 2.0)?;
    let samples: u64 = args.get("samples", 100)?;
    let gap: f64 = args.get("gap", 0.2)?;
    let timeout: f64 = args.get("timeout", 10.0)?;
    let threads: usize = args.get("child-threads", 1)?;
    // A fresh room per run, so nobody left over from an earlier run is in it.
    let topic = args.string("topic", &format!("bench_room_{}", now_us()));
    args.finish()?;
    let Protocol::Phoenix { base, token } = &common.protocol else {
        return Err("presence-room speaks Phoenix only".into());
    };
    if members == 0 || per_proc == 0 || batch == 0 || samples == 0 {
        return Err("--members, --per-proc, --batch and --samples must be at least 1".into());
    }
    let secs =
        |what: &str, s: f64| Duration::try_from_secs_f64(s).map_err(|e| format!("--{what}: {e}"));
    let (settle, gap, timeout) = (
        secs("settle", settle)?,
        secs("gap", gap)?,
        secs("timeout", timeout)?,
    );
    let raised_key_limit = raise_key_limit(&common, members + 1)?;
    let pid = common.watched_pid();

    // Each child builds its share in steps of its part of a batch.
    let procs = members.div_ceil(per_proc);
    let extra = [
        "--topic".to_string(),
        topic.clone(),
        "--url".into(),
        base.clone(),
        "--batch".into(),
        batch.div_ceil(procs).to_string(),
        "--pause".into(),
        pause.to_string(),
    ];
    let worker0 = pid.and_then(stats::sample);
    let started = Instant::now();
    let mut children = common::spawn_children(
        &common,
        "presence-room-child",
        token,
        members,
        per_proc,
        threads,
        &extra,
    )?;
    let (joined, failed) = common::read_joined(&mut children).await?;
    let build_secs = started.elapsed().as_secs_f64();
    let worker1 = pid.and_then(stats::sample);

    let mut report = Report::new("presence-room");
    report.add(
        "params",
        json!({"members": members, "per_proc": per_proc, "batch": batch, "pause_s": pause,
               "samples": samples, "topic": topic, "source_addrs": common.source_addrs,
               "raised_max_presence_keys": raised_key_limit}),
    );
    report.add("joined", joined);
    report.add("failed", failed);
    report.add("build_seconds", stats::round2(build_secs));
    report.add("build_server_process", proc_delta_json(worker0, worker1));

    let mut probe = Probe::default();
    let generator = |children: &[common::Child]| {
        sum_samples(
            children
                .iter()
                .map(|c| c.pid)
                .chain([Some(std::process::id() as i32)]),
        )
    };
    let (mut worker2, mut worker3, mut gen2, mut gen3) = (None, None, None, None);
    if failed == 0 && joined == members as u64 {
        tokio::time::sleep(settle).await;
        (worker2, gen2) = (pid.and_then(stats::sample), generator(&children));
        for s in 0..samples {
            probe
                .sample(&common, &topic, members, s, &mut children, timeout)
                .await?;
            tokio::time::sleep(gap).await;
        }
        (worker3, gen3) = (pid.and_then(stats::sample), generator(&children));
    }

    let mut errors = probe.errors;
    let (mut frames, mut bytes) = (0u64, 0u64);
    for child in children {
        // Past any `seen` lines of events the parent stopped waiting for.
        let result = child.finish(true, &["seen "]).await?;
        frames += result["frames"].as_u64().unwrap_or(0);
        bytes += result["bytes"].as_u64().unwrap_or(0);
        errors.errors += result["errors"].as_u64().unwrap_or(0);
        for s in result["error_samples"].as_array().into_iter().flatten() {
            if errors.error_samples.len() < 5 {
                errors
                    .error_samples
                    .push(s.as_str().unwrap_or("").to_owned());
            }
        }
    }

    let per_member = |total: u64| {
        if joined > 0 {
            stats::round2(total as f64 / joined as f64)
        } else {
            0.0
        }
    };
    report.add("samples_measured", probe.state.len());
    report.add("state_complete", probe.state_complete);
    report.add("fewest_members_in_state", json!(probe.fewest_in_state));
    report.add(
        "state_kib",
        stats::round2(probe.state_bytes as f64 / 1024.0),
    );
    report.add("newcomer_state", latency_json(&probe.state));
    report.add("join_reached_all", latency_json(&probe.join_last));
    report.add("join_reached_first", latency_json(&probe.join_first));
    report.add("leave_reached_all", latency_json(&probe.leave_last));
    report.add("leave_reached_first", latency_json(&probe.leave_first));
    report.add("diffs_missed", probe.missed);
    report.add("fewest_members_reached", probe.fewest_reached);
    report.add("frames_per_member", per_member(frames));
    report.add("kib_per_member", stats::round2(per_member(bytes) / 1024.0));
    report.add("server_process", proc_delta_json(worker2, worker3));
    report.add(
        "server_cpu_ms_per_sample",
        match (worker2, worker3) {
            (Some(a), Some(b)) if !probe.state.is_empty() => {
                let cpu = stats::cpu_us_per(Some(a), Some(b), probe.state.len());
                json!(cpu.as_f64().map(|us| stats::round2(us / 1000.0)))
            }
            _ => json!(null),
        },
    );
    report.add("generator_processes", proc_delta_json(gen2, gen3));
    report.add("errors", errors.errors + failed);
    report.add("error_samples", json!(errors.error_samples));
    Ok(report)
}

/// Makes sure a topic may hold `keys` presence keys; returns the old limit if it was raised.
fn raise_key_limit(common: &Common, keys: usize) -> Result<Option<i64>, String> {
    let Some(conn_str) = common.pg.clone() else {
        return Ok(None);
    };
    common::blocking(move || -> Result<Option<i64>, String> {
        let mut c = postgres::Client::connect(&conn_str, postgres::NoTls)
            .map_err(|e| format!("--pg: {e}"))?;
        let limit: String = c
            .query_one("SHOW realtime.max_presence_keys", &[])
            .map_err(|e| format!("SHOW realtime.max_presence_keys: {e}"))?
            .get(0);
        let limit: i64 = limit.parse().map_err(|_| format!("limit {limit:?}"))?;
        if limit >= keys as i64 {
            return Ok(None);
        }
        // One statement at a time: ALTER SYSTEM cannot run inside a transaction block.
        for sql in [
            format!("ALTER SYSTEM SET realtime.max_presence_keys = {keys}"),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            c.batch_execute(&sql).map_err(|e| {
                format!(
                    "{sql}: {}",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_owned())
                )
            })?;
        }
        // The worker rereads its settings at its next turn.
        std::thread::sleep(Duration::from_secs(1));
        Ok(Some(limit))
    })
    .ok_or("raising the key limit panicked")?
}

/// The children's RSS and CPU added up, as one process (None if any cannot be read).
fn sum_samples(pids: impl Iterator<Item = Option<i32>>) -> Option<stats::ProcSample> {
    let mut total = stats::ProcSample {
        rss_kib: 0,
        cpu_ticks: 0,
        at_us: now_us(),
    };
    for pid in pids {
        let s = stats::sample(pid?)?;
        total.rss_kib += s.rss_kib;
        total.cpu_ticks += s.cpu_ticks;
    }
    Some(total)
}

/// What the newcomer measured.
struct Probe {
    state: hdrhistogram::Histogram<u64>,
    join_last: hdrhistogram::Histogram<u64>,
    join_first: hdrhistogram::Histogram<u64>,
    leave_last: hdrhistogram::Histogram<u64>,
    leave_first: hdrhistogram::Histogram<u64>,
    /// Newcomers whose `presence_state` held every member.
    state_complete: u64,
    /// The fewest members a newcomer's `presence_state` held.
    fewest_in_state: Option<usize>,
    /// Bytes of the last `presence_state` frame.
    state_bytes: usize,
    /// Events that did not reach every member within the timeout.
    missed: u64,
    fewest_reached: Option<u64>,
    errors: Recorder,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            state: histogram(),
            join_last: histogram(),
            join_first: histogram(),
            leave_last: histogram(),
            leave_first: histogram(),
            state_complete: 0,
            fewest_in_state: None,
            state_bytes: 0,
            missed: 0,
            fewest_reached: None,
            errors: Recorder::default(),
        }
    }
}

impl Probe {
    /// One newcomer: join (its state), track (the join diff), close (the leave diff).
    async fn sample(
        &mut self,
        common: &Common,
        topic: &str,
        members: usize,
        s: u64,
        children: &mut [common::Child],
        timeout: Duration,
    ) -> Result<(), String> {
        let Protocol::Phoenix { token, .. } = &common.protocol else {
            return Err("Phoenix only".into());
        };
        let source = client::source_addr(members + s as usize, common.source_addrs);
        let mut ws = match client::connect(&common.protocol, topic, Role::Subscriber, source).await
        {
            Ok(ws) => ws,
            Err(e) => {
                self.errors.error(format!("newcomer: {e}"));
                return Ok(());
            }
        };
        let options = JoinOptions {
            presence_key: Some(PROBE.into()),
            ..JoinOptions::default()
        };
        let join = client::join_frame("1", topic, token, &options);
        let sent = now_us();
        if let Err(e) = ws.send(Message::text(join)).await {
            self.errors.error(format!("newcomer join: {e}"));
            return Ok(());
        }
        match tokio::time::timeout(timeout, read_state(&mut ws, members)).await {
            Ok(Ok((at, complete, bytes, present))) => {
                self.state.saturating_record(at.saturating_sub(sent).max(1));
                self.fewest_in_state =
                    Some(self.fewest_in_state.map_or(present, |f| f.min(present)));
                self.state_complete += u64::from(complete);
                self.state_bytes = bytes;
            }
            Ok(Err(e)) => {
                self.errors.error(format!("newcomer: {e}"));
                common::close(ws).await;
                return Ok(());
            }
            Err(_) => {
                self.errors.error("newcomer: no presence_state in time");
                common::close(ws).await;
                return Ok(());
            }
        }

        let track = format!(
            r#"["1","{TRACK_REF}","realtime:{topic}","presence",{{"type":"presence","event":"track","payload":{{"s":{s}}}}}]"#
        );
        let tracked = now_us();
        if let Err(e) = ws.send(Message::text(track)).await {
            self.errors.error(format!("newcomer track: {e}"));
            return Ok(());
        }
        let reached = wait_seen(children, 2 * s, timeout).await?;
        self.record(reached, tracked, members, true);

        let left = now_us();
        common::close(ws).await;
        let reached = wait_seen(children, 2 * s + 1, timeout).await?;
        self.record(reached, left, members, false);
        Ok(())
    }

    fn record(&mut self, reached: Option<Seen>, sent: u64, members: usize, join: bool) {
        let Some(seen) = reached.filter(|s| s.members > 0) else {
            self.missed += 1;
            self.fewest_reached = Some(0);
            return;
        };
        self.fewest_reached = Some(
            self.fewest_reached
                .map_or(seen.members, |f| f.min(seen.members)),
        );
        if seen.members < members as u64 {
            self.missed += 1;
        }
        let (last, first) = if join {
            (&mut self.join_last, &mut self.join_first)
        } else {
            (&mut self.leave_last, &mut self.leave_first)
        };
        last.saturating_record(seen.last_us.saturating_sub(sent).max(1));
        first.saturating_record(seen.first_us.saturating_sub(sent).max(1));
    }
}

/// Reads the newcomer's socket until its `presence_state`: when it arrived, whether it held
/// all `members` keys (and nobody else), its size and how many members it held.
async fn read_state(ws: &mut Ws, members: usize) -> Result<(u64, bool, usize, usize), String> {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed".into()),
        };
        let at = now_us();
        let text = text.as_str();
        let mut scan = Scan::new(text.as_bytes());
        let h = head(&mut scan)?;
        match h.event.as_ref() {
            "presence_state" => {
                let mut metas = Vec::new();
                presence_map(&mut scan, &mut metas)?;
                let mut room = Room::new(members);
                let others = room.apply(&Refs::default(), &metas, &[]);
                return Ok((
                    at,
                    room.complete() && others == 0,
                    text.len(),
                    room.present(),
                ));
            }
            "phx_reply" => {
                client::reply_to(text, "1")?;
            }
            _ => {
                if let Incoming::Failure(f) = client::classify(&Message::text(text)) {
                    return Err(f);
                }
            }
        }
    }
}

/// When the members saw one event: the first and the last of them, and how many.
#[derive(Clone, Copy, Debug)]
struct Seen {
    first_us: u64,
    last_us: u64,
    members: u64,
}

/// Waits for every child's `seen <event> ...`; None if one did not say it in time.
async fn wait_seen(
    children: &mut [common::Child],
    event: u64,
    timeout: Duration,
) -> Result<Option<Seen>, String> {
    let deadline = Instant::now() + timeout;
    let mut all = Seen {
        first_us: u64::MAX,
        last_us: 0,
        members: 0,
    };
    for child in children {
        loop {
            let line = match tokio::time::timeout_at(deadline, child.lines.next_line()).await {
                Err(_) => return Ok(None),
                Ok(line) => line.map_err(|e| e.to_string())?.unwrap_or_default(),
            };
            let words: Vec<u64> = line
                .strip_prefix("seen ")
                .map(|rest| {
                    rest.split_whitespace()
                        .filter_map(|w| w.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            match words.as_slice() {
                // An event the parent gave up on, reached late.
                [e, ..] if *e < event => continue,
                [e, first, last, n] if *e == event => {
                    all.first_us = all.first_us.min(*first);
                    all.last_us = all.last_us.max(*last);
                    all.members += n;
                    break;
                }
                _ => return Err(format!("child said {line:?} instead of seen {event}")),
            }
        }
    }
    Ok(Some(all))
}

/// What a member tells its process.
enum Note {
    /// Its track was accepted.
    Tracked,
    /// It stopped (an error, or the server closed it) before being told to; whether its
    /// track had been accepted.
    Gone { tracked: bool },
    /// It received the probe's event at this time.
    Seen(u64, u64),
}

/// The child side: build this share of the room, then report the probe's events.
pub async fn child(args: &Args) -> Result<(), String> {
    let count: usize = args.get("count", 0)?;
    let first: usize = args.get("first", 0)?;
    let topic = args.string("topic", "bench_room");
    let base = args.string("url", "ws://127.0.0.1:4000/realtime/v1/websocket");
    let batch: usize = args.get("batch", 500)?;
    let pause: f64 = args.get("pause", 1.0)?;
    let source_addrs: usize = args.get("source-addrs", 4)?;
    let concurrency: usize = args.get("connect-concurrency", 64)?;
    args.finish()?;
    let pause = Duration::try_from_secs_f64(pause).map_err(|e| format!("--pause: {e}"))?;
    let token = std::env::var("REALTIME_BENCH_TOKEN").map_err(|_| "REALTIME_BENCH_TOKEN unset")?;
    let protocol = Protocol::Phoenix { base, token };

    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut setup = Recorder::default();
    let mut tasks = Vec::new();
    let (mut tracked, mut gone) = (0usize, 0usize);
    let started = Instant::now();
    let mut next = first;
    while next < first + count {
        let n = batch.max(1).min(first + count - next);
        let specs: Vec<(String, Role, JoinOptions)> = (next..next + n)
            .map(|i| {
                let options = JoinOptions {
                    presence_key: Some(format!("m{i}")),
                    ..JoinOptions::default()
                };
                (topic.clone(), Role::Subscriber, options)
            })
            .collect();
        let sockets =
            common::connect_many_with(&protocol, specs, next, source_addrs, concurrency).await;
        let mut waiting = 0;
        for (i, socket) in (next..).zip(sockets) {
            match socket {
                Ok(ws) => {
                    waiting += 1;
                    let (notes, stop) = (notes_tx.clone(), stop_rx.clone());
                    tasks.push(tokio::spawn(member(ws, i, topic.clone(), notes, stop)));
                }
                Err(e) => setup.error(e),
            }
        }
        // The batch tracked (or failed) before the pause.
        while waiting > 0 {
            match notes.recv().await {
                Some(Note::Tracked) => tracked += 1,
                Some(Note::Gone { tracked: true }) => {
                    gone += 1;
                    continue;
                }
                Some(Note::Gone { tracked: false }) => gone += 1,
                Some(Note::Seen(..)) => continue,
                None => break,
            }
            waiting -= 1;
        }
        next += n;
        if next < first + count {
            tokio::time::sleep(pause).await;
        }
    }
    drop(notes_tx);
    common::say_joined(tracked, setup.errors + gone as u64, started.elapsed());

    // Event → (first, last, members that saw it); reported once every live member did.
    let mut pending: HashMap<u64, (u64, u64, usize)> = HashMap::new();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let report = |pending: &mut HashMap<u64, (u64, u64, usize)>, live: usize| {
        let done: Vec<u64> = pending
            .iter()
            .filter(|(_, (_, _, n))| *n >= live)
            .map(|(e, _)| *e)
            .collect();
        let mut done = done;
        done.sort_unstable();
        for e in done {
            if let Some((first, last, n)) = pending.remove(&e) {
                println!("seen {e} {first} {last} {n}");
            }
        }
    };
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(l)) if l != "stop" => {}
                _ => break,
            },
            note = notes.recv() => match note {
                Some(Note::Seen(e, at)) => {
                    let p = pending.entry(e).or_insert((u64::MAX, 0, 0));
                    p.0 = p.0.min(at);
                    p.1 = p.1.max(at);
                    p.2 += 1;
                    report(&mut pending, tracked.saturating_sub(gone));
                }
                Some(Note::Gone { .. }) => {
                    gone += 1;
                    report(&mut pending, tracked.saturating_sub(gone));
                }
                Some(Note::Tracked) => tracked += 1,
                None => {}
            },
        }
    }
    let _ = stop_tx.send(true);

    let mut all = setup;
    let (mut frames, mut bytes) = (0u64, 0u64);
    for task in tasks {
        let m = task.await.map_err(|e| e.to_string())?;
        frames += m.frames;
        bytes += m.bytes;
        all.merge(m.errors);
    }
    let result = json!({
        "members": tracked,
        "frames": frames,
        "bytes": bytes,
        "errors": all.errors,
        "error_samples": all.error_samples,
    });
    println!("result {result}");
    Ok(())
}

/// What one member received: presence frames and their bytes, and its errors.
struct Member {
    frames: u64,
    bytes: u64,
    errors: Recorder,
}

async fn member(
    mut ws: Ws,
    index: usize,
    topic: String,
    notes: mpsc::UnboundedSender<Note>,
    mut stop: watch::Receiver<bool>,
) -> Member {
    let mut out = Member {
        frames: 0,
        bytes: 0,
        errors: Recorder::default(),
    };
    let track = format!(
        r#"["1","{TRACK_REF}","realtime:{topic}","presence",{{"type":"presence","event":"track","payload":{{"i":{index}}}}}]"#
    );
    let mut answered = false;
    if let Err(e) = ws.send(Message::text(track)).await {
        out.errors.error(format!("track: {e}"));
        let _ = notes.send(Note::Gone { tracked: false });
        return out;
    }
    let mut beat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let stopped = loop {
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() { break true },
            _ = beat.tick() => {
                if let Err(e) = ws.send(Message::text(HEARTBEAT)).await {
                    out.errors.error(format!("heartbeat: {e}"));
                    break false;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let at = now_us();
                    let text = text.as_str();
                    let mut scan = Scan::new(text.as_bytes());
                    let event = match head(&mut scan) {
                        Ok(h) => h,
                        Err(e) => {
                            out.errors.error(format!("unreadable frame ({e})"));
                            continue;
                        }
                    };
                    match event.event.as_ref() {
                        "presence_state" => {
                            out.frames += 1;
                            out.bytes += text.len() as u64;
                        }
                        "presence_diff" => {
                            out.frames += 1;
                            out.bytes += text.len() as u64;
                            for e in probe_events(text) {
                                let _ = notes.send(Note::Seen(e, at));
                            }
                        }
                        "phx_reply" if event.reference.as_deref() == Some(TRACK_REF) => {
                            match client::reply_to(text, TRACK_REF) {
                                Ok(_) if !answered => {
                                    answered = true;
                                    let _ = notes.send(Note::Tracked);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    out.errors.error(format!("track {e}"));
                                    break false;
                                }
                            }
                        }
                        _ => {
                            if let Incoming::Failure(f) = client::classify(&Message::text(text)) {
                                out.errors.error(f);
                            }
                        }
                    }
                }
                Some(Ok(m)) => {
                    if let Incoming::Failure(f) = client::classify(&m) {
                        out.errors.error(f);
                        if matches!(m, Message::Close(_)) {
                            break false;
                        }
                    }
                }
                Some(Err(e)) => {
                    out.errors.error(format!("read: {e}"));
                    break false;
                }
                None => {
                    out.errors.error("closed");
                    break false;
                }
            }
        }
    };
    if !stopped {
        let _ = notes.send(Note::Gone { tracked: answered });
    }
    common::close(ws).await;
    out
}

/// The probe's events in a `presence_diff` frame: 2s for a join of its meta `{"s": s}`, 2s + 1
/// for a leave. Most diffs do not mention the probe and are not parsed.
fn probe_events(frame: &str) -> Vec<u64> {
    let needle = format!("\"{PROBE}\"");
    if !frame.contains(&needle) {
        return Vec::new();
    }
    let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(frame) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    for (side, leave) in [("joins", 0), ("leaves", 1)] {
        let metas = parts
            .get(4)
            .and_then(|p| p.get(side))
            .and_then(|s| s.get(PROBE))
            .and_then(|k| k.get("metas"))
            .and_then(Value::as_array);
        for meta in metas.into_iter().flatten() {
            if let Some(s) = meta.get("s").and_then(Value::as_u64) {
                events.push(2 * s + leave);
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_events_are_read_from_joins_and_leaves() {
        let join = r#"[null,null,"realtime:r","presence_diff",{"joins":{"probe":{"metas":[{"phx_ref":"a","s":3}]}},"leaves":{}}]"#;
        assert_eq!(probe_events(join), [6]);
        let leave = r#"[null,null,"realtime:r","presence_diff",{"joins":{"m1":{"metas":[{"phx_ref":"b","i":1}]}},"leaves":{"probe":{"metas":[{"phx_ref":"a","s":3}]}}}]"#;
        assert_eq!(probe_events(leave), [7]);
        let other = r#"[null,null,"realtime:r","presence_diff",{"joins":{"m1":{"metas":[{"phx_ref":"b","i":1}]}},"leaves":{}}]"#;
        assert!(probe_events(other).is_empty());
    }
}
