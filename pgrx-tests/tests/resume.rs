//! Offsets and resume: every stored message is delivered with its offset (`meta.offset`, in
//! commit order), and a join that names the last offset it saw
//! (`config.broadcast.replay.offset`) gets exactly the messages stored after it, then live
//! ones; what the server can no longer give is reported, never hidden.

use realtime_integration_tests::{Cluster, Socket, eventually, jwt};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
/// How long a test listens for something that must not arrive.
const QUIET: Duration = Duration::from_millis(500);

fn service_token() -> String {
    jwt(json!({"role": "service_role"}))
}

/// A socket joined to the private `topic`, optionally resuming after `offset`.
fn join(cluster: &Cluster, topic: &str, replay: Option<Value>) -> Socket {
    let mut s = Socket::connect(cluster, &service_token(), "1.0.0");
    let mut broadcast = json!({"self": false});
    if let Some(replay) = replay {
        broadcast["replay"] = replay;
    }
    let reply = s.join(topic, json!({"broadcast": broadcast, "private": true}));
    assert_eq!(reply["status"], "ok", "{reply}");
    s
}

fn send(c: &mut postgres::Client, topic: &str, n: i32) {
    c.execute(
        "SELECT realtime.send(jsonb_build_object('n', $1::int), 'e', $2, true)",
        &[&n, &topic],
    )
    .expect("send");
}

/// The next broadcast: (n, meta).
fn next(s: &mut Socket) -> (i64, Value) {
    let m = s.recv_event("broadcast", WAIT).expect("a broadcast");
    (
        m.payload["payload"]["n"].as_i64().expect("n"),
        m.payload["meta"].clone(),
    )
}

fn offset_of(meta: &Value) -> String {
    meta["offset"]
        .as_str()
        .unwrap_or_else(|| panic!("meta has an offset: {meta}"))
        .to_string()
}

/// Everything that arrives within `QUIET`: (event, payload).
fn drain(s: &mut Socket) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(frame) = s.recv(QUIET) {
        if let Some(m) = realtime_test_client::phoenix::Message::from_frame(&frame, s.vsn) {
            out.push((m.event, m.payload));
        }
    }
    out
}

/// The `n` of every broadcast among `got`, in arrival order.
fn broadcast_ns(got: &[(String, Value)]) -> Vec<i64> {
    got.iter()
        .filter(|(e, _)| e == "broadcast")
        .map(|(_, p)| p["payload"]["n"].as_i64().expect("n"))
        .collect()
}

/// The payloads of the `system` messages among `got`.
fn system_messages(got: &[(String, Value)]) -> Vec<&Value> {
    got.iter()
        .filter(|(e, _)| e == "system")
        .map(|(_, p)| p)
        .collect()
}

/// The texts of the system messages among `got`.
fn system_texts(got: &[(String, Value)]) -> Vec<&str> {
    system_messages(got)
        .into_iter()
        .filter_map(|p| p["message"].as_str())
        .collect()
}

/// Waits until the offsets of everything delivered so far are stored (they are written back
/// in batches after delivery).
fn wait_for_offsets(cluster: &Cluster, topic: &str, count: i64) {
    let mut c = cluster.connect();
    let stored = eventually(WAIT, || {
        let row = c
            .query_one(
                "SELECT count(*) FROM realtime.messages WHERE topic = $1 AND commit_lsn IS NOT NULL",
                &[&topic],
            )
            .expect("count");
        row.get::<_, i64>(0) >= count
    });
    assert!(
        stored,
        "the offsets of {count} messages on {topic} are stored"
    );
}

