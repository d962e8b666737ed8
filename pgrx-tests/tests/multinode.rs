//! Several nodes: a primary and hot standbys made from it with `pg_basebackup -R`, each serving
//! WebSockets. Database messages, client broadcasts and presence cross nodes through
//! PostgreSQL replication; private channels on a standby get the primary's RLS answers; nodes
//! that die, restart or are promoted leave nothing behind and lose nothing committed.

use realtime_integration_tests::{Cluster, Message, Socket, eventually, jwt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long any cross-node effect may take. Generous: a standby sees a commit only once it has
/// replayed it, and a node that died is noticed only after its lease.
const WAIT: Duration = Duration::from_secs(30);
/// How often a waiting client heartbeats, so that no node closes it as idle.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A primary and two standbys of it, all with `settings`.
fn three_nodes(test: &str, settings: &[&str]) -> (Cluster, Cluster, Cluster) {
    let primary = Cluster::start_primary(&format!("{test}_primary"), settings);
    let s1 = Cluster::start_standby(&primary, &format!("{test}_standby1"), settings);
    let s2 = Cluster::start_standby(&primary, &format!("{test}_standby2"), settings);
    (primary, s1, s2)
}

fn socket(node: &Cluster) -> Socket {
    Socket::connect(node, &jwt(json!({})), "2.0.0")
}

fn socket_as(node: &Cluster, claims: Value) -> Socket {
    Socket::connect(node, &jwt(claims), "2.0.0")
}

/// Joins `realtime:<topic>`; returns the join ref (the channel's `join_ref` from then on) and
/// the reply's payload.
fn join(s: &mut Socket, topic: &str, config: Value) -> (String, Value) {
    let r = s.next_ref();
    s.push(
        Some(&r),
        &r,
        &format!("realtime:{topic}"),
        "phx_join",
        json!({"config": config}),
    );
    let reply = reply_to(s, &r).unwrap_or_else(|| panic!("no reply to the join of {topic}"));
    (r, reply)
}

/// Joins and asserts that the join was accepted.
fn join_ok(s: &mut Socket, topic: &str, config: Value) -> String {
    let (r, reply) = join(s, topic, config);
    assert_eq!(reply["status"], "ok", "join {topic}: {reply}");
    r
}

/// The payload of the reply to `reference`, skipping everything else.
fn reply_to(s: &mut Socket, reference: &str) -> Option<Value> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let m = s.recv_event(
            "phx_reply",
            deadline.saturating_duration_since(Instant::now()),
        )?;
        if m.reference.as_deref() == Some(reference) {
            return Some(m.payload);
        }
    }
    None
}

/// A socket joined to public `topic` that does not receive its own broadcasts.
fn subscriber(node: &Cluster, topic: &str) -> Socket {
    let mut s = socket(node);
    join_ok(
        &mut s,
        topic,
        json!({"broadcast": {"self": false}, "private": false}),
    );
    s
}

fn heartbeat(s: &mut Socket) {
    let r = s.next_ref();
    s.push(None, &r, "phoenix", "heartbeat", json!({}));
}

/// The next message of the socket, heartbeating while it waits; None when nothing arrives
/// within `limit`. Panics if the server closes the socket.
fn next_message(s: &mut Socket, limit: Duration, what: &str) -> Option<Message> {
    let deadline = Instant::now() + limit;
    let mut beat = Instant::now() + HEARTBEAT_EVERY;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        if now >= beat {
            heartbeat(s);
            beat = now + HEARTBEAT_EVERY;
        }
        let wait = deadline.min(beat).saturating_duration_since(now);
        match s.recv(wait) {
            Some(realtime_integration_tests::Frame::Close) => {
                let how = match (s.ended_with.flatten(), &s.broke_with) {
                    (Some(code), _) => format!("with close code {code}"),
                    (None, Some(why)) => format!("without a close frame ({why})"),
                    (None, None) => "with a close frame without a code".to_string(),
                };
                panic!("{what}: the server closed the socket {how}")
            }
            Some(frame) => {
                if let Some(m) = Message::from_frame(&frame, s.vsn) {
                    return Some(m);
                }
            }
            None => {}
        }
    }
}

/// The payloads of the next `n` broadcasts whose user event is `event` (others are skipped).
/// Fails when none of them arrives for `WAIT` (the replies to its own heartbeats do not count,
/// or a node that stopped delivering would keep the test waiting forever).
fn user_events(s: &mut Socket, event: &str, n: usize, what: &str) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    let mut deadline = Instant::now() + WAIT;
    while got.len() < n {
        let m = next_message(s, deadline.saturating_duration_since(Instant::now()), what)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: {} of {n} `{event}` broadcasts arrived, then nothing for {WAIT:?}: {got:?}",
                    got.len()
                )
            });
        if m.event == "broadcast" && m.payload["event"] == event {
            got.push(m.payload["payload"].clone());
            deadline = Instant::now() + WAIT;
        }
    }
    got
}

/// Every message that arrives within `window` (a quiet period, not a speed limit).
fn drain(s: &mut Socket, window: Duration) -> Vec<Message> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    while let Some(m) = next_message(
        s,
        deadline.saturating_duration_since(Instant::now()),
        "drain",
    ) {
        got.push(m);
    }
    got
}

/// A client broadcast on a joined channel; returns its ref.
fn push_broadcast(
    s: &mut Socket,
    join_ref: &str,
    topic: &str,
    event: &str,
    payload: Value,
) -> String {
    let r = s.next_ref();
    s.push(
        Some(join_ref),
        &r,
        &format!("realtime:{topic}"),
        "broadcast",
        json!({"type": "broadcast", "event": event, "payload": payload}),
    );
    r
}

