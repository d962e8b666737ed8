//! Raw Phoenix frames against the worker's socket server: both serializers, binary frames,
//! heartbeats and bad input. Every bad frame gets its documented answer (or is ignored) and
//! neither the connection nor the worker goes down.

use realtime_integration_tests::{Cluster, Frame, Message, Socket, jwt};
use realtime_test_client::binary;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn heartbeat_join_broadcast_and_leave_in_both_serializers() {
    let cluster = Cluster::start("protocol_basics", &[]);
    let mut v2 = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    let mut v1 = Socket::connect(&cluster, &jwt(json!({})), "1.0.0");

    v2.push(None, "hb", "phoenix", "heartbeat", json!({}));
    let hb = v2.recv_event("phx_reply", WAIT).expect("heartbeat reply");
    assert_eq!(
        (hb.topic.as_str(), hb.reference.as_deref()),
        ("phoenix", Some("hb"))
    );
    assert_eq!(hb.payload, json!({"status": "ok", "response": {}}));

    let config = json!({"broadcast": {"self": true, "ack": true}, "presence": {"enabled": false}, "private": false});
    let reply = v2.join("room", config.clone());
    assert_eq!(
        reply,
        json!({"status": "ok", "response": {"postgres_changes": []}})
    );
    assert_eq!(v1.join("room", config)["status"], "ok");

    // A kind-3 binary push from vsn 2.0.0 reaches the vsn 1.0.0 socket as JSON and comes back
    // to the sender (self) as a kind-4 frame; ack gives an ok reply.
    v2.send_binary(binary::user_broadcast_push(
        "1",
        "7",
        "realtime:room",
        "cursor",
        br#"{"x":1}"#,
        true,
    ));
    // The echo and the ack may arrive in either order.
    let (mut ack, mut echo) = (None, None);
    while ack.is_none() || echo.is_none() {
        let frame = v2.recv(WAIT).expect("the ack and the self echo");
        match Message::from_frame(&frame, "2.0.0") {
            Some(m) if m.event == "phx_reply" => ack = Some(m),
            Some(m) if m.event == "broadcast" => echo = Some(m),
            _ => {}
        }
    }
    let (ack, echo) = (ack.expect("ack"), echo.expect("echo"));
    assert_eq!(ack.reference.as_deref(), Some("7"));
    assert_eq!(ack.payload["status"], "ok");
    assert_eq!(echo.payload["event"], "cursor");
    assert_eq!(echo.payload["payload"], json!({"x": 1}));
    let seen = v1.recv_event("broadcast", WAIT).expect("v1 receives");
    assert_eq!(seen.topic, "realtime:room");
    assert_eq!(
        seen.payload,
        json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1}})
    );

    // A JSON broadcast from vsn 1.0.0 reaches vsn 2.0.0.
    v1.push(
        Some("1"),
        "2",
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "hello", "payload": {"y": 2}}),
    );
    let got = v2.recv_event("broadcast", WAIT).expect("v2 receives");
    assert_eq!(got.payload["event"], "hello");
    assert_eq!(got.payload["payload"], json!({"y": 2}));

    // Leave: ok reply, then phx_close.
    v2.push(Some("1"), "9", "realtime:room", "phx_leave", json!({}));
    let left = v2.recv_event("phx_reply", WAIT).expect("leave reply");
    assert_eq!(left.payload["status"], "ok");
    assert!(v2.recv_event("phx_close", WAIT).is_some());
}

