//! `presence`: K members (sockets) join one topic with presence enabled under keys `m0` …
//! `m<K-1>`, then each tracks once. Every member keeps the room's state from `presence_state`
//! and `presence_diff` as realtime-js does (joins first, then leaves; a meta is identified by
//! its `phx_ref`), and the figure is the time from the first track sent until every member's
//! state holds all K keys.
//!
//! Every member receives every member's join, so the room moves K² metas: at K = 10,000 that
//! is 100 million, several GB of JSON. Members therefore read presence frames with a small
//! scanner instead of building `serde_json::Value`s, and keep their state as one slot per
//! expected key holding an interned `phx_ref`, not as maps of strings; otherwise the generator,
//! not the server, would be what is measured.
//!
//! Sockets are spread over child processes as in `connections` (subcommand `presence-child`).
//! Parent and children talk over pipes: a child prints `joined <ok> <failed> <seconds>`, waits
//! for `track` (or `stop`) on stdin, prints `converged <n>` once all its members hold all K keys
//! (or the timeout passed), on `check` has every member note whether its state is still
//! complete and prints `checked <n>`, then waits for `stop` and prints `result <json>`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
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
use super::stats::{self, ProcSample, Recorder, histogram, latency_json, now_us, proc_delta_json};

/// The ref of each member's track push (its join used "1").
const TRACK_REF: &str = "2";

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let members: usize = args.get("members", 100)?;
    let per_proc: usize = args.get("per-proc", 5_000)?;
    // A fresh room per run, so nobody left over from an earlier run is in it.
    let topic = args.string("topic", &format!("bench_presence_{}", now_us()));
    let timeout: f64 = args.get("timeout", 60.0)?;
    let threads: usize = args.get("child-threads", 1)?;
    args.finish()?;
    let Protocol::Phoenix { base, token } = &common.protocol else {
        return Err("presence speaks Phoenix only".into());
    };
    if members == 0 || per_proc == 0 {
        return Err("--members and --per-proc must be at least 1".into());
    }
    let pid = common.watched_pid();

    let started = Instant::now();
    let extra = [
        "--members".to_string(),
        members.to_string(),
        "--topic".into(),
        topic.clone(),
        "--url".into(),
        base.clone(),
        "--timeout".into(),
        timeout.to_string(),
    ];
    let mut children = common::spawn_children(
        &common,
        "presence-child",
        token,
        members,
        per_proc,
        threads,
        &extra,
    )?;
    let (joined, failed) = common::read_joined(&mut children).await?;
    let join_secs = started.elapsed().as_secs_f64();

    // A room with a member missing can never converge: skip straight to the results.
    let command: &[u8] = if failed == 0 && joined == members as u64 {
        b"track\n"
    } else {
        b"stop\n"
    };
    let generator = |children: &[common::Child]| sum_samples(children.iter().map(|c| c.pid));
    let (worker0, gen0) = (pid.and_then(stats::sample), generator(&children));
    common::tell_all(&mut children, command).await?;
    let mut converged = 0u64;
    for child in &mut children {
        let line = child.lines.next_line().await.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.as_deref().unwrap_or("").split_whitespace().collect();
        match words.as_slice() {
            ["converged", n] => converged += n.parse::<u64>().unwrap_or(0),
            _ => return Err(format!("child said {line:?} instead of converged")),
        }
    }
    let (worker1, gen1) = (pid.and_then(stats::sample), generator(&children));
    // Every member notes whether its state is still complete before any socket closes: a
    // closing member's leave would otherwise reach the others.
    common::tell_all(&mut children, b"check\n").await?;
    for child in &mut children {
        let line = child.lines.next_line().await.map_err(|e| e.to_string())?;
        if !line.as_deref().unwrap_or("").starts_with("checked ") {
            return Err(format!("child said {line:?} instead of checked"));
        }
    }

    let mut first_track = u64::MAX;
    let mut converged_at: Vec<u64> = Vec::new();
    let (mut tracks, mut complete_before_close, mut errors) = (0u64, 0u64, 0u64);
    let (mut frames, mut bytes, mut frames_min, mut frames_max) = (0u64, 0u64, u64::MAX, 0u64);
    let mut samples: Vec<Value> = Vec::new();
    for child in children {
        let result = child.finish(true, &[]).await?;
        let num = |k: &str| result[k].as_u64().unwrap_or(0);
        if let Some(t) = result["first_track_us"].as_u64() {
            first_track = first_track.min(t);
        }
        if let Some(all) = result["converged_at_us"].as_array() {
            converged_at.extend(all.iter().filter_map(Value::as_u64));
        }
        tracks += num("tracks_sent");
        complete_before_close += num("complete_before_close");
        errors += num("errors");
        frames += num("frames");
        bytes += num("bytes");
        if num("members") > 0 {
            frames_min = frames_min.min(num("frames_min"));
            frames_max = frames_max.max(num("frames_max"));
        }
        if let Some(s) = result["error_samples"].as_array() {
            samples.extend(s.iter().cloned());
        }
    }
    samples.truncate(5);

    let mut per_member = histogram();
    for t in &converged_at {
        per_member.saturating_record(t.saturating_sub(first_track).max(1));
    }
    let all_converged = converged == members as u64 && converged_at.len() == members;
    let convergence = converged_at
        .iter()
        .max()
        .filter(|_| all_converged)
        .map(|last| json!(stats::round2(last.saturating_sub(first_track) as f64 / 1e6)))
        .unwrap_or(json!(null));
    let mean = |total: u64| {
        if joined > 0 {
            stats::round2(total as f64 / joined as f64)
        } else {
            0.0
        }
    };
    let mut report = Report::new("presence");
    report.add(
        "params",
        json!({"members": members, "per_proc": per_proc, "topic": topic,
               "source_addrs": common.source_addrs, "timeout_s": timeout}),
    );
    report.add("joined", joined);
    report.add("failed", failed);
    report.add("join_seconds", stats::round2(join_secs));
    report.add("tracks_sent", tracks);
    report.add("converged_members", converged);
    report.add("convergence_seconds", convergence);
    report.add("member_convergence", latency_json(&per_member));
    report.add(
        "presence_frames_per_member",
        json!({"mean": mean(frames), "min": if joined > 0 { frames_min } else { 0 }, "max": frames_max}),
    );
    report.add(
        "presence_kib_per_member",
        stats::round2(mean(bytes) / 1024.0),
    );
    report.add("complete_before_close", complete_before_close);
    report.add("errors", errors + failed);
    report.add("error_samples", json!(samples));
    report.add("server_process", proc_delta_json(worker0, worker1));
    report.add("generator_processes", proc_delta_json(gen0, gen1));
    Ok(report)
}