#[test]
fn stored_messages_carry_their_offsets_in_commit_order() {
    let cluster = Cluster::start("resume_offsets", &[]);
    let mut s = join(&cluster, "order", None);
    let mut a = cluster.connect();
    let mut b = cluster.connect();
    // A sends first but commits last: offsets follow the commit order, not the sending order.
    a.batch_execute("BEGIN").expect("begin");
    send(&mut a, "order", 1);
    send(&mut b, "order", 2);
    send(&mut a, "order", 3);
    a.batch_execute("COMMIT").expect("commit");
    let got: Vec<(i64, Value)> = (0..3).map(|_| next(&mut s)).collect();
    let ns: Vec<i64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(ns, vec![2, 1, 3], "delivered in commit order");
    let offsets: Vec<String> = got.iter().map(|(_, meta)| offset_of(meta)).collect();
    assert!(
        offsets[0] < offsets[1] && offsets[1] < offsets[2],
        "{offsets:?}"
    );
    // One transaction, one commit LSN: its messages differ only in their index.
    assert_eq!(offsets[1][..16], offsets[2][..16], "{offsets:?}");
    assert_eq!(&offsets[1][17..], "00000000");
    assert_eq!(&offsets[2][17..], "00000001");
    for (_, meta) in &got {
        assert!(meta["id"].is_string(), "{meta}");
    }
    // The same offsets are stored on the rows.
    wait_for_offsets(&cluster, "order", 3);
    let mut c = cluster.connect();
    for (n, meta) in &got {
        let row = c
            .query_one(
                "SELECT lpad(to_hex((commit_lsn - '0/0'::pg_lsn)::int8), 16, '0') || '-' ||
                        lpad(to_hex(commit_index), 8, '0')
                   FROM realtime.messages WHERE id = $1::text::uuid",
                &[&meta["id"].as_str().expect("id")],
            )
            .expect("the stored row");
        assert_eq!(
            row.get::<_, String>(0).to_uppercase(),
            offset_of(meta),
            "message {n}"
        );
    }
}

#[test]
fn a_resume_gets_exactly_what_was_missed_then_live_ones() {
    let cluster = Cluster::start("resume_exact", &[]);
    let mut c = cluster.connect();
    let mut s = join(&cluster, "missed", None);
    send(&mut c, "missed", 0);
    let (_, meta) = next(&mut s);
    let last = offset_of(&meta);
    drop(s);
    for n in 1..=5 {
        send(&mut c, "missed", n);
    }
    // A message elsewhere is not part of this topic's history.
    send(&mut c, "elsewhere", 99);
    wait_for_offsets(&cluster, "missed", 6);

    let mut s = join(&cluster, "missed", Some(json!({"offset": last})));
    let mut replayed = Vec::new();
    for _ in 1..=5 {
        let (n, meta) = next(&mut s);
        assert_eq!(meta["replayed"], true, "{meta}");
        replayed.push((n, offset_of(&meta)));
    }
    let ns: Vec<i64> = replayed.iter().map(|(n, _)| *n).collect();
    assert_eq!(ns, vec![1, 2, 3, 4, 5]);
    assert!(replayed.windows(2).all(|w| w[0].1 < w[1].1));
    send(&mut c, "missed", 6);
    let (n, meta) = next(&mut s);
    assert_eq!(n, 6, "then live");
    assert!(meta.get("replayed").is_none(), "{meta}");
    assert!(offset_of(&meta) > replayed[4].1);
    let rest = drain(&mut s);
    assert!(
        rest.iter()
            .all(|(event, _)| event != "broadcast" && event != "system"),
        "nothing twice and no gap reported: {rest:?}"
    );

    // Resuming from the newest offset gives nothing; an offset from the future neither.
    let newest = offset_of(&meta);
    let mut s = join(&cluster, "missed", Some(json!({"offset": newest})));
    assert!(drain(&mut s).iter().all(|(event, _)| event != "broadcast"));
    let mut s = join(
        &cluster,
        "missed",
        Some(json!({"offset": "7FFFFFFFFFFFFFFF-00000000"})),
    );
    assert!(drain(&mut s).iter().all(|(event, _)| event != "broadcast"));
}