/// Sends `probe` broadcasts through `send` until every receiver has seen one. A subscription
/// made on one node is not required to be known to the others at the instant its join is
/// answered; what is required is that, once a message got through, none after it is lost.
fn until_receivers_hear(
    send: &mut dyn FnMut(u64),
    receivers: &mut [(&str, &mut Socket)],
    what: &str,
) {
    let mut heard = vec![false; receivers.len()];
    let mut n = 0;
    let ok = eventually(WAIT, || {
        n += 1;
        send(n);
        // Probes still on their way to a receiver that heard one are skipped later by their
        // event name.
        for ((name, s), heard) in receivers.iter_mut().zip(heard.iter_mut()) {
            while !*heard && let Some(m) = next_message(s, Duration::from_millis(300), name) {
                if m.event == "broadcast" && m.payload["event"] == "probe" {
                    *heard = true;
                }
            }
        }
        heard.iter().all(|h| *h)
    });
    let deaf: Vec<&str> = receivers
        .iter()
        .zip(&heard)
        .filter(|(_, h)| !**h)
        .map(|((name, _), _)| *name)
        .collect();
    assert!(ok, "{what}: no probe reached {deaf:?} within {WAIT:?}");
}

fn send_sql(c: &mut postgres::Client, topic: &str, payload: &Value) {
    c.execute(
        "SELECT realtime.send($1, 'e', $2, false)",
        &[payload, &topic],
    )
    .unwrap_or_else(|e| panic!("realtime.send {payload}: {e:?}"));
}

/// One HTTP request with a bearer token; returns the status (0: no answer).
fn post(node: &Cluster, path: &str, token: &str, body: &Value) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", node.ws_port)).expect("connect for REST");
    s.set_read_timeout(Some(WAIT)).ok();
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("send the request");
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The harness itself, without the feature: standbys replicate and stop cleanly in any order.
#[test]
fn standbys_made_with_pg_basebackup_replicate_and_stop_cleanly() {
    let primary = Cluster::start_primary("mn_harness_primary", &[]);
    let s1 = Cluster::start_standby_with(&primary, "mn_harness_standby1", &[], false);
    let s2 = Cluster::start_standby_with(&primary, "mn_harness_standby2", &[], false);
    assert!(!primary.is_in_recovery(), "the primary is not in recovery");
    for (name, s) in [("standby 1", &s1), ("standby 2", &s2)] {
        assert!(s.is_in_recovery(), "{name} is in recovery");
        let extension: i64 = s
            .connect()
            .query_one(
                "SELECT count(*) FROM pg_extension WHERE extname = 'pg_realtime'",
                &[],
            )
            .expect("read pg_extension on a standby")
            .get(0);
        assert_eq!(
            extension, 1,
            "{name} has the extension from the base backup"
        );
    }
    primary.execute("CREATE TABLE replicated (v int); INSERT INTO replicated VALUES (42)");
    for (name, s) in [("standby 1", &s1), ("standby 2", &s2)] {
        let replayed = eventually(WAIT, || {
            s.connect()
                .query_opt("SELECT v FROM replicated", &[])
                .ok()
                .flatten()
                .is_some_and(|row| row.get::<_, i32>(0) == 42)
        });
        assert!(replayed, "{name} replays the primary's commits");
    }
    // The primary goes first: its standbys must not report its absence as a crash.
    primary.stop();
    s2.stop();
    drop(s1);
}

/// Every node serves WebSockets: a public join on each is answered.
#[test]
fn every_node_serves_websockets() {
    let (primary, s1, s2) = three_nodes("mn_serve", &[]);
    for (name, node) in [
        ("primary", &primary),
        ("standby 1", &s1),
        ("standby 2", &s2),
    ] {
        let mut s = socket(node);
        let (_, reply) = join(&mut s, "hello", json!({"private": false}));
        assert_eq!(reply["status"], "ok", "{name}: {reply}");
        if name != "primary" {
            assert!(node.is_in_recovery(), "{name} is a standby");
            assert!(
                node.wait_for_log("pg_realtime: worker ready", WAIT),
                "{name} logs that it serves"
            );
        }
    }
    s1.stop();
    primary.stop();
    s2.stop();
}

