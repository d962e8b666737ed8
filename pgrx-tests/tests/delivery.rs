//! Database messages reach sockets only once committed, in commit order, exactly as sent.

use realtime_integration_tests::{Cluster, Socket, eventually, jwt};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn subscriber(cluster: &Cluster, topic: &str) -> Socket {
    let mut s = Socket::connect(cluster, &jwt(json!({})), "2.0.0");
    let reply = s.join(
        topic,
        json!({"broadcast": {"self": false}, "private": false}),
    );
    assert_eq!(reply["status"], "ok", "{reply}");
    s
}

/// The user payloads of the next `n` broadcasts on the socket.
fn next_payloads(s: &mut Socket, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let m = s
                .recv_event("broadcast", WAIT)
                .unwrap_or_else(|| panic!("broadcast {i} of {n}"));
            m.payload["payload"].clone()
        })
        .collect()
}

fn send(c: &mut postgres::Client, topic: &str, payload: Value) {
    c.execute(
        "SELECT realtime.send($1, 'e', $2, false)",
        &[&payload, &topic],
    )
    .expect("send");
}

#[test]
fn only_committed_messages_are_delivered() {
    let cluster = Cluster::start("delivery_commit", &[]);
    let mut s = subscriber(&cluster, "room");
    let mut a = cluster.connect();
    let mut b = cluster.connect();

    // In progress: not delivered, and it does not hold back transactions that commit first.
    a.batch_execute("BEGIN").unwrap();
    send(&mut a, "room", json!({"n": "uncommitted-yet"}));
    send(&mut b, "room", json!({"n": "first"}));
    assert_eq!(next_payloads(&mut s, 1)[0]["n"], "first");

    // Rolled back: never delivered.
    a.batch_execute("ROLLBACK").unwrap();
    send(&mut b, "room", json!({"n": "second"}));
    assert_eq!(next_payloads(&mut s, 1)[0]["n"], "second");

    // A savepoint rolled back drops exactly its part.
    a.batch_execute("BEGIN").unwrap();
    send(&mut a, "room", json!({"n": 1}));
    a.batch_execute("SAVEPOINT s1").unwrap();
    send(&mut a, "room", json!({"n": 2}));
    a.batch_execute("SAVEPOINT s2").unwrap();
    send(&mut a, "room", json!({"n": 3}));
    a.batch_execute("RELEASE SAVEPOINT s2; ROLLBACK TO SAVEPOINT s1")
        .unwrap();
    send(&mut a, "room", json!({"n": 4}));
    a.batch_execute("SAVEPOINT s3").unwrap();
    send(&mut a, "room", json!({"n": 5}));
    a.batch_execute("RELEASE SAVEPOINT s3; COMMIT").unwrap();
    let got: Vec<Value> = next_payloads(&mut s, 3)
        .iter()
        .map(|p| p["n"].clone())
        .collect();
    assert_eq!(got, vec![json!(1), json!(4), json!(5)]);

    // A failed statement inside send's exception block (an RLS refusal) loses only that message.
    send(&mut b, "room", json!({"n": "last"}));
    assert_eq!(next_payloads(&mut s, 1)[0]["n"], "last");
    assert!(
        s.recv_event("broadcast", Duration::from_millis(300))
            .is_none(),
        "nothing else arrives"
    );
}

#[test]
fn a_thousand_sends_in_one_transaction_arrive_complete_and_in_order() {
    let cluster = Cluster::start("delivery_thousand", &[]);
    let mut s = subscriber(&cluster, "bulk");
    cluster.execute(
        "SELECT realtime.send(jsonb_build_object('i', i), 'e', 'bulk', false) FROM generate_series(1, 1000) i",
    );
    let got: Vec<i64> = next_payloads(&mut s, 1000)
        .iter()
        .map(|p| p["i"].as_i64().expect("i"))
        .collect();
    assert_eq!(got, (1..=1000).collect::<Vec<_>>());
}

#[test]
fn transactions_are_delivered_in_commit_order_not_send_order() {
    commit_order(Cluster::start("delivery_order", &[]));
}