/// The worker restarts cleanly (it stores the offsets it delivered before it stops): a resume
/// from before the restart gets every message sent before, while and after it, and no gap.
#[test]
fn a_resume_works_across_a_restart() {
    let cluster = Cluster::start("resume_restart", &[]);
    let mut c = cluster.connect();
    let mut s = join(&cluster, "restart", None);
    send(&mut c, "restart", 0);
    let (_, meta) = next(&mut s);
    let last = offset_of(&meta);
    drop(s);
    send(&mut c, "restart", 1);
    send(&mut c, "restart", 2);
    drop(c);
    cluster.restart();
    let mut c = cluster.connect();
    send(&mut c, "restart", 3);
    wait_for_offsets(&cluster, "restart", 4);
    let mut s = join(&cluster, "restart", Some(json!({"offset": last})));
    let ns: Vec<i64> = (0..3).map(|_| next(&mut s).0).collect();
    assert_eq!(ns, vec![1, 2, 3]);
    let rest = drain(&mut s);
    assert!(
        rest.iter().all(|(event, _)| event != "system"),
        "a clean restart loses nothing: {rest:?}"
    );
}

/// A server that crashed may have delivered messages whose offsets it never stored: a resume
/// from before the crash still gets what is stored, and is told it may have missed some.
#[test]
fn a_resume_from_before_a_crash_is_told_it_may_have_missed_messages() {
    let cluster = Cluster::start("resume_crash", &[]);
    cluster.expect_kill();
    let mut c = cluster.connect();
    let mut s = join(&cluster, "crash", None);
    send(&mut c, "crash", 0);
    let last = offset_of(&next(&mut s).1);
    drop(s);
    send(&mut c, "crash", 1);
    wait_for_offsets(&cluster, "crash", 2);
    // The offsets are written without waiting for the disk; a synchronous commit flushes them.
    send(&mut c, "elsewhere", 0);
    drop(c);
    // SIGKILL to the worker: the postmaster resets every backend and shared memory, as after
    // any crash, and starts the worker again.
    let pid = cluster.worker_pid().expect("the worker runs");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let back = eventually(Duration::from_secs(90), || {
        cluster.worker_pid().is_some_and(|p| p != pid)
            && Socket::try_connect(&cluster, &service_token(), "1.0.0").is_ok()
    });
    assert!(back, "the worker is back after the crash");
    let mut s = join(&cluster, "crash", Some(json!({"offset": last})));
    let got = drain(&mut s);
    let system = system_messages(&got);
    assert_eq!(system.len(), 1, "{got:?}");
    assert_eq!(system[0]["status"], "error");
    assert_eq!(system[0]["extension"], "broadcast");
    let text = system[0]["message"].as_str().expect("message");
    assert!(text.starts_with("Replay gap:"), "{text}");
    let ns = broadcast_ns(&got);
    assert_eq!(ns, vec![1], "what was stored is still replayed");
    // After the crash, offsets from now on are whole again.
    let mut c = cluster.connect();
    let mut s = join(&cluster, "crash", None);
    send(&mut c, "crash", 2);
    let fresh = offset_of(&next(&mut s).1);
    drop(s);
    send(&mut c, "crash", 3);
    wait_for_offsets(&cluster, "crash", 4);
    let mut s = join(&cluster, "crash", Some(json!({"offset": fresh})));
    let got = drain(&mut s);
    assert!(got.iter().all(|(e, _)| e != "system"), "{got:?}");
}

/// A transaction that commits without waiting for the disk can be delivered and then lost in a
/// crash, and the WAL written after the restart reuses its positions: a resume from its offset
/// must be told, not silently skip what the restart wrote below that offset. Here the restart's
/// own WAL carries the horizon past the lost offsets; when more was lost than the restart
/// writes (an operating-system crash loses WAL that was written but not flushed), the offset
/// names no stored message, which `an_offset_that_names_no_stored_message_is_reported` covers.
#[test]
fn a_resume_from_a_message_a_crash_took_back_is_told_so() {
    // The WAL writer and the background writer stay away, so the last page of WAL of an
    // asynchronous commit is still in shared memory when the node dies.
    let cluster = Cluster::start(
        "resume_async_crash",
        &["wal_writer_delay = 10000ms", "bgwriter_lru_maxpages = 0"],
    );
    let mut c = cluster.connect();
    let mut s = join(&cluster, "fast", None);
    send(&mut c, "fast", 0);
    next(&mut s);
    wait_for_offsets(&cluster, "fast", 1);
    // A commit that waits for the disk also flushes the offsets written back before it.
    c.batch_execute("CREATE TABLE public.flushed ()")
        .expect("durable commit");

    c.batch_execute("SET realtime.send_synchronous_commit = off")
        .expect("setting");
    for n in 1..=20 {
        send(&mut c, "fast", n);
    }
    let mut last = String::new();
    for n in 1..=20 {
        let (got, meta) = next(&mut s);
        assert_eq!(got, n);
        last = offset_of(&meta);
    }
    cluster.kill();
    cluster.start_again();

    let mut c = cluster.connect();
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM realtime.messages WHERE topic = 'fast' AND payload->>'n' = '20'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(kept, 0, "the last asynchronous commit died with the node");
    send(&mut c, "fast", 21);
    let mut s = join(&cluster, "fast", Some(json!({"offset": last})));
    let got = drain(&mut s);
    let system = system_texts(&got);
    assert_eq!(system.len(), 1, "{got:?}");
    assert!(system[0].starts_with("Replay gap:"), "{}", system[0]);
}