/// A client broadcast on one node reaches the subscribers of every other node, in order, not
/// echoed to a sender with `self: false`, acknowledged with `ack: true`; REST broadcasts too.
#[test]
fn client_broadcasts_cross_nodes() {
    let (primary, s1, s2) = three_nodes("mn_broadcast", &[]);
    let nodes = [
        ("primary", &primary),
        ("standby 1", &s1),
        ("standby 2", &s2),
    ];
    // From standby 1 first (the case a single node never has), then from the others.
    for from in [1, 0, 2] {
        let (sender_name, sender_node) = nodes[from];
        let topic = format!("cross-from-{from}");
        // The other nodes, and the sender's own (which must not get a second copy back from
        // the others).
        let mut receivers: Vec<(&str, Socket)> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != from)
            .map(|(_, (name, node))| (*name, subscriber(node, &topic)))
            .collect();
        receivers.push(("the sender's node", subscriber(sender_node, &topic)));
        let mut sender = socket(sender_node);
        let join_ref = join_ok(
            &mut sender,
            &topic,
            json!({"broadcast": {"self": false, "ack": true}, "private": false}),
        );
        {
            let mut send = |n: u64| {
                push_broadcast(&mut sender, &join_ref, &topic, "probe", json!({"n": n}));
            };
            let mut targets: Vec<(&str, &mut Socket)> =
                receivers.iter_mut().map(|(n, s)| (*n, s)).collect();
            until_receivers_hear(&mut send, &mut targets, &format!("from {sender_name}"));
        }
        let refs: Vec<String> = (0..20)
            .map(|i| push_broadcast(&mut sender, &join_ref, &topic, "n", json!({"i": i})))
            .collect();
        for (name, s) in &mut receivers {
            let got: Vec<i64> = user_events(s, "n", 20, name)
                .iter()
                .map(|p| p["i"].as_i64().expect("i"))
                .collect();
            assert_eq!(
                got,
                (0..20).collect::<Vec<_>>(),
                "{name} receives {sender_name}'s broadcasts, all and in order"
            );
        }
        // The sender: an ok reply for every broadcast, and none of them echoed.
        let mut acked = std::collections::HashSet::new();
        let mut echoed = Vec::new();
        let deadline = Instant::now() + WAIT;
        while acked.len() < refs.len() && Instant::now() < deadline {
            let Some(m) = next_message(&mut sender, Duration::from_millis(500), sender_name) else {
                continue;
            };
            match m.event.as_str() {
                "phx_reply" if m.reference.as_ref().is_some_and(|r| refs.contains(r)) => {
                    assert_eq!(
                        m.payload["status"], "ok",
                        "ack from {sender_name}: {}",
                        m.payload
                    );
                    acked.insert(m.reference.unwrap_or_default());
                }
                "broadcast" => echoed.push(m.payload),
                _ => {}
            }
        }
        assert_eq!(
            acked.len(),
            refs.len(),
            "{sender_name} acknowledges every broadcast"
        );
        echoed.extend(
            drain(&mut sender, Duration::from_millis(500))
                .into_iter()
                .filter(|m| m.event == "broadcast")
                .map(|m| m.payload),
        );
        assert!(
            echoed.is_empty(),
            "self: false, yet {sender_name} got back {echoed:?}"
        );
    }

    // self: true on a standby: the sender hears each of its broadcasts once, not once more
    // when the other nodes have it.
    let mut on_primary = subscriber(&primary, "echo");
    let mut echoer = socket(&s1);
    let echo_ref = join_ok(
        &mut echoer,
        "echo",
        json!({"broadcast": {"self": true}, "private": false}),
    );
    {
        let mut send = |n: u64| {
            push_broadcast(&mut echoer, &echo_ref, "echo", "probe", json!({"n": n}));
        };
        until_receivers_hear(&mut send, &mut [("primary", &mut on_primary)], "echo");
    }
    for i in 0..5 {
        push_broadcast(&mut echoer, &echo_ref, "echo", "n", json!({"i": i}));
    }
    let numbers = |payloads: Vec<Value>| -> Vec<i64> {
        payloads
            .iter()
            .map(|p| p["i"].as_i64().expect("i"))
            .collect()
    };
    assert_eq!(
        numbers(user_events(&mut on_primary, "n", 5, "primary")),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(
        numbers(user_events(&mut echoer, "n", 5, "self: true")),
        [0, 1, 2, 3, 4],
        "the sender hears its own broadcasts, in order"
    );
    let again: Vec<Value> = drain(&mut echoer, Duration::from_millis(1000))
        .into_iter()
        .filter(|m| m.event == "broadcast" && m.payload["event"] == "n")
        .map(|m| m.payload)
        .collect();
    assert!(
        again.is_empty(),
        "self: true echoes once, yet came back again: {again:?}"
    );

    // Binary frames: a client's raw bytes from standby 1, and send_binary on the primary, reach
    // standby 2 as binary frames, byte for byte.
    let mut on_s2 = subscriber(&s2, "bin");
    let mut raw = socket(&s1);
    let raw_ref = join_ok(&mut raw, "bin", json!({"private": false}));
    {
        let mut send = |n: u64| {
            push_broadcast(&mut raw, &raw_ref, "bin", "probe", json!({"n": n}));
        };
        until_receivers_hear(&mut send, &mut [("standby 2", &mut on_s2)], "binary");
    }
    let r = raw.next_ref();
    raw.send_binary(realtime_test_client::binary::user_broadcast_push(
        &raw_ref,
        &r,
        "realtime:bin",
        "raw",
        &[0, 255, 16],
        false,
    ));
    primary.execute(r"SELECT realtime.send_binary('\x00ff10', 'blob', 'bin', false)");
    let mut binaries = Vec::new();
    while binaries.len() < 2 {
        let m = next_message(&mut on_s2, WAIT, "binary on standby 2")
            .unwrap_or_else(|| panic!("binary frames on standby 2: only {binaries:?}"));
        if let Some((event, bytes, json)) = m.binary
            && event != "probe"
        {
            binaries.push((event, bytes, json));
        }
    }
    binaries.sort();
    assert_eq!(
        binaries,
        [
            ("blob".to_owned(), vec![0, 255, 16], false),
            ("raw".to_owned(), vec![0, 255, 16], false)
        ]
    );

    // REST on standby 1 reaches the primary's and standby 2's subscribers.
    let token = jwt(json!({}));
    let mut on_primary = subscriber(&primary, "rest");
    let mut on_s2 = subscriber(&s2, "rest");
    let batch = |event: &str, range: std::ops::Range<u64>| {
        let messages: Vec<Value> = range
            .map(
                |i| json!({"topic": "rest", "event": event, "payload": {"i": i}, "private": false}),
            )
            .collect();
        json!({ "messages": messages })
    };
    {
        let mut send = |n: u64| {
            let status = post(
                &s1,
                "/realtime/v1/api/broadcast",
                &token,
                &batch("probe", n..n + 1),
            );
            assert_eq!(status, 202, "REST broadcast to standby 1");
        };
        until_receivers_hear(
            &mut send,
            &mut [("primary", &mut on_primary), ("standby 2", &mut on_s2)],
            "REST on standby 1",
        );
    }
    assert_eq!(
        post(
            &s1,
            "/realtime/v1/api/broadcast",
            &token,
            &batch("n", 0..10)
        ),
        202
    );
    for (name, s) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        let got: Vec<u64> = user_events(s, "n", 10, name)
            .iter()
            .map(|p| p["i"].as_u64().expect("i"))
            .collect();
        assert_eq!(
            got,
            (0..10).collect::<Vec<_>>(),
            "{name} receives the REST batch sent to standby 1"
        );
    }
}