/// Concurrent committers are not serialized, yet lose nothing, aborted transactions are
/// skipped, and each writer's messages keep their order.
#[test]
fn concurrent_committers_lose_nothing_and_keep_their_order() {
    let cluster = Cluster::start("delivery_concurrent", &[]);
    let mut s = subscriber(&cluster, "concurrent");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = cluster.connect();
            std::thread::spawn(move || {
                for i in 0..50 {
                    c.batch_execute("BEGIN").unwrap();
                    send(&mut c, "concurrent", json!({"w": w, "i": i}));
                    let end = if i % 5 == 4 { "ROLLBACK" } else { "COMMIT" };
                    c.batch_execute(end).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    let got = next_payloads(&mut s, 4 * 40);
    for w in 0..4 {
        let mine: Vec<i64> = got
            .iter()
            .filter(|p| p["w"] == w)
            .map(|p| p["i"].as_i64().unwrap())
            .collect();
        let want: Vec<i64> = (0..50).filter(|i| i % 5 != 4).collect();
        assert_eq!(
            mine, want,
            "writer {w}: every committed message, in its order"
        );
    }
}

/// A transaction that queued its messages first but commits last is delivered last, and
/// does not hold up the other's commit. Transaction `a` is stopped between its pre-commit
/// (where its messages enter the queue) and its commit record, behind NOTIFY's commit lock,
/// which a third session holds while it waits for a synchronous standby that does not exist.
#[test]
fn a_transaction_that_queued_first_but_committed_last_is_delivered_last() {
    let cluster = Cluster::start("delivery_overtake", &[]);
    let mut s = subscriber(&cluster, "overtake");
    cluster.execute("CREATE TABLE holder_writes (i int)");
    cluster.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    cluster.execute("SELECT pg_reload_conf()");
    let mut holder = cluster.connect();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_millis(200)); // the reload reaches every backend
    let holding = std::thread::spawn(move || {
        // Takes NOTIFY's lock at pre-commit, then waits for the standby while holding it.
        holder.batch_execute("BEGIN").unwrap();
        // A write, so that its commit record waits for the standby.
        holder
            .batch_execute("INSERT INTO holder_writes VALUES (1); NOTIFY holder")
            .unwrap();
        holder
            .batch_execute("COMMIT")
            .expect("holder commits once its wait is cancelled");
    });
    let mut watcher = cluster.connect();
    let waits_for = |watcher: &mut postgres::Client, pid: i32, event: &str| {
        eventually(WAIT, || {
            watcher
                .query_one(
                    "SELECT coalesce(wait_event, '') = $2 FROM pg_stat_activity WHERE pid = $1",
                    &[&pid, &event],
                )
                .map(|row| row.get::<_, bool>(0))
                .unwrap_or(false)
        })
    };
    assert!(
        waits_for(&mut watcher, holder_pid, "SyncRep"),
        "holder waits for the standby"
    );

    let mut a = cluster.connect();
    let a_pid: i32 = a.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let a_commits = std::thread::spawn(move || {
        a.batch_execute("SET synchronous_commit = local").unwrap();
        a.batch_execute("BEGIN").unwrap();
        send(&mut a, "overtake", json!({"tx": "a"}));
        a.batch_execute("NOTIFY a").unwrap();
        a.batch_execute("COMMIT").expect("a commits");
    });
    assert!(
        waits_for(&mut watcher, a_pid, "object"),
        "a waits for NOTIFY's lock"
    );

    let mut b = cluster.connect();
    b.batch_execute("SET synchronous_commit = local").unwrap();
    b.batch_execute("BEGIN").unwrap();
    send(&mut b, "overtake", json!({"tx": "b"}));
    b.batch_execute("COMMIT")
        .expect("b commits while a is stuck");

    watcher
        .execute("SELECT pg_cancel_backend($1)", &[&holder_pid])
        .unwrap();
    holding.join().expect("holder thread");
    a_commits.join().expect("a thread");
    cluster.execute("ALTER SYSTEM RESET synchronous_standby_names");
    cluster.execute("SELECT pg_reload_conf()");

    let got: Vec<Value> = next_payloads(&mut s, 2)
        .iter()
        .map(|p| p["tx"].clone())
        .collect();
    assert_eq!(got, vec![json!("b"), json!("a")]);
}

fn commit_order(cluster: Cluster) {
    let mut s = subscriber(&cluster, "order");
    commit_order_on(&cluster, &mut s);
}

fn commit_order_on(cluster: &Cluster, s: &mut Socket) {
    let mut a = cluster.connect();
    let mut b = cluster.connect();
    a.batch_execute("BEGIN").unwrap();
    b.batch_execute("BEGIN").unwrap();
    send(&mut a, "order", json!({"tx": "a", "sent": 1}));
    send(&mut b, "order", json!({"tx": "b", "sent": 2}));
    send(&mut a, "order", json!({"tx": "a", "sent": 3}));
    b.batch_execute("COMMIT").unwrap();
    a.batch_execute("COMMIT").unwrap();
    let got: Vec<Value> = next_payloads(s, 3)
        .iter()
        .map(|p| p["tx"].clone())
        .collect();
    assert_eq!(got, vec![json!("b"), json!("a"), json!("a")]);
}

#[test]
fn every_writer_of_broadcast_rows_is_delivered_with_meta_id() {
    let cluster = Cluster::start("delivery_writers", &[]);
    let mut s = subscriber(&cluster, "writers");
    let mut c = cluster.connect();
    c.batch_execute(
        r#"INSERT INTO realtime.messages (topic, extension, event, payload, private)
             VALUES ('writers', 'broadcast', 'plain', '{"via":"insert"}', false);
           INSERT INTO realtime.messages (topic, extension, payload, private)
             VALUES ('writers', 'broadcast', '{"probe":true}', false);
           INSERT INTO realtime.messages (topic, extension, event, payload, private)
             VALUES ('writers', 'presence', 'p', '{"presence":true}', false);
           SELECT realtime.send('{"via":"send"}', 'sent', 'writers', false);
           SELECT realtime.send('{"via":"private"}', 'sent', 'writers', true);"#,
    )
    .unwrap();
    let first = s.recv_event("broadcast", WAIT).expect("the plain insert");
    assert_eq!(first.payload["event"], "plain");
    assert_eq!(first.payload["payload"]["via"], "insert");
    let id: String = c
        .query_one(
            "SELECT id::text FROM realtime.messages WHERE event = 'plain'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(first.payload["meta"]["id"], id.as_str());
    let second = s.recv_event("broadcast", WAIT).expect("the send");
    assert_eq!(second.payload["payload"]["via"], "send");
    assert_eq!(
        second.payload["meta"]["id"],
        second.payload["payload"]["id"]
    );
    // Rows without an event, presence rows and private messages do not reach a public channel.
    assert!(
        s.recv_event("broadcast", Duration::from_millis(500))
            .is_none()
    );
}

#[test]
fn binary_payloads_arrive_as_kind_4_frames_and_not_on_vsn_1() {
    let cluster = Cluster::start("delivery_binary", &[]);
    let mut v2 = subscriber(&cluster, "bin");
    let mut v1 = Socket::connect(&cluster, &jwt(json!({})), "1.0.0");
    assert_eq!(v1.join("bin", json!({"private": false}))["status"], "ok");
    cluster.execute(
        r#"SELECT realtime.send_binary('\x00ff10', 'blob', 'bin', false);
          SELECT realtime.send('{"after":true}', 'json', 'bin', false);"#,
    );
    let m = v2
        .recv_event("broadcast", WAIT)
        .expect("the binary message");
    let (event, bytes, json) = m.binary.expect("a kind-4 frame");
    assert_eq!(
        (event.as_str(), bytes.as_slice(), json),
        ("blob", &[0u8, 255, 16][..], false)
    );
    assert!(m.payload["meta"]["id"].is_string());
    // The vsn 1.0.0 socket cannot represent bytes: it gets only the JSON message.
    let only = v1.recv_event("broadcast", WAIT).expect("the JSON message");
    assert_eq!(only.payload["event"], "json");
}

/// A private join with Broadcast Replay gets every message from `since` on exactly once, the
/// stored ones replayed and the later ones live, with none lost at the seam while a writer
/// keeps sending: a message committed after the replay's snapshot must not be dispatched
/// before the channel has subscribed.
#[test]
fn replay_then_live_has_no_gap_while_messages_keep_coming() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = Cluster::start("delivery_replay_seam", &["realtime.replay_limit = 5000"]);
    cluster.execute("SELECT realtime.setup_api_roles()");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut c = cluster.connect();
        std::thread::spawn(move || {
            let mut seq = 0i32;
            while !stop.load(Ordering::Relaxed) {
                c.execute(
                    "SELECT realtime.send(jsonb_build_object('seq', $1::int), 'e', 'seam', true)",
                    &[&seq],
                )
                .expect("send");
                seq += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let token = jwt(json!({"role": "service_role"}));
    for round in 0..8 {
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
            - 100;
        let mut s = Socket::connect(&cluster, &token, "2.0.0");
        let reply = s.join(
            "seam",
            json!({"broadcast": {"self": false, "replay": {"since": since_ms, "limit": 5000}},
                   "private": true}),
        );
        assert_eq!(reply["status"], "ok", "{reply}");
        let started = std::time::Instant::now();
        let mut seqs = Vec::new();
        while started.elapsed() < Duration::from_millis(400) {
            if let Some(m) = s.recv_event("broadcast", Duration::from_millis(100)) {
                seqs.push(m.payload["payload"]["seq"].as_i64().expect("seq"));
            }
        }
        assert!(
            seqs.len() > 10,
            "round {round}: only {} messages",
            seqs.len()
        );
        seqs.sort_unstable();
        for pair in seqs.windows(2) {
            assert_eq!(
                pair[1],
                pair[0] + 1,
                "round {round}: after message {} came {} (lost or twice)",
                pair[0],
                pair[1]
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
}

#[test]
fn only_message_only_transactions_skip_the_disk_wait_and_only_when_asked() {
    let cluster = Cluster::start("delivery_async_commit", &[]);
    let mut s = subscriber(&cluster, "fast");
    let mut c = cluster.connect();
    c.batch_execute("CREATE TABLE public.orders (n int)")
        .unwrap();
    let async_commits = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT async_commits FROM realtime.stats()", &[])
            .unwrap()
            .get(0)
    };
    let mut expect = |c: &mut postgres::Client, sql: &str, more: i64, ns: &[i64]| {
        let before = async_commits(c);
        c.batch_execute(sql).unwrap();
        assert_eq!(async_commits(c) - before, more, "{sql}");
        let got: Vec<Value> = next_payloads(&mut s, ns.len())
            .into_iter()
            .map(|p| p["n"].clone())
            .collect();
        assert_eq!(
            got,
            ns.iter().map(|&n| json!(n)).collect::<Vec<_>>(),
            "{sql}"
        );
    };
    let send =
        |n: i64| format!("SELECT realtime.send(jsonb_build_object('n', {n}), 'e', 'fast', false);");

    // The default waits for the disk.
    expect(&mut c, &send(1), 0, &[1]);

    c.batch_execute("SET realtime.send_synchronous_commit = off")
        .unwrap();
    expect(&mut c, &send(2), 1, &[2]);
    expect(
        &mut c,
        &format!("BEGIN; {} {} COMMIT;", send(3), send(3)),
        1,
        &[3, 3],
    );
    // Anything else written in the transaction, before or after, keeps it durable.
    expect(
        &mut c,
        &format!(
            "BEGIN; INSERT INTO public.orders VALUES (4); {} COMMIT;",
            send(4)
        ),
        0,
        &[4],
    );
    expect(
        &mut c,
        &format!(
            "BEGIN; {} INSERT INTO public.orders VALUES (5); COMMIT;",
            send(5)
        ),
        0,
        &[5],
    );
    // The caller's own setting is back after the commit.
    let setting: String = c.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(setting, "on");
    assert_eq!(
        c.query_one("SELECT count(*) FROM public.orders", &[])
            .unwrap()
            .get::<_, i64>(0),
        2
    );
}

#[test]
fn partitions_with_their_own_column_order_deliver_their_rows() {
    let cluster = Cluster::start("delivery_column_order", &[]);
    let mut s = subscriber(&cluster, "columns");
    let mut c = cluster.connect();
    // The trigger reads each partition's rows with that partition's own descriptor: one made
    // with its columns in another order, with a dropped column before them, and attached
    // later, must be read by name, not with the attribute numbers of the others.
    c.batch_execute(
        r#"CREATE TABLE realtime.messages_2099_01_01 (
               gone int,
               commit_index integer, commit_lsn pg_lsn, expires_at timestamp,
               binary_payload bytea, id uuid NOT NULL DEFAULT gen_random_uuid(),
               inserted_at timestamp NOT NULL DEFAULT now(),
               updated_at timestamp NOT NULL DEFAULT now(), private boolean DEFAULT false,
               event text, payload jsonb, extension text NOT NULL, topic text NOT NULL,
               CONSTRAINT messages_payload_exclusive
                   CHECK (payload IS NULL OR binary_payload IS NULL));
           ALTER TABLE realtime.messages_2099_01_01 DROP COLUMN gone;
           ALTER TABLE realtime.messages ATTACH PARTITION realtime.messages_2099_01_01
               FOR VALUES FROM ('2099-01-01') TO ('2099-01-02');"#,
    )
    .unwrap();
    // Today's partition first, so that the backend has cached a layout before it meets the
    // other one, then back again.
    for (n, day) in ["now()", "'2099-01-01 12:00'", "now()", "'2099-01-01 13:00'"]
        .iter()
        .enumerate()
    {
        c.batch_execute(&format!(
            r#"INSERT INTO realtime.messages (topic, extension, event, payload, private, inserted_at)
                 VALUES ('columns', 'broadcast', 'e{n}', '{{"n":{n}}}', false, {day});
               INSERT INTO realtime.messages (topic, extension, payload, private, inserted_at)
                 VALUES ('columns', 'broadcast', '{{"probe":true}}', false, {day});"#
        ))
        .unwrap();
    }
    for n in 0..4 {
        let m = s.recv_event("broadcast", WAIT).expect("every row");
        assert_eq!(m.payload["event"], format!("e{n}"));
        assert_eq!(m.payload["payload"]["n"], n);
    }
    // The rows without an event were not queued, in either layout.
    assert!(
        s.recv_event("broadcast", Duration::from_millis(500))
            .is_none()
    );
}

#[test]
fn only_commits_for_joined_topics_wake_the_worker_and_the_others_are_still_taken() {
    let cluster = Cluster::start("delivery_unwatched", &[]);
    let mut c = cluster.connect();
    let unwatched = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT unwatched_commits FROM realtime.stats()", &[])
            .unwrap()
            .get(0)
    };
    let mut s = subscriber(&cluster, "joined");
    // A delivered message sets the worker looking at the ring by itself for a while.
    send(&mut c, "joined", json!({"n": 0}));
    assert_eq!(next_payloads(&mut s, 1)[0]["n"], 0);

    // Commits for topics nobody joined: at least one of them does not wake the worker (it
    // stops looking a second after the last message, so a very slow machine may need more).
    // Private, so that their offsets are stored (public ones' only with public replay on).
    let mut sent = 0;
    while unwatched(&mut c) == 0 && sent < 500 {
        c.execute(
            "SELECT realtime.send($1, 'e', $2, true)",
            &[&json!({"n": sent}), &format!("nobody-{sent}")],
        )
        .expect("send");
        sent += 1;
    }
    assert!(
        unwatched(&mut c) > 0,
        "{sent} commits for unjoined topics all woke the worker"
    );
    // ... and the worker still takes every one of them: each gets its offset.
    let stored = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM realtime.messages WHERE topic LIKE 'nobody-%' AND commit_lsn IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert!(
        eventually(WAIT, || stored(&mut c) == sent),
        "{} of {sent} offsets stored",
        stored(&mut c)
    );

    // Every commit for a joined topic wakes the worker.
    let before = unwatched(&mut c);
    for n in 1..=20 {
        send(&mut c, "joined", json!({"n": n}));
        assert_eq!(next_payloads(&mut s, 1)[0]["n"], n);
    }
    assert_eq!(
        unwatched(&mut c),
        before,
        "a commit for a joined topic did not wake the worker"
    );

    // Once its last subscriber is gone, the topic no longer wakes the worker either.
    drop(s);
    let before = unwatched(&mut c);
    let mut more = 0;
    while unwatched(&mut c) == before && more < 500 {
        send(&mut c, "joined", json!({"n": more}));
        more += 1;
    }
    assert!(
        unwatched(&mut c) > before,
        "{more} commits for a left topic all woke the worker"
    );
}