/// Above the horizon, an offset that names no stored message (deleted, or never issued) is
/// reported, and what is stored after it is still replayed.
#[test]
fn an_offset_that_names_no_stored_message_is_reported() {
    let cluster = Cluster::start("resume_unknown_offset", &[]);
    let mut c = cluster.connect();
    let mut s = join(&cluster, "gone", None);
    send(&mut c, "gone", 1);
    let first = offset_of(&next(&mut s).1);
    send(&mut c, "gone", 2);
    next(&mut s);
    wait_for_offsets(&cluster, "gone", 2);
    c.execute(
        "DELETE FROM realtime.messages WHERE topic = 'gone' AND payload->>'n' = '1'",
        &[],
    )
    .expect("delete");
    let mut s = join(&cluster, "gone", Some(json!({"offset": first})));
    let got = drain(&mut s);
    let system = system_texts(&got);
    assert_eq!(system.len(), 1, "{got:?}");
    assert!(
        system[0].starts_with("Replay gap: the message at this offset is not stored"),
        "{}",
        system[0]
    );
    let ns = broadcast_ns(&got);
    assert_eq!(ns, vec![2]);
}

#[test]
fn more_than_the_limit_or_past_retention_is_reported() {
    let cluster = Cluster::start("resume_gaps", &["realtime.replay_limit = 3"]);
    let mut c = cluster.connect();
    let mut s = join(&cluster, "gaps", None);
    send(&mut c, "gaps", 0);
    let last = offset_of(&next(&mut s).1);
    drop(s);
    for n in 1..=5 {
        send(&mut c, "gaps", n);
    }
    wait_for_offsets(&cluster, "gaps", 6);

    // Only the newest 3 (the setting caps what the client asks), and the client is told.
    let mut s = join(
        &cluster,
        "gaps",
        Some(json!({"offset": last, "limit": 100})),
    );
    let got = drain(&mut s);
    let ns = broadcast_ns(&got);
    assert_eq!(ns, vec![3, 4, 5]);
    let gap = got
        .iter()
        .find(|(e, _)| e == "system")
        .expect("a gap notice");
    let text = gap.1["message"].as_str().expect("message");
    assert!(
        text.starts_with("Replay gap: more than 3 messages"),
        "{text}"
    );

    // Retention drops the day the offset belongs to: the client is told, not silently served
    // what is left.
    c.batch_execute(
        "UPDATE realtime.replay_days SET day = current_date - 30;
         SELECT realtime.maintain_partitions();",
    )
    .expect("retention");
    let lost: bool = c
        .query_one(
            "SELECT lost_through > '0/0' FROM realtime.replay_horizon",
            &[],
        )
        .expect("horizon")
        .get(0);
    assert!(lost);
    let mut s = join(&cluster, "gaps", Some(json!({"offset": last, "limit": 3})));
    let got = drain(&mut s);
    let gap = got
        .iter()
        .find(|(e, _)| e == "system")
        .expect("a gap notice");
    let text = gap.1["message"].as_str().expect("message");
    assert!(text.contains("removed by retention"), "{text}");
}