/// Database messages committed on the primary reach every node's subscribers only after
/// commit, every one of them, in one and the same order; rolled-back ones never.
#[test]
fn database_messages_arrive_in_the_same_commit_order_on_every_node() {
    let (primary, s1, s2) = three_nodes("mn_order", &[]);
    let mut subs = [
        ("primary", subscriber(&primary, "ordered")),
        ("standby 1", subscriber(&s1, "ordered")),
        ("standby 2", subscriber(&s2, "ordered")),
    ];
    let key = |p: &Value| p["k"].as_str().unwrap_or_default().to_owned();

    // Sent first, committed after another transaction: delivered after it on every node.
    let mut pending = primary.connect();
    pending.batch_execute("BEGIN").expect("begin");
    send_sql(&mut pending, "ordered", &json!({"k": "pending"}));
    send_sql(&mut primary.connect(), "ordered", &json!({"k": "marker"}));
    for (name, s) in &mut subs {
        let first = user_events(s, "e", 1, name);
        assert_eq!(
            key(&first[0]),
            "marker",
            "{name}: nothing before its commit"
        );
    }
    pending.batch_execute("COMMIT").expect("commit");

    // Concurrent writers, so that the commit order is not any one writer's order; each
    // rolls back a transaction now and then. The last writer inserts rows directly.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = primary.connect();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let payload = json!({"k": format!("w{w}-{i}")});
                    if w == 3 {
                        c.execute(
                            "INSERT INTO realtime.messages (topic, extension, event, payload, private)
                             VALUES ('ordered', 'broadcast', 'e', $1, false)",
                            &[&payload],
                        )
                        .expect("insert into realtime.messages");
                    } else {
                        send_sql(&mut c, "ordered", &payload);
                    }
                    if i % 5 == 0 {
                        c.batch_execute("BEGIN").expect("begin");
                        send_sql(&mut c, "ordered", &json!({"k": format!("rolled-back-{w}-{i}")}));
                        c.batch_execute("ROLLBACK").expect("rollback");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    // Committed after everything else: once it arrived, anything rolled back would have too.
    send_sql(&mut primary.connect(), "ordered", &json!({"k": "last"}));

    let total = 1 + 200 + 1;
    let mut sequences = Vec::new();
    for (name, s) in &mut subs {
        let got: Vec<String> = user_events(s, "e", total, name).iter().map(key).collect();
        sequences.push((*name, got));
    }
    let (_, reference) = &sequences[0];
    assert_eq!(reference.first().map(String::as_str), Some("pending"));
    assert_eq!(reference.last().map(String::as_str), Some("last"));
    assert!(
        !reference.iter().any(|k| k.starts_with("rolled-back")),
        "rolled-back messages are never delivered: {reference:?}"
    );
    for w in 0..4 {
        let mine: Vec<&String> = reference
            .iter()
            .filter(|k| k.starts_with(&format!("w{w}-")))
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("w{w}-{i}")).collect();
        assert_eq!(
            mine,
            want.iter().collect::<Vec<_>>(),
            "writer {w}: all, in its order"
        );
    }
    for (name, got) in &sequences[1..] {
        if got != reference {
            let at = got.iter().zip(reference).position(|(a, b)| a != b);
            panic!(
                "{name} got another order than the primary; first difference at {at:?}:\n{name}: {got:?}\nprimary: {reference:?}"
            );
        }
    }
}

/// Presence as a client sees it: `presence_state` replaces it, `presence_diff` adds the joins
/// and removes the leaves (by `phx_ref`).
#[derive(Default, Debug)]
struct PresenceView {
    keys: BTreeMap<String, BTreeMap<String, Value>>,
}