#[test]
fn bad_frames_get_documented_answers_and_nothing_goes_down() {
    let cluster = Cluster::start("protocol_bad_input", &["realtime.max_payload_size = 1kB"]);
    let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");

    // Not JSON, not an array, wrong shapes, garbage binary: ignored.
    for junk in [
        "not json",
        "{}",
        "[1,2]",
        "[null,null,null,null,null]",
        "\"x\"",
    ] {
        s.send_text(junk);
    }
    for junk in [
        vec![],
        vec![3],
        vec![3, 255, 255, 255, 255, 255, 1],
        vec![9, 1, 2, 3],
        vec![0, 1, 1, 1, 1],
    ] {
        s.send_binary(junk);
    }
    // A message for a topic this socket has not joined.
    s.push(
        None,
        "5",
        "realtime:nowhere",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": {}}),
    );
    let reply = s
        .recv_event("phx_reply", WAIT)
        .expect("unmatched topic reply");
    assert_eq!(reply.reference.as_deref(), Some("5"));
    assert_eq!(
        reply.payload,
        json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );

    // The bare realtime: topic needs a name.
    s.push(
        Some("6"),
        "6",
        "realtime:",
        "phx_join",
        json!({"config": {}}),
    );
    let reply = s.recv_event("phx_reply", WAIT).expect("join refused");
    assert_eq!(
        reply.payload["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );

    // An oversized broadcast with ack gets payload_size_exceeded.
    assert_eq!(
        s.join("big", json!({"broadcast": {"ack": true}}))["status"],
        "ok"
    );
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(2000));
    s.send_binary(binary::user_broadcast_push(
        "1",
        "8",
        "realtime:big",
        "e",
        big.as_bytes(),
        true,
    ));
    let reply = s.recv_event("phx_reply", WAIT).expect("size reply");
    assert_eq!(
        reply.payload,
        json!({"status": "error", "response": "payload_size_exceeded"})
    );

    // The connection still works, and so does the worker.
    s.push(None, "hb", "phoenix", "heartbeat", json!({}));
    assert_eq!(
        s.recv_event("phx_reply", WAIT).expect("heartbeat").payload["status"],
        "ok"
    );
    assert!(cluster.worker_pid().is_some());
    let mut fresh = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    assert_eq!(fresh.join("room", json!({}))["status"], "ok");
}

#[test]
fn connect_refusals_are_http_401_with_reasons() {
    let cluster = Cluster::start("protocol_tokens", &[]);
    let cases = [
        ("", "API key is missing"),
        ("not-a-jwt", "The token provided is not a valid JWT"),
    ];
    for (token, reason) in cases {
        match Socket::try_connect(&cluster, token, "2.0.0") {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401);
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON body");
                assert_eq!(body["error"], reason);
            }
            other => panic!(
                "{token:?}: expected a 401, got {:?}",
                other.map(|_| "a socket")
            ),
        }
    }
    let expired = jwt(json!({"exp": 1_000_000}));
    assert!(Socket::try_connect(&cluster, &expired, "2.0.0").is_err());
    let no_role = jwt(json!({"role": null}));
    assert!(Socket::try_connect(&cluster, &no_role, "2.0.0").is_err());
    // Private channels are refused with the Unauthorized reason until authorization exists.
    let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    let reply = s.join("secret", json!({"private": true}));
    assert_eq!(
        reply["response"]["reason"],
        "Unauthorized: You do not have permissions to read from this Channel topic: secret"
    );
    assert!(matches!(
        s.recv(Duration::from_millis(100)),
        None | Some(Frame::Text(_))
    ));
}

/// Settings reach the running server on reload: `realtime.private_only` turned on with
/// `ALTER SYSTEM` + `pg_reload_conf()` refuses public joins with Supabase's reason, and
/// turning it off again lets them in, without restarting the worker.
#[test]
fn settings_reload_without_a_restart() {
    let cluster = Cluster::start("protocol_reload", &[]);
    let pid = cluster.worker_pid();
    let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    assert_eq!(s.join("before", json!({}))["status"], "ok");

    cluster.execute("ALTER SYSTEM SET realtime.private_only = on");
    cluster.execute("SELECT pg_reload_conf()");
    let refused = realtime_integration_tests::eventually(WAIT, || {
        let topic = format!("during-{}", s.next_ref());
        let reply = s.join(&topic, json!({}));
        reply["status"] == "error"
            && reply["response"]["reason"]
                == "PrivateOnly: This project only allows private channels"
    });
    assert!(refused, "public joins are refused after the reload");

    cluster.execute("ALTER SYSTEM RESET realtime.private_only");
    cluster.execute("SELECT pg_reload_conf()");
    let allowed = realtime_integration_tests::eventually(WAIT, || {
        let topic = format!("after-{}", s.next_ref());
        s.join(&topic, json!({}))["status"] == "ok"
    });
    assert!(allowed, "public joins work again");
    assert_eq!(cluster.worker_pid(), pid, "the worker was not restarted");
}

/// No ghost presence: a client that goes silent (a dropped TCP connection sends nothing, not
/// even a FIN) is closed after `realtime.idle_timeout`, and the others see it leave.
#[test]
fn a_silent_client_leaves_presence_after_the_idle_timeout() {
    let cluster = Cluster::start("protocol_ghost", &["realtime.idle_timeout = 2"]);
    let presence = json!({"presence": {"enabled": true, "key": "ghost"}});
    let mut ghost = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    assert_eq!(ghost.join("lobby", presence)["status"], "ok");
    let r = ghost.next_ref();
    ghost.push(
        Some("1"),
        &r,
        "realtime:lobby",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"here": true}}),
    );

    let mut watcher = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    let config = json!({"presence": {"enabled": true, "key": "watcher"}});
    assert_eq!(watcher.join("lobby", config)["status"], "ok");
    // From here on the ghost sends nothing. The watcher keeps heartbeating while it waits.
    let mut left = false;
    for _ in 0..100 {
        let r = watcher.next_ref();
        watcher.push(None, &r, "phoenix", "heartbeat", json!({}));
        if let Some(diff) = watcher.recv_event("presence_diff", Duration::from_millis(200))
            && diff.payload["leaves"].get("ghost").is_some()
        {
            left = true;
            break;
        }
    }
    assert!(left, "the silent client's presence left");
    // Only now may the ghost's socket go: dropping it earlier would close it cleanly.
    drop(ghost);
}