#[test]
fn public_channels_replay_only_when_allowed() {
    let cluster = Cluster::start("resume_public", &[]);
    let mut c = cluster.connect();
    let join_public = |replay: Value| {
        let mut s = Socket::connect(&cluster, &service_token(), "1.0.0");
        let reply = s.join(
            "open",
            json!({"broadcast": {"replay": replay}, "private": false}),
        );
        (s, reply)
    };
    // While public replay is off, nothing reads a public message's offset, so none is stored;
    // the private message sent after it shows the worker has taken both.
    c.execute(
        "SELECT realtime.send('{\"n\": 0}', 'e', 'open', false)",
        &[],
    )
    .expect("send");
    c.execute("SELECT realtime.send('{\"n\": 2}', 'e', 'open', true)", &[])
        .expect("send");
    wait_for_offsets(&cluster, "open", 1);
    let public_offsets: i64 = c
        .query_one(
            "SELECT count(commit_lsn) FROM realtime.messages WHERE topic = 'open' AND NOT private",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(
        public_offsets, 0,
        "a public message's offset is stored with replay off"
    );
    let (_, reply) = join_public(json!({"offset": "0000000000000000-00000000"}));
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(
        reply["response"]["reason"],
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );

    c.batch_execute("ALTER SYSTEM SET realtime.public_replay = on")
        .expect("setting");
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    let allowed = eventually(WAIT, || {
        let (_, reply) = join_public(json!({"offset": "0000000000000000-00000000"}));
        reply["status"] == "ok"
    });
    assert!(allowed, "public replay is allowed once the setting is on");
    c.execute(
        "SELECT realtime.send('{\"n\": 1}', 'e', 'open', false)",
        &[],
    )
    .expect("send");
    wait_for_offsets(&cluster, "open", 2);
    // A resume finds the public messages stored since (private messages of the same name are
    // not public history); a replay by time finds the older one too.
    let (mut s, reply) = join_public(json!({"offset": "0000000000000000-00000000"}));
    assert_eq!(reply["status"], "ok", "{reply}");
    let got = drain(&mut s);
    assert!(
        got.iter()
            .filter(|(e, _)| e == "broadcast")
            .all(|(_, m)| m["meta"]["replayed"] == true),
        "{got:?}"
    );
    assert_eq!(broadcast_ns(&got), vec![1]);
    let (mut s, reply) = join_public(json!({"since": 0}));
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(broadcast_ns(&drain(&mut s)), vec![0, 1]);
}

#[test]
fn a_malformed_offset_is_refused_with_a_clear_reason() {
    let cluster = Cluster::start("resume_malformed", &[]);
    for bad in [
        json!({"offset": "yesterday"}),
        json!({"offset": 12}),
        json!({"offset": "0/16B3F28"}),
        json!({"offset": "0000000000000000-00000000", "limit": "all"}),
    ] {
        let mut s = Socket::connect(&cluster, &service_token(), "1.0.0");
        let reply = s.join(
            "bad",
            json!({"broadcast": {"replay": bad}, "private": true}),
        );
        assert_eq!(reply["status"], "error", "{bad}: {reply}");
        assert_eq!(
            reply["response"]["reason"], "UnableToReplayMessages: Replay params are not valid",
            "{bad}"
        );
    }
}

/// The worker's own transactions (here: the offsets it writes back) show in the statistics
/// views like any session's.
#[test]
fn the_workers_writes_show_in_the_statistics_views() {
    let cluster = Cluster::start("resume_stats", &[]);
    let mut c = cluster.connect();
    let updated = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT coalesce(sum(n_tup_upd), 0)::int8 FROM pg_stat_user_tables
              WHERE schemaname = 'realtime' AND relname LIKE 'messages%'",
            &[],
        )
        .expect("stats")
        .get(0)
    };
    let before = updated(&mut c);
    for n in 0..3 {
        send(&mut c, "stats", n);
    }
    wait_for_offsets(&cluster, "stats", 3);
    // Only the worker updates these rows (it stores their offsets).
    let shown = eventually(WAIT, || updated(&mut c) >= before + 3);
    assert!(shown, "the worker's updates reach pg_stat_user_tables");
}