impl PresenceView {
    fn apply(&mut self, m: &Message) {
        let add = |keys: &mut BTreeMap<String, BTreeMap<String, Value>>, joins: &Value| {
            for (key, entry) in joins.as_object().into_iter().flatten() {
                for meta in entry["metas"].as_array().into_iter().flatten() {
                    let r = meta["phx_ref"].as_str().unwrap_or_default().to_owned();
                    keys.entry(key.clone()).or_default().insert(r, meta.clone());
                }
            }
        };
        match m.event.as_str() {
            "presence_state" => {
                self.keys.clear();
                add(&mut self.keys, &m.payload);
            }
            "presence_diff" => {
                add(&mut self.keys, &m.payload["joins"]);
                for (key, entry) in m.payload["leaves"].as_object().into_iter().flatten() {
                    if let Some(metas) = self.keys.get_mut(key) {
                        for meta in entry["metas"].as_array().into_iter().flatten() {
                            metas.remove(meta["phx_ref"].as_str().unwrap_or_default());
                        }
                        if metas.is_empty() {
                            self.keys.remove(key);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn has(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The first meta of `key`.
    fn meta(&self, key: &str) -> Option<&Value> {
        self.keys.get(key)?.values().next()
    }
}

/// A socket in `topic` with presence under `key`, tracking `meta`.
struct Member {
    s: Socket,
    join_ref: String,
    topic: String,
    view: PresenceView,
}

impl Member {
    fn join(node: &Cluster, topic: &str, key: &str, meta: Value) -> Member {
        let mut s = socket(node);
        let join_ref = join_ok(
            &mut s,
            topic,
            json!({"presence": {"enabled": true, "key": key}, "private": false}),
        );
        let mut member = Member {
            s,
            join_ref,
            topic: format!("realtime:{topic}"),
            view: PresenceView::default(),
        };
        let r = member.s.next_ref();
        member.s.push(
            Some(&member.join_ref),
            &r,
            &member.topic,
            "presence",
            json!({"type": "presence", "event": "track", "payload": meta}),
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let m = next_message(
                &mut member.s,
                deadline.saturating_duration_since(Instant::now()),
                key,
            )
            .unwrap_or_else(|| panic!("{key}: no reply to track"));
            if m.event == "phx_reply" && m.reference.as_deref() == Some(r.as_str()) {
                assert_eq!(m.payload["status"], "ok", "{key} tracks: {}", m.payload);
                break;
            }
            member.view.apply(&m);
        }
        member
    }

    /// Reads presence events until `condition` holds of what this member sees; false if it
    /// does not within `WAIT`.
    fn sees(&mut self, condition: impl Fn(&PresenceView) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while !condition(&self.view) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(m) = next_message(
                &mut self.s,
                left.min(Duration::from_millis(500)),
                "presence",
            ) {
                self.view.apply(&m);
            }
        }
        true
    }

    fn leave(&mut self) {
        let r = self.s.next_ref();
        let topic = self.topic.clone();
        self.s
            .push(Some(&self.join_ref), &r, &topic, "phx_leave", json!({}));
    }
}

/// The socket members of `topic` that `SELECT realtime.presence(topic)` lists on `node`, or the
/// error it gives.
fn sql_presence(node: &Cluster, topic: &str) -> Result<Vec<String>, String> {
    let mut c = postgres::Client::connect(&node.connection_string(), postgres::NoTls)
        .map_err(|e| format!("connect: {e}"))?;
    c.query(
        "SELECT key FROM realtime.presence($1) WHERE origin = 'socket' ORDER BY key",
        &[&topic],
    )
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .map_err(|e| format!("{e:?}"))
}

/// Waits until `realtime.presence(topic)` on `node` lists `key` (or, with `present: false`,
/// no longer does); panics with the last answer otherwise.
fn sql_presence_eventually(node: &Cluster, name: &str, topic: &str, key: &str, present: bool) {
    let mut last = Err(String::from("never asked"));
    let ok = eventually(WAIT, || {
        last = sql_presence(node, topic);
        last.as_ref()
            .is_ok_and(|keys| keys.iter().any(|k| k == key) == present)
    });
    assert!(
        ok,
        "realtime.presence('{topic}') on {name} {} {key}; last answer: {last:?}",
        if present {
            "never listed"
        } else {
            "still lists"
        }
    );
}

/// Presence tracked on one node is seen by members on every node, in `presence_state`,
/// `presence_diff` and `realtime.presence()`, and its leave too.
#[test]
fn presence_crosses_nodes() {
    let (primary, s1, s2) = three_nodes("mn_presence", &[]);
    let mut on_primary = Member::join(&primary, "lobby", "watcher-p", json!({"at": "primary"}));
    let mut on_s2 = Member::join(&s2, "lobby", "watcher-s2", json!({"at": "standby 2"}));
    let mut alice = Member::join(&s1, "lobby", "alice", json!({"name": "Alice"}));

    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| v.meta("alice").is_some_and(|meta| meta["name"] == "Alice")),
            "{name} sees alice, tracked on standby 1; it sees {:?}",
            m.view
        );
    }
    assert!(
        alice.sees(|v| v.has("watcher-p") && v.has("watcher-s2")),
        "alice on standby 1 sees the members of the other nodes; she sees {:?}",
        alice.view
    );
    // A late joiner's presence_state holds the members of every node.
    for (name, node) in [
        ("primary", &primary),
        ("standby 2", &s2),
        ("standby 1", &s1),
    ] {
        let mut late = Member::join(node, "lobby", &format!("late-{name}"), json!({}));
        assert!(
            late.sees(|v| ["alice", "watcher-p", "watcher-s2"]
                .iter()
                .all(|k| v.has(k))),
            "a late joiner on {name} gets the members of every node: {:?}",
            late.view
        );
    }
    for (name, node) in [
        ("primary", &primary),
        ("standby 1", &s1),
        ("standby 2", &s2),
    ] {
        sql_presence_eventually(node, name, "lobby", "alice", true);
        sql_presence_eventually(node, name, "lobby", "watcher-p", true);
        sql_presence_eventually(node, name, "lobby", "watcher-s2", true);
    }

    alice.leave();
    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| !v.has("alice")),
            "{name} sees alice leave: {:?}",
            m.view
        );
    }
    for (name, node) in [
        ("primary", &primary),
        ("standby 1", &s1),
        ("standby 2", &s2),
    ] {
        sql_presence_eventually(node, name, "lobby", "alice", false);
    }
}