/// The children's RSS and CPU added up, as one process (None if any cannot be read).
fn sum_samples(pids: impl Iterator<Item = Option<i32>>) -> Option<ProcSample> {
    let mut total = ProcSample {
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

/// The child side: join `count` members, track on `track`, report convergence and results.
pub async fn child(args: &Args) -> Result<(), String> {
    let count: usize = args.get("count", 0)?;
    let first: usize = args.get("first", 0)?;
    let members: usize = args.get("members", 0)?;
    let topic = args.string("topic", "bench_presence");
    let base = args.string("url", "ws://127.0.0.1:4000/realtime/v1/websocket");
    let timeout: f64 = args.get("timeout", 60.0)?;
    let source_addrs: usize = args.get("source-addrs", 4)?;
    let concurrency: usize = args.get("connect-concurrency", 64)?;
    args.finish()?;
    let timeout = Duration::try_from_secs_f64(timeout).map_err(|e| format!("--timeout: {e}"))?;
    let token = std::env::var("REALTIME_BENCH_TOKEN").map_err(|_| "REALTIME_BENCH_TOKEN unset")?;
    let protocol = Protocol::Phoenix { base, token };

    let specs: Vec<(String, Role, JoinOptions)> = (first..first + count)
        .map(|i| {
            let options = JoinOptions {
                presence_key: Some(format!("m{i}")),
                ..JoinOptions::default()
            };
            (topic.clone(), Role::Subscriber, options)
        })
        .collect();
    let started = Instant::now();
    let sockets =
        common::connect_many_with(&protocol, specs, first, source_addrs, concurrency).await;
    let (go_tx, go_rx) = watch::channel(false);
    let (check_tx, check_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (converged_tx, mut converged_rx) = mpsc::unbounded_channel();
    let (checked_tx, mut checked_rx) = mpsc::unbounded_channel();
    let refs: Refs = Arc::default();
    let mut setup = Recorder::default();
    let mut tasks = Vec::new();
    for (i, socket) in (first..).zip(sockets) {
        match socket {
            Ok(ws) => tasks.push(tokio::spawn(member(
                ws,
                i,
                Room::new(members),
                topic.clone(),
                Signals {
                    go: go_rx.clone(),
                    check: check_rx.clone(),
                    stop: stop_rx.clone(),
                    converged: converged_tx.clone(),
                    checked: checked_tx.clone(),
                },
                refs.clone(),
            ))),
            Err(e) => setup.error(e),
        }
    }
    drop((converged_tx, checked_tx));
    common::say_joined(tasks.len(), setup.errors, started.elapsed());

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let command = stdin.next_line().await.ok().flatten().unwrap_or_default();
    let mut converged = 0;
    if command == "track" {
        let _ = go_tx.send(true);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        while converged < tasks.len() {
            tokio::select! {
                c = converged_rx.recv() => match c {
                    Some(()) => converged += 1,
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
    }
    println!("converged {converged}");
    // Members keep their sockets (and so their presence) until every child has converged and
    // every member has checked its state.
    let mut checked = 0;
    if stdin.next_line().await.ok().flatten().as_deref() == Some("check") {
        let _ = check_tx.send(true);
        while checked < tasks.len() {
            match checked_rx.recv().await {
                Some(()) => checked += 1,
                None => break,
            }
        }
    }
    println!("checked {checked}");
    let _ = stdin.next_line().await;
    let _ = stop_tx.send(true);

    let mut all = setup;
    let (mut first_track, mut converged_at) = (None::<u64>, Vec::new());
    let (mut tracks, mut complete, mut frames, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let (mut frames_min, mut frames_max) = (u64::MAX, 0u64);
    let n = tasks.len();
    for task in tasks {
        let m = task.await.map_err(|e| e.to_string())?;
        if let Some(t) = m.track_sent_us {
            tracks += 1;
            first_track = Some(first_track.map_or(t, |f| f.min(t)));
        }
        converged_at.extend(m.converged_us);
        complete += u64::from(m.complete_before_close);
        frames += m.frames;
        bytes += m.bytes;
        frames_min = frames_min.min(m.frames);
        frames_max = frames_max.max(m.frames);
        all.merge(m.errors);
    }
    let result = json!({
        "members": n,
        "tracks_sent": tracks,
        "first_track_us": first_track,
        "converged_at_us": converged_at,
        "complete_before_close": complete,
        "frames": frames,
        "frames_min": if n > 0 { frames_min } else { 0 },
        "frames_max": frames_max,
        "bytes": bytes,
        "errors": all.errors,
        "error_samples": all.error_samples,
    });
    println!("result {result}");
    Ok(())
}

/// `phx_ref` strings interned to small numbers, shared by a process's members (every member
/// sees the same K refs).
pub(crate) type Refs = Arc<Mutex<HashMap<String, u32>>>;

/// How a child steers its members, and how they answer.
struct Signals {
    go: watch::Receiver<bool>,
    check: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    converged: mpsc::UnboundedSender<()>,
    checked: mpsc::UnboundedSender<()>,
}

/// What one member saw.
struct Member {
    /// `presence_state` and `presence_diff` frames, and their bytes.
    frames: u64,
    bytes: u64,
    track_sent_us: Option<u64>,
    converged_us: Option<u64>,
    /// Whether the state still held all K keys once every member had converged, before any
    /// socket closed (no spurious leaves).
    complete_before_close: bool,
    errors: Recorder,
}

async fn member(
    mut ws: Ws,
    index: usize,
    mut room: Room,
    topic: String,
    mut signals: Signals,
    refs: Refs,
) -> Member {
    let mut out = Member {
        frames: 0,
        bytes: 0,
        track_sent_us: None,
        converged_us: None,
        complete_before_close: false,
        errors: Recorder::default(),
    };
    let track = format!(
        r#"["1","{TRACK_REF}","realtime:{topic}","presence",{{"type":"presence","event":"track","payload":{{"i":{index}}}}}]"#
    );
    // realtime-js holds diffs back until the first presence_state; so does this member.
    let (mut synced, mut held): (bool, Vec<String>) = (false, Vec::new());
    let (mut waiting_for_go, mut waiting_for_check) = (true, true);
    let mut beat = tokio::time::interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            // `changed` rather than `wait_for`: the latter holds a lock guard across the await,
            // which makes the task !Send.
            r = signals.stop.changed() => if r.is_err() || *signals.stop.borrow() { break },
            r = signals.check.changed(), if waiting_for_check => {
                if r.is_err() {
                    waiting_for_check = false;
                } else if *signals.check.borrow() {
                    waiting_for_check = false;
                    out.complete_before_close = room.complete();
                    let _ = signals.checked.send(());
                }
            }
            r = signals.go.changed(), if waiting_for_go => {
                if r.is_err() {
                    waiting_for_go = false;
                } else if *signals.go.borrow() {
                    waiting_for_go = false;
                    out.track_sent_us = Some(now_us());
                    if let Err(e) = ws.send(Message::text(track.clone())).await {
                        out.errors.error(format!("track: {e}"));
                        break;
                    }
                }
            }
            _ = beat.tick() => {
                if let Err(e) = ws.send(Message::text(HEARTBEAT)).await {
                    out.errors.error(format!("heartbeat: {e}"));
                    break;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    let mut scan = Scan::new(text.as_bytes());
                    let head = match head(&mut scan) {
                        Ok(h) => h,
                        Err(e) => {
                            out.errors.error(format!("unreadable frame ({e}): {}", clip(text)));
                            continue;
                        }
                    };
                    let applied = match head.event.as_ref() {
                        "presence_state" => {
                            out.frames += 1;
                            out.bytes += text.len() as u64;
                            let mut joins = Vec::new();
                            presence_map(&mut scan, &mut joins).map(|()| {
                                room.clear();
                                let mut unexpected = room.apply(&refs, &joins, &[]);
                                synced = true;
                                for diff in std::mem::take(&mut held) {
                                    unexpected += apply_diff(&mut room, &refs, &diff);
                                }
                                unexpected
                            })
                        }
                        "presence_diff" => {
                            out.frames += 1;
                            out.bytes += text.len() as u64;
                            if synced {
                                let (mut joins, mut leaves) = (Vec::new(), Vec::new());
                                diff(&mut scan, &mut joins, &mut leaves)
                                    .map(|()| room.apply(&refs, &joins, &leaves))
                            } else {
                                held.push(text.to_owned());
                                Ok(0)
                            }
                        }
                        "phx_reply" if head.reference.as_deref() == Some(TRACK_REF) => {
                            if let Err(e) = client::reply_to(text, TRACK_REF) {
                                out.errors.error(format!("track {e}"));
                            }
                            Ok(0)
                        }
                        _ => {
                            if let Incoming::Failure(f) = client::classify(&Message::text(text)) {
                                out.errors.error(f);
                            }
                            Ok(0)
                        }
                    };
                    match applied {
                        Ok(0) => {}
                        Ok(n) => out.errors.error(format!("{n} presence keys not of this run")),
                        Err(e) => out.errors.error(format!("unreadable presence ({e}): {}", clip(text))),
                    }
                    if out.converged_us.is_none() && room.complete() {
                        out.converged_us = Some(now_us());
                        let _ = signals.converged.send(());
                    }
                }
                Some(Ok(m)) => {
                    if let Incoming::Failure(f) = client::classify(&m) {
                        out.errors.error(f);
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    out.errors.error(format!("read: {e}"));
                    break;
                }
                None => {
                    out.errors.error("closed");
                    break;
                }
            }
        }
    }
    common::close(ws).await;
    out
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Applies a held-back `presence_diff` frame; returns the count of unexpected keys.
fn apply_diff(room: &mut Room, refs: &Refs, frame: &str) -> usize {
    let mut scan = Scan::new(frame.as_bytes());
    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    match head(&mut scan).and_then(|_| diff(&mut scan, &mut joins, &mut leaves)) {
        Ok(()) => room.apply(refs, &joins, &leaves),
        // It was read once already, so this cannot happen; count it rather than hide it.
        Err(_) => 1,
    }
}

const NONE: u32 = u32::MAX;

/// One member's view of the room.
pub(crate) struct Room {
    /// The first meta (interned `phx_ref`) of key `m<i>`, or NONE.
    slots: Vec<u32>,
    /// Further metas of a key: a key tracked from two channels, or an update's join applied
    /// before its leave.
    extra: HashMap<usize, Vec<u32>>,
    /// Keys the run did not create; kept so the state stays exact, reported as errors.
    others: HashMap<String, Vec<u32>>,
    /// Slots in use.
    present: usize,
}

/// `(key, phx_ref)` of one meta.
pub(crate) type Meta<'a> = (Cow<'a, str>, Cow<'a, str>);
/// The metas of a presence map, in order.
pub(crate) type Metas<'a> = Vec<Meta<'a>>;

impl Room {
    pub(crate) fn new(members: usize) -> Room {
        Room {
            slots: vec![NONE; members],
            extra: HashMap::new(),
            others: HashMap::new(),
            present: 0,
        }
    }

    fn clear(&mut self) {
        self.slots.fill(NONE);
        self.extra.clear();
        self.others.clear();
        self.present = 0;
    }

    /// Keys of this run present.
    pub(crate) fn present(&self) -> usize {
        self.present
    }

    /// All K keys are present.
    pub(crate) fn complete(&self) -> bool {
        self.present == self.slots.len()
    }

    /// `m<i>` with i < K, written the way this run writes it.
    fn slot(&self, key: &str) -> Option<usize> {
        let digits = key.strip_prefix('m')?;
        let canonical = digits.bytes().all(|c| c.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        let i: usize = digits.parse().ok().filter(|_| canonical)?;
        (i < self.slots.len()).then_some(i)
    }

    /// Joins, then leaves, as phoenix.js `syncDiff` does. Returns how many joined keys were
    /// not of this run.
    pub(crate) fn apply(&mut self, refs: &Refs, joins: &[Meta<'_>], leaves: &[Meta<'_>]) -> usize {
        let mut refs = refs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut unexpected = 0;
        for (key, phx_ref) in joins {
            let next = refs.len() as u32;
            let id = *refs.entry(phx_ref.to_string()).or_insert(next);
            if !self.join(key, id) {
                unexpected += 1;
            }
        }
        for (key, phx_ref) in leaves {
            // A ref never joined cannot be in the state: a leave of it changes nothing.
            if let Some(&id) = refs.get(phx_ref.as_ref()) {
                self.leave(key, id);
            }
        }
        unexpected
    }

    fn join(&mut self, key: &str, id: u32) -> bool {
        let Some(i) = self.slot(key) else {
            let metas = self.others.entry(key.to_owned()).or_default();
            if !metas.contains(&id) {
                metas.push(id);
            }
            return false;
        };
        if self.slots[i] == NONE {
            self.slots[i] = id;
            self.present += 1;
        } else if self.slots[i] != id {
            let more = self.extra.entry(i).or_default();
            if !more.contains(&id) {
                more.push(id);
            }
        }
        true
    }

    fn leave(&mut self, key: &str, id: u32) {
        let Some(i) = self.slot(key) else {
            if let Some(metas) = self.others.get_mut(key) {
                metas.retain(|m| *m != id);
                if metas.is_empty() {
                    self.others.remove(key);
                }
            }
            return;
        };
        if self.slots[i] == id {
            match self.extra.get_mut(&i).and_then(Vec::pop) {
                Some(next) => self.slots[i] = next,
                None => {
                    self.slots[i] = NONE;
                    self.present -= 1;
                }
            }
        } else if let Some(more) = self.extra.get_mut(&i) {
            more.retain(|m| *m != id);
        }
        if self.extra.get(&i).is_some_and(Vec::is_empty) {
            self.extra.remove(&i);
        }
    }
}

/// The parts of `[join_ref, ref, topic, event, payload]` before the payload.
pub(crate) struct Head<'a> {
    pub(crate) reference: Option<Cow<'a, str>>,
    pub(crate) event: Cow<'a, str>,
}

/// Reads up to the payload, leaving `scan` at its start.
pub(crate) fn head<'a>(scan: &mut Scan<'a>) -> Result<Head<'a>, String> {
    scan.eat(b'[')?;
    scan.skip()?;
    scan.eat(b',')?;
    let reference = scan.null_or_string()?;
    scan.eat(b',')?;
    scan.skip()?;
    scan.eat(b',')?;
    let event = scan.string()?;
    scan.eat(b',')?;
    Ok(Head { reference, event })
}

/// `{"joins": {presence map}, "leaves": {presence map}}`.
fn diff<'a>(
    scan: &mut Scan<'a>,
    joins: &mut Metas<'a>,
    leaves: &mut Metas<'a>,
) -> Result<(), String> {
    scan.object(|s, field| match field.as_ref() {
        "joins" => presence_map(s, joins),
        "leaves" => presence_map(s, leaves),
        _ => s.skip(),
    })
}

/// `{key: {"metas": [{"phx_ref": …, …}, …]}, …}`: appends `(key, phx_ref)` per meta.
pub(crate) fn presence_map<'a>(scan: &mut Scan<'a>, out: &mut Metas<'a>) -> Result<(), String> {
    scan.object(|s, key| {
        s.object(|s, field| {
            if field != "metas" {
                return s.skip();
            }
            s.array(|s| {
                let mut phx_ref = None;
                s.object(|s, f| {
                    if f == "phx_ref" {
                        phx_ref = Some(s.string()?);
                        Ok(())
                    } else {
                        s.skip()
                    }
                })?;
                out.push((key.clone(), phx_ref.ok_or("a meta without phx_ref")?));
                Ok(())
            })
        })
    })
}

/// A forward-only reader of one JSON text: just enough for presence frames, without
/// allocating (strings are borrowed unless they contain escapes).
pub(crate) struct Scan<'a> {
    b: &'a [u8],
    at: usize,
    depth: usize,
}

/// Deeper nesting than any presence frame has means garbage; stop before the stack does.
const MAX_DEPTH: usize = 64;

impl<'a> Scan<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Scan<'a> {
        Scan { b, at: 0, depth: 0 }
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.at))
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while matches!(self.b.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
        self.b.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            self.fail(&format!("expected {:?}", c as char))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), String> {
        if self.b.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(())
        } else {
            self.fail("bad literal")
        }
    }

    /// The index of the quote closing a string whose contents start at `from`.
    fn string_end(&self, from: usize) -> Result<usize, String> {
        let mut i = from;
        loop {
            match self.b.get(i) {
                None => return self.fail("unterminated string"),
                Some(b'\\') => i += 2,
                Some(b'"') => return Ok(i),
                Some(_) => i += 1,
            }
        }
    }

    fn string(&mut self) -> Result<Cow<'a, str>, String> {
        self.eat(b'"')?;
        let start = self.at;
        let end = self.string_end(start)?;
        let raw = &self.b[start..end];
        self.at = end + 1;
        if !raw.contains(&b'\\') {
            return std::str::from_utf8(raw)
                .map(Cow::Borrowed)
                .map_err(|e| e.to_string());
        }
        // Escapes are rare here: let serde_json decode the literal, quotes included.
        serde_json::from_slice::<String>(&self.b[start - 1..end + 1])
            .map(Cow::Owned)
            .map_err(|e| e.to_string())
    }

    fn null_or_string(&mut self) -> Result<Option<Cow<'a, str>>, String> {
        if self.peek() == Some(b'n') {
            self.literal(b"null").map(|()| None)
        } else {
            self.string().map(Some)
        }
    }

    fn nest(&mut self, open: u8) -> Result<(), String> {
        self.eat(open)?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.fail("nested too deeply");
        }
        Ok(())
    }

    /// Calls `member` with each key, positioned at its value; `member` must consume the value.
    fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), String>,
    ) -> Result<(), String> {
        self.nest(b'{')?;
        if self.peek() == Some(b'}') {
            self.at += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.fail("expected ',' or '}'"),
            }
        }
    }

    /// Calls `element` positioned at each element; `element` must consume it.
    fn array(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        self.nest(b'[')?;
        if self.peek() == Some(b']') {
            self.at += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.fail("expected ',' or ']'"),
            }
        }
    }

    /// Skips one value of any kind.
    fn skip(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(b'"') => {
                let end = self.string_end(self.at + 1)?;
                self.at = end + 1;
                Ok(())
            }
            Some(b'{') => self.object(|s, _| s.skip()),
            Some(b'[') => self.array(|s| s.skip()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let number = |c: &u8| c.is_ascii_digit() || b"+-.eE".contains(c);
                while self.b.get(self.at).is_some_and(number) {
                    self.at += 1;
                }
                Ok(())
            }
            _ => self.fail("expected a value"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs() -> Refs {
        Arc::default()
    }

    #[test]
    fn reads_state_and_diff_frames() {
        let state = r#"["1",null,"realtime:r","presence_state",{"m0":{"metas":[{"i":0,"phx_ref":"a"}]},"m1":{"metas":[{"phx_ref":"b\u0041","x":[1,{"y":null}]}]}}]"#;
        let mut s = Scan::new(state.as_bytes());
        let h = head(&mut s).expect("head");
        assert_eq!((h.reference, h.event.as_ref()), (None, "presence_state"));
        let mut metas = Vec::new();
        presence_map(&mut s, &mut metas).expect("map");
        let pairs: Vec<(&str, &str)> = metas
            .iter()
            .map(|(k, r)| (k.as_ref(), r.as_ref()))
            .collect();
        assert_eq!(pairs, [("m0", "a"), ("m1", "bA")]);

        let d = r#"[null,null,"realtime:r","presence_diff",{"joins":{"m2":{"metas":[{"phx_ref":"c"}]}},"leaves":{"m0":{"metas":[{"phx_ref":"a"}]}}}]"#;
        let mut s = Scan::new(d.as_bytes());
        head(&mut s).expect("head");
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        diff(&mut s, &mut joins, &mut leaves).expect("diff");
        assert_eq!((joins.len(), leaves.len()), (1, 1));
        assert!(Scan::new(b"[[[[").skip().is_err());
        assert!(Scan::new(b"{\"a\":").skip().is_err());
    }

    #[test]
    fn joins_then_leaves_by_phx_ref() {
        let (refs, mut room) = (refs(), Room::new(2));
        let m = |k: &'static str, r: &'static str| (Cow::Borrowed(k), Cow::Borrowed(r));
        assert_eq!(room.apply(&refs, &[m("m0", "a"), m("m1", "b")], &[]), 0);
        assert!(room.complete());
        // An update: the new meta joins and the old one leaves in the same diff.
        room.apply(&refs, &[m("m1", "c")], &[m("m1", "b")]);
        assert!(room.complete());
        // A leave of a ref that is not there changes nothing.
        room.apply(&refs, &[], &[m("m1", "b"), m("m0", "zz")]);
        assert!(room.complete());
        room.apply(&refs, &[], &[m("m1", "c")]);
        assert!(!room.complete());
        assert_eq!(room.apply(&refs, &[m("m01", "d"), m("x", "e")], &[]), 2);
        assert!(!room.complete());
    }
}
