//! Operations from SQL against a live cluster: who is connected (`realtime.connections()`,
//! `realtime.channels()`), closing a user's sockets, `realtime.explain_join` agreeing with a
//! real join, and presence changes as rows of `realtime.presence_events` that triggers see.

use realtime_integration_tests::{Cluster, Frame, JWT_SECRET, Message, Socket, eventually, jwt};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// (id, role, sub, protocol, channels) of a connection.
type ConnectionRow = (i64, String, Option<String>, String, Vec<String>);
/// (topic, key, event, private, meta) of a presence event.
type EventRow = (String, String, String, bool, Option<Value>);

/// Every connection, by id.
fn connections(c: &mut postgres::Client) -> Vec<ConnectionRow> {
    c.query(
        "SELECT id, role, sub, protocol, channels FROM realtime.connections() ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn track(s: &mut Socket, join_ref: &str, topic: &str, event: &str, payload: Value) {
    let r = s.next_ref();
    s.push(
        Some(join_ref),
        &r,
        &format!("realtime:{topic}"),
        "presence",
        json!({"type": "presence", "event": event, "payload": payload}),
    );
}

#[test]
fn connections_and_channels_list_who_is_connected_to_what() {
    let cluster = Cluster::start("admin_list", &[]);
    let mut c = cluster.connect();
    let mut alice = Socket::connect(&cluster, &jwt(json!({"sub": "alice"})), "2.0.0");
    let presence = json!({"presence": {"enabled": true, "key": "alice"}});
    assert_eq!(alice.join("room-a", presence)["status"], "ok");
    let mut bob = Socket::connect(
        &cluster,
        &jwt(json!({"sub": "bob", "role": "authenticated"})),
        "1.0.0",
    );
    assert_eq!(bob.join("room-a", json!({}))["status"], "ok");
    assert_eq!(bob.join("room-b", json!({}))["status"], "ok");
    track(
        &mut alice,
        "1",
        "room-a",
        "track",
        json!({"status": "here"}),
    );

    let listed = eventually(WAIT, || {
        let rows = connections(&mut c);
        rows.len() == 2
            && rows[0].1 == "anon"
            && rows[0].2.as_deref() == Some("alice")
            && rows[0].3 == "2.0.0"
            && rows[0].4 == ["room-a"]
            && rows[1].1 == "authenticated"
            && rows[1].2.as_deref() == Some("bob")
            && rows[1].3 == "1.0.0"
            && rows[1].4 == ["room-a", "room-b"]
    });
    assert!(listed, "connections(): {:?}", connections(&mut c));
    let row = c
        .query_one(
            "SELECT remote_addr::text, remote_port > 0, connected_at <= now(), messages_in >= 2,
                    bytes_in > 0, messages_out >= 1, bytes_out > 0, queued_bytes >= 0
               FROM realtime.connections() WHERE sub = 'alice'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "127.0.0.1/32");
    for i in 1..8 {
        assert!(row.get::<_, bool>(i), "column {i} of {row:?}");
    }

    let channels = |c: &mut postgres::Client| -> Vec<(String, bool, i64, i64)> {
        c.query(
            "SELECT topic, private, subscribers, presence_keys FROM realtime.channels() ORDER BY topic",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    };
    let counted = eventually(WAIT, || {
        channels(&mut c)
            == [
                ("room-a".to_string(), false, 2, 1),
                ("room-b".to_string(), false, 1, 0),
            ]
    });
    assert!(counted, "channels(): {:?}", channels(&mut c));

    drop(bob);
    assert!(
        eventually(WAIT, || connections(&mut c).len() == 1),
        "a closed socket leaves the list"
    );
}

#[test]
fn disconnect_user_closes_that_users_socket_with_a_system_message() {
    let cluster = Cluster::start("admin_disconnect", &[]);
    let mut c = cluster.connect();
    let mut alice = Socket::connect(&cluster, &jwt(json!({"sub": "alice"})), "1.0.0");
    assert_eq!(alice.join("room", json!({}))["status"], "ok");
    let mut bob = Socket::connect(&cluster, &jwt(json!({"sub": "bob"})), "2.0.0");
    assert_eq!(bob.join("room", json!({}))["status"], "ok");
    assert!(eventually(WAIT, || connections(&mut c).len() == 2));

    let closed: i64 = c
        .query_one(
            "SELECT realtime.disconnect_user('alice', 'Your account was suspended')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(closed, 1);
    let system = alice
        .recv_event("system", WAIT)
        .expect("alice gets a system message");
    assert_eq!(system.topic, "realtime:room");
    assert_eq!(
        system.payload,
        json!({"extension": "system", "status": "error",
               "message": "Your account was suspended", "channel": "room"})
    );
    assert!(alice.recv_event("phx_close", WAIT).is_some());
    let mut gone = false;
    for _ in 0..100 {
        if matches!(alice.recv(Duration::from_millis(200)), Some(Frame::Close)) {
            gone = true;
            break;
        }
    }
    assert!(gone, "alice's socket is closed");

    // Bob stays, and is still served.
    assert!(eventually(WAIT, || {
        let rows = connections(&mut c);
        rows.len() == 1 && rows[0].2.as_deref() == Some("bob")
    }));
    assert_eq!(bob.join("other", json!({}))["status"], "ok");
    let none: i64 = c
        .query_one("SELECT realtime.disconnect_user('alice')", &[])
        .unwrap()
        .get(0);
    assert_eq!(none, 0, "alice has no socket left");

    // By id, with the default reason.
    let id: i64 = c
        .query_one("SELECT id FROM realtime.connections()", &[])
        .unwrap()
        .get(0);
    let closed: i64 = c
        .query_one("SELECT realtime.disconnect($1)", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(closed, 1);
    let system = bob.recv_event("system", WAIT).expect("bob gets one too");
    assert!(
        system.payload["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(eventually(WAIT, || connections(&mut c).is_empty()));
}

/// The claims a token carries, expiring in an hour.
fn claims(sub: &str) -> Value {
    let now = realtime_test_client::jwt::now_secs();
    json!({"role": "authenticated", "sub": sub, "iat": now, "exp": now + 3600})
}

#[test]
fn explain_join_gives_the_verdict_of_a_real_join() {
    let cluster = Cluster::start("admin_explain", &[]);
    cluster.execute(
        "CREATE POLICY own_room ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'user:' || current_setting('request.jwt.claim.sub', true))",
    );
    let mut c = cluster.connect();
    for (sub, allowed) in [("u1", true), ("u2", false)] {
        let claims = claims(sub);
        let token = realtime_test_client::jwt::sign_claims(&claims, JWT_SECRET);
        let mut s = Socket::connect(&cluster, &token, "2.0.0");
        let reply = s.join("user:u1", json!({"private": true}));
        let row = c
            .query_one(
                "SELECT allowed, reason FROM realtime.explain_join('user:u1', $1)
                  WHERE \"check\" = 'join'",
                &[&claims],
            )
            .unwrap();
        let (explained, reason): (bool, Option<String>) = (row.get(0), row.get(1));
        assert_eq!(explained, allowed, "{sub}: {reply}");
        if allowed {
            assert_eq!(reply["status"], "ok", "{reply}");
            assert_eq!(reason, None);
        } else {
            assert_eq!(reply["status"], "error", "{reply}");
            assert_eq!(
                reply["response"]["reason"].as_str(),
                reason.as_deref(),
                "the join's reason is the one explained"
            );
        }
    }
}

#[test]
fn presence_changes_become_rows_that_triggers_see() {
    let cluster = Cluster::start("admin_presence_events", &["realtime.presence_events = on"]);
    cluster.execute(
        "CREATE TABLE public.users (id text PRIMARY KEY, last_seen timestamptz);
         INSERT INTO public.users VALUES ('alice', NULL);
         CREATE FUNCTION public.mark_seen() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           UPDATE public.users SET last_seen = NEW.at WHERE id = NEW.key;
           RETURN NULL;
         END $$;
         CREATE TRIGGER mark_seen AFTER INSERT ON realtime.presence_events
           FOR EACH ROW EXECUTE FUNCTION public.mark_seen();",
    );
    let mut c = cluster.connect();
    let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    let config = json!({"presence": {"enabled": true, "key": "alice"}});
    assert_eq!(s.join("lobby", config)["status"], "ok");
    track(&mut s, "1", "lobby", "track", json!({"status": "here"}));
    track(&mut s, "1", "lobby", "track", json!({"status": "away"}));
    track(&mut s, "1", "lobby", "untrack", json!({}));

    let events = |c: &mut postgres::Client| -> Vec<EventRow> {
        c.query(
            "SELECT topic, key, event, private, meta FROM realtime.presence_events ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
    };
    let written = eventually(WAIT, || events(&mut c).len() >= 3);
    let rows = events(&mut c);
    assert!(written, "presence_events: {rows:?}\n{}", cluster.log());
    let row = |event: &str, meta: Option<Value>| {
        (
            "lobby".to_string(),
            "alice".to_string(),
            event.to_string(),
            false,
            meta,
        )
    };
    assert_eq!(
        rows,
        [
            row("join", Some(json!({"status": "here"}))),
            row("update", Some(json!({"status": "away"}))),
            row("leave", None),
        ]
    );
    let seen: bool = c
        .query_one(
            "SELECT last_seen IS NOT NULL FROM public.users WHERE id = 'alice'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(seen, "the user's trigger ran");
    // The socket still works: writing the rows never held up its replies.
    let r = s.next_ref();
    s.push(None, &r, "phoenix", "heartbeat", json!({}));
    let answered = eventually(WAIT, || {
        s.recv_event("phx_reply", Duration::from_millis(200))
            .is_some_and(|m: Message| m.reference.as_deref() == Some(r.as_str()))
    });
    assert!(answered, "the heartbeat is answered");
}

/// A standby's members reach the primary's `presence_events` (the primary records every
/// node's presence); the standby, read-only, writes nothing and says nothing about it. Its own
/// sockets are listed by its own `connections()`.
#[test]
fn a_standbys_presence_is_recorded_by_the_primary() {
    let settings = ["realtime.presence_events = on"];
    let primary = Cluster::start_primary("admin_events_primary", &settings);
    let standby = Cluster::start_standby(&primary, "admin_events_standby", &settings);
    let mut s = Socket::connect(&standby, &jwt(json!({"sub": "sam"})), "2.0.0");
    let config = json!({"presence": {"enabled": true, "key": "sam"}});
    assert_eq!(s.join("hall", config)["status"], "ok");
    track(&mut s, "1", "hall", "track", json!({"on": "standby"}));

    let mut p = primary.connect();
    let recorded = eventually(Duration::from_secs(30), || {
        let r = s.next_ref();
        // Heartbeats keep the socket from being closed as idle while the nodes catch up.
        s.push(None, &r, "phoenix", "heartbeat", json!({}));
        p.query_opt(
            "SELECT meta FROM realtime.presence_events
              WHERE topic = 'hall' AND key = 'sam' AND event = 'join'",
            &[],
        )
        .unwrap()
        .is_some_and(|row| row.get::<_, Option<Value>>(0) == Some(json!({"on": "standby"})))
    });
    assert!(recorded, "the primary recorded the standby's member");
    let mut c = standby.connect();
    let listed: Vec<Option<String>> = c
        .query("SELECT sub FROM realtime.connections()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(listed, [Some("sam".to_string())]);
    assert!(
        !standby.log().contains("presence_events"),
        "the standby never tries to write presence events:\n{}",
        standby.log()
    );
}