/// A private join on a standby gets the answer the primary's RLS policies give, word for word,
/// and a private channel there receives and sends what the policies allow.
#[test]
fn private_channels_on_a_standby_follow_the_primarys_policies() {
    let primary = Cluster::start_primary("mn_private_primary", &[]);
    let standby = Cluster::start_standby(&primary, "mn_private_standby", &[]);
    primary.execute(
        "CREATE POLICY mn_read ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() LIKE 'ok-%'
                  OR realtime.topic() = 'user-' || current_setting('request.jwt.claim.sub', true));
         CREATE POLICY mn_write ON realtime.messages FOR INSERT TO authenticated
           WITH CHECK (realtime.topic() LIKE 'ok-%');",
    );
    // Not needed if checks are forwarded to the primary, but then neither way can be told
    // apart from a standby that has not replayed the policies yet.
    let replayed = eventually(WAIT, || {
        standby
            .connect()
            .query_one(
                "SELECT count(*) FROM pg_policies WHERE policyname LIKE 'mn_%'",
                &[],
            )
            .is_ok_and(|row| row.get::<_, i64>(0) == 2)
    });
    assert!(replayed, "the standby replays the policies");

    let alice = json!({"role": "authenticated", "sub": "alice"});
    let bob = json!({"role": "authenticated", "sub": "bob"});
    let cases = [
        (alice.clone(), "ok-room", true),
        (alice.clone(), "user-alice", true),
        (bob.clone(), "user-alice", false),
        (bob.clone(), "no-room", false),
        (json!({"role": "anon"}), "ok-room", false),
        (json!({"role": "no_such_role"}), "ok-room", false),
        (json!({"role": "service_role"}), "no-room", true),
    ];
    for (claims, topic, allowed) in &cases {
        let mut answers = Vec::new();
        for node in [&primary, &standby] {
            let mut s = socket_as(node, claims.clone());
            let (_, reply) = join(&mut s, topic, json!({"private": true}));
            answers.push(reply);
        }
        let (on_primary, on_standby) = (&answers[0], &answers[1]);
        assert_eq!(
            on_primary["status"] == "ok",
            *allowed,
            "on the primary, {claims} joining {topic}: {on_primary}"
        );
        assert_eq!(
            on_standby, on_primary,
            "{claims} joining {topic}: the standby answers as the primary"
        );
    }

    // A private channel on the standby receives the primary's private messages...
    let mut reader = socket_as(&standby, alice.clone());
    let join_ref = join_ok(
        &mut reader,
        "ok-room",
        json!({"private": true, "broadcast": {"ack": true}}),
    );
    primary.execute(r#"SELECT realtime.send('{"from": "primary"}', 'db', 'ok-room', true)"#);
    let got = user_events(&mut reader, "db", 1, "private reader on the standby");
    assert_eq!(got[0]["from"], "primary");

    // ...and the changes a trigger broadcasts with realtime.broadcast_changes...
    primary.execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         CREATE FUNCTION notes_changed() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $$
         BEGIN
           PERFORM realtime.broadcast_changes('ok-notes', TG_OP, TG_OP, TG_TABLE_NAME,
                                              TG_TABLE_SCHEMA, NEW, OLD);
           RETURN NULL;
         END $$;
         CREATE TRIGGER notes_changed AFTER INSERT ON notes
           FOR EACH ROW EXECUTE FUNCTION notes_changed();",
    );
    let mut notes = socket_as(&standby, alice.clone());
    join_ok(&mut notes, "ok-notes", json!({"private": true}));
    primary.execute("INSERT INTO notes VALUES (1, 'hello')");
    let change = &user_events(&mut notes, "INSERT", 1, "broadcast_changes on the standby")[0];
    assert_eq!(change["operation"], "INSERT", "{change}");
    assert_eq!(change["record"]["body"], "hello", "{change}");

    // ...and may send where the write policy allows it, to the primary's subscribers.
    let mut watcher = socket_as(&primary, json!({"role": "service_role"}));
    join_ok(&mut watcher, "ok-room", json!({"private": true}));
    {
        let mut send = |n: u64| {
            let r = push_broadcast(&mut reader, &join_ref, "ok-room", "probe", json!({"n": n}));
            let reply = reply_to(&mut reader, &r).expect("an ack");
            assert_eq!(
                reply["status"], "ok",
                "an allowed private broadcast: {reply}"
            );
        };
        until_receivers_hear(
            &mut send,
            &mut [("primary", &mut watcher)],
            "private broadcast from the standby",
        );
    }
    // Where it may not write, the standby refuses as the primary does.
    let mut replies = Vec::new();
    for node in [&primary, &standby] {
        let mut s = socket_as(node, alice.clone());
        let join_ref = join_ok(
            &mut s,
            "user-alice",
            json!({"private": true, "broadcast": {"ack": true}}),
        );
        let r = push_broadcast(&mut s, &join_ref, "user-alice", "x", json!({}));
        replies.push(reply_to(&mut s, &r).expect("a reply to a refused broadcast"));
    }
    assert_ne!(
        replies[0]["status"], "ok",
        "alice may not write to user-alice: {}",
        replies[0]
    );
    assert_eq!(
        replies[1], replies[0],
        "the standby refuses a write as the primary does"
    );
}

/// A standby that dies: its presence members leave every other node within its lease; started
/// again, it serves, and its new clients reach and hear the other nodes.
#[test]
fn a_killed_standby_leaves_presence_everywhere_and_serves_again() {
    let lease = ["realtime.node_lease = 3"];
    let (primary, s1, s2) = three_nodes("mn_kill", &lease);
    let mut on_primary = Member::join(&primary, "room", "watcher-p", json!({}));
    let mut on_s2 = Member::join(&s2, "room", "watcher-s2", json!({}));
    let _doomed = Member::join(&s1, "room", "doomed", json!({"n": 1}));
    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| v.has("doomed")),
            "{name} sees doomed: {:?}",
            m.view
        );
    }
    sql_presence_eventually(&primary, "primary", "room", "doomed", true);

    s1.kill();
    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| !v.has("doomed")),
            "{name} sees the member of the killed standby leave: {:?}",
            m.view
        );
        assert!(
            m.view.has("watcher-p") && m.view.has("watcher-s2"),
            "{name} keeps the others: {:?}",
            m.view
        );
    }
    sql_presence_eventually(&primary, "primary", "room", "doomed", false);
    sql_presence_eventually(&s2, "standby 2", "room", "doomed", false);

    s1.start_again();
    assert!(s1.is_in_recovery(), "standby 1 is a standby again");
    let mut back = subscriber(&s1, "after");
    primary.execute(r#"SELECT realtime.send('{"k": "after restart"}', 'e', 'after', false)"#);
    assert_eq!(
        user_events(&mut back, "e", 1, "a new client on the restarted standby")[0]["k"],
        "after restart"
    );
    let join_ref = join_ok(
        &mut back,
        "after-broadcast",
        json!({"broadcast": {"self": false}, "private": false}),
    );
    let mut on_primary_b = subscriber(&primary, "after-broadcast");
    {
        let mut send = |n: u64| {
            push_broadcast(
                &mut back,
                &join_ref,
                "after-broadcast",
                "probe",
                json!({"n": n}),
            );
        };
        until_receivers_hear(
            &mut send,
            &mut [("primary", &mut on_primary_b)],
            "from the restarted standby",
        );
    }
    let mut rejoined = Member::join(&s1, "room", "reborn", json!({}));
    assert!(
        on_primary.sees(|v| v.has("reborn")),
        "presence from the restarted standby reaches the primary: {:?}",
        on_primary.view
    );
    assert!(
        rejoined.sees(|v| v.has("watcher-p") && v.has("watcher-s2")),
        "the restarted standby sees the other nodes' members: {:?}",
        rejoined.view
    );
    assert!(
        !rejoined.view.has("doomed"),
        "the dead member is gone there too: {:?}",
        rejoined.view
    );

    // A standby stopped the ordinary way: its members leave too.
    s2.stop();
    for (name, m) in [("primary", &mut on_primary), ("standby 1", &mut rejoined)] {
        assert!(
            m.sees(|v| !v.has("watcher-s2")),
            "{name} sees the member of the stopped standby leave: {:?}",
            m.view
        );
    }
    sql_presence_eventually(&primary, "primary", "room", "watcher-s2", false);
}

/// A standby that goes silent without closing its connections (frozen, as behind a partition):
/// its members leave the other nodes once its lease runs out; thawed, it serves again.
#[test]
fn a_silent_standbys_members_leave_after_its_lease() {
    let lease = ["realtime.node_lease = 3"];
    let (primary, s1, s2) = three_nodes("mn_silent", &lease);
    let mut on_primary = Member::join(&primary, "room", "watcher-p", json!({}));
    let mut on_s2 = Member::join(&s2, "room", "watcher-s2", json!({}));
    let _silent = Member::join(&s1, "room", "silent", json!({}));
    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| v.has("silent")),
            "{name} sees silent: {:?}",
            m.view
        );
    }

    s1.freeze();
    for (name, m) in [("primary", &mut on_primary), ("standby 2", &mut on_s2)] {
        assert!(
            m.sees(|v| !v.has("silent")),
            "{name}: the member of the silent standby leaves after the lease: {:?}",
            m.view
        );
    }
    sql_presence_eventually(&primary, "primary", "room", "silent", false);
    sql_presence_eventually(&s2, "standby 2", "room", "silent", false);

    s1.thaw();
    let mut back = subscriber(&s1, "thawed");
    primary.execute(r#"SELECT realtime.send('{"k": "thawed"}', 'e', 'thawed', false)"#);
    assert_eq!(
        user_events(&mut back, "e", 1, "a new client on the thawed standby")[0]["k"],
        "thawed"
    );
    let _fresh = Member::join(&s1, "room", "fresh", json!({}));
    assert!(
        on_primary.sees(|v| v.has("fresh")),
        "presence from the thawed standby reaches the primary: {:?}",
        on_primary.view
    );
}

/// The primary restarts: clients that stayed connected on the standbys keep their sockets and
/// get every message committed before and after, in order.
#[test]
fn a_primary_restart_loses_nothing_for_clients_on_standbys() {
    let (primary, s1, s2) = three_nodes("mn_primary_restart", &[]);
    let mut subs = [
        ("standby 1", subscriber(&s1, "steady")),
        ("standby 2", subscriber(&s2, "steady")),
    ];
    {
        let mut c = primary.connect();
        for i in 0..20 {
            send_sql(&mut c, "steady", &json!({"i": i}));
        }
    }
    // Not waiting for them: committed is enough for them to arrive.
    primary.restart();
    {
        let mut c = primary.connect();
        for i in 20..40 {
            send_sql(&mut c, "steady", &json!({"i": i}));
        }
    }
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for (name, s) in &mut subs {
            let got: Vec<i64> = user_events(s, "e", 40, name)
                .iter()
                .map(|p| p["i"].as_i64().expect("i"))
                .collect();
            assert_eq!(
                got,
                (0..40).collect::<Vec<_>>(),
                "{name}: everything committed before and after the primary's restart, in order"
            );
        }
    }));
    if let Err(failure) = checked {
        for (name, node) in [
            ("primary", &primary),
            ("standby 1", &s1),
            ("standby 2", &s2),
        ] {
            eprintln!("--- {name}'s log ---\n{}", node.log());
        }
        std::panic::resume_unwind(failure);
    }
    // Client broadcasts still cross between the standbys.
    let (_, mut on_s2) = subs.into_iter().nth(1).expect("standby 2's subscriber");
    let mut on_s1 = socket(&s1);
    let join_ref = join_ok(
        &mut on_s1,
        "steady",
        json!({"broadcast": {"self": false}, "private": false}),
    );
    let mut send = |n: u64| {
        push_broadcast(&mut on_s1, &join_ref, "steady", "probe", json!({"n": n}));
    };
    until_receivers_hear(
        &mut send,
        &mut [("standby 2", &mut on_s2)],
        "standby 1 to standby 2 after the primary's restart",
    );
}

/// A promoted standby becomes the node that sequences: `realtime.send` there reaches its
/// subscribers.
#[test]
fn a_promoted_standby_delivers_its_own_sends() {
    let primary = Cluster::start_primary("mn_promote_primary", &[]);
    let standby = Cluster::start_standby(&primary, "mn_promote_standby", &[]);
    primary.stop();
    standby.promote();
    assert!(!standby.is_in_recovery(), "promoted");

    // The worker may take a moment to take its new role: a subscriber is made, and asked
    // for, until a send gets through; after that nothing may be lost.
    let mut sub = None;
    let mut attempt = 0;
    let delivered = eventually(WAIT, || {
        attempt += 1;
        let Ok(mut s) = Socket::try_connect(&standby, &jwt(json!({})), "2.0.0") else {
            return false;
        };
        let (_, reply) = join(&mut s, "promoted", json!({"private": false}));
        if reply["status"] != "ok" {
            return false;
        }
        let Ok(mut c) = postgres::Client::connect(&standby.connection_string(), postgres::NoTls)
        else {
            return false;
        };
        if c.execute(
            "SELECT realtime.send(jsonb_build_object('probe', $1::int), 'probe', 'promoted', false)",
            &[&attempt],
        )
        .is_err()
        {
            return false;
        }
        let heard = s
            .recv_event("broadcast", Duration::from_secs(2))
            .is_some_and(|m| m.payload["event"] == "probe");
        if heard {
            sub = Some(s);
        }
        heard
    });
    assert!(
        delivered,
        "realtime.send on the promoted standby reaches its subscriber:\n{}",
        standby.log()
    );
    let mut sub = sub.expect("the subscriber that heard");
    let mut c = standby.connect();
    for i in 0..10 {
        send_sql(&mut c, "promoted", &json!({"i": i}));
    }
    let got: Vec<i64> = user_events(&mut sub, "e", 10, "subscriber on the promoted node")
        .iter()
        .map(|p| p["i"].as_i64().expect("i"))
        .collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// The real `@supabase/supabase-js` (`pgrx-tests/js/tests-multinode`) against a primary and two
/// standbys: broadcasts, database messages, presence and private channels across nodes.
#[test]
fn supabase_js_across_nodes() {
    let (primary, s1, s2) = three_nodes("mn_js", &[]);
    let nodes: Vec<Value> = [
        ("primary", &primary),
        ("standby-1", &s1),
        ("standby-2", &s2),
    ]
    .iter()
    .map(|(name, node)| json!({"name": name, "http": node.http_url(), "pg": node.pg_url()}))
    .collect();
    let (ok, said) = realtime_integration_tests::run_js(
        "npm",
        &["run", "test:multinode"],
        &[
            ("PG_REALTIME_NODES", Value::Array(nodes).to_string()),
            (
                "PG_REALTIME_JWT_SECRET",
                realtime_integration_tests::JWT_SECRET.to_owned(),
            ),
        ],
        Duration::from_secs(600),
    );
    println!("{said}");
    if !ok {
        for (name, node) in [
            ("primary", &primary),
            ("standby 1", &s1),
            ("standby 2", &s2),
        ] {
            eprintln!("--- {name} log ---\n{}", node.log());
        }
    }
    assert!(ok, "the supabase-js multi-node suite failed");
}

/// Offsets are the same on every node, and a resume on a standby right after a message gets
/// it, although the primary writes its offset back onto the row only after delivering it.
#[test]
fn a_resume_on_a_standby_gets_exactly_what_was_missed() {
    let (primary, s1, _s2) = three_nodes("mn_resume", &["realtime.public_replay = on"]);
    let mut watcher = subscriber(&s1, "resume");
    let mut on_primary = subscriber(&primary, "resume");
    let mut c = primary.connect();
    send_sql(&mut c, "resume", &json!({"i": 0}));
    let first = next_broadcast_meta(&mut watcher, "standby 1");
    let same = next_broadcast_meta(&mut on_primary, "primary");
    assert_eq!(first["offset"], same["offset"], "one offset on every node");
    let last = first["offset"].as_str().expect("offset").to_string();
    for i in 1..=3 {
        send_sql(&mut c, "resume", &json!({"i": i}));
    }
    // Once the standby delivered them, a resume there must find them, offsets stored or not.
    let seen: Vec<i64> = user_events(&mut watcher, "e", 3, "standby 1")
        .iter()
        .map(|p| p["i"].as_i64().expect("i"))
        .collect();
    assert_eq!(seen, vec![1, 2, 3]);
    let mut resumed = socket(&s1);
    join_ok(
        &mut resumed,
        "resume",
        json!({"broadcast": {"replay": {"offset": last}}, "private": false}),
    );
    let got: Vec<i64> = user_events(&mut resumed, "e", 3, "the resume on standby 1")
        .iter()
        .map(|p| p["i"].as_i64().expect("i"))
        .collect();
    assert_eq!(got, vec![1, 2, 3]);
    let extra: Vec<Message> = drain(&mut resumed, Duration::from_millis(500))
        .into_iter()
        .filter(|m| m.event == "broadcast" || m.event == "system")
        .collect();
    assert!(extra.is_empty(), "nothing twice, no gap: {extra:?}");
}

/// The `meta` of the next broadcast.
fn next_broadcast_meta(s: &mut Socket, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = next_message(s, deadline.saturating_duration_since(Instant::now()), what)
            .unwrap_or_else(|| panic!("{what}: no broadcast within {WAIT:?}"));
        if m.event == "broadcast" {
            return m.payload["meta"].clone();
        }
    }
}
