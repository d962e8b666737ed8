//! Bounds on what one client can make the server hold or do: each test drives a real server
//! past a limit and checks the answer it gets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use realtime_server::protocol::binary::decode_user_broadcast;
use realtime_server::{
    Authorization, Config, DbBroadcast, Event, Payload, Replay, Replayed, Server,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn read_only() -> Authorization {
    Authorization {
        broadcast_read: true,
        presence_read: true,
        ..Default::default()
    }
}

fn unwrap_arc(server: Arc<Server>) -> Server {
    Arc::try_unwrap(server).ok().expect("sole owner")
}

#[tokio::test]
async fn token_role_none_or_blank_is_refused_everywhere() {
    let (server, addr) = start(test_config());
    let base = format!("ws://{addr}/realtime/v1/websocket?vsn=2.0.0");
    for role in ["none", "NONE", "None"] {
        let bad = token_with(json!({"role": role, "exp": now() + 100}));
        let (s, body) = refused(format!("{base}&apikey={bad}")).await;
        assert_eq!(
            (s, body),
            (
                401,
                json!({"error": "The `role` claim of the JWT is not allowed"})
            )
        );
        let (s, _, body) = http(
            addr,
            "POST",
            "/realtime/v1/api/broadcast/t/events/e",
            &[
                ("authorization", &format!("Bearer {bad}")),
                ("content-type", "application/json"),
            ],
            b"{}",
        )
        .await;
        assert_eq!(s, 401, "{}", String::from_utf8_lossy(&body));
    }
    let blank = token_with(json!({"role": "", "exp": now() + 100}));
    let (s, body) = refused(format!("{base}&apikey={blank}")).await;
    assert_eq!(
        (s, body),
        (
            401,
            json!({"error": "Fields `role` and `exp` are required in JWT"})
        )
    );

    // A join with its own token, and a token refresh, get the same check.
    let mut ws = connect(addr, "2.0.0").await;
    let none = token_with(json!({"role": "none", "exp": now() + 100}));
    send_text(
        &mut ws,
        json!(["1", "1", "realtime:r", "phx_join", {"config": {}, "access_token": none}]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await[4],
        json!({"status": "error", "response": {"reason": "InvalidJWTToken: The `role` claim of the JWT is not allowed"}})
    );
    join_v2(&mut ws, "r", "2", json!({})).await;
    send_text(
        &mut ws,
        json!(["2", "3", "realtime:r", "access_token", {"access_token": none}]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!(["2", null, "realtime:r", "system", {"extension": "system", "status": "error", "message": "The `role` claim of the JWT is not allowed", "channel": "r"}])
    );
    stop(server).await;
}

#[tokio::test]
async fn topics_longer_than_255_bytes_are_refused() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;
    let longest = "t".repeat(255);
    let r = join_v2(&mut ws, &longest, "1", json!({})).await;
    assert_eq!(r["status"], "ok", "{r}");
    let too_long = "t".repeat(256);
    let r = join_v2(&mut ws, &too_long, "2", json!({})).await;
    assert_eq!(
        r,
        json!({"status": "error", "response": {"reason": "TopicNameTooLong: A topic name may have at most 255 bytes"}})
    );
    let huge = "t".repeat(3_000_000);
    let r = join_v2(&mut ws, &huge, "3", json!({})).await;
    assert_eq!(r["status"], "error");
    let r = join_v2(&mut ws, "a\u{0}b", "4", json!({})).await;
    assert_eq!(
        r["response"]["reason"],
        "InvalidTopicName: A topic name must not contain the NUL character"
    );

    // REST sends name topics too.
    let body = json!({"messages": [{"topic": too_long, "event": "e", "payload": {}}]});
    let (s, _, body) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast",
        &[
            ("authorization", &format!("Bearer {}", token())),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"errors": {"messages": [{"topic": ["should be at most 255 byte(s)"]}]}})
    );
    let (s, _, _) = http(
        addr,
        "POST",
        &format!("/realtime/v1/api/broadcast/{too_long}/events/e"),
        &[
            ("authorization", &format!("Bearer {}", token())),
            ("content-type", "application/json"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(s, 422);
    stop(server).await;
}

#[tokio::test]
async fn rest_batches_are_bounded_and_answered_briefly() {
    let (server, addr) = start(test_config());
    let auth = format!("Bearer {}", token());
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    // Just under the 5 MB body limit: about 2.4 million array elements.
    let mut body = String::from("{\"messages\":[1");
    while body.len() < 4_900_000 {
        body.push_str(",1");
    }
    body.push_str("]}");
    let (s, _, answer) = http(addr, "POST", "/api/broadcast", &headers, body.as_bytes()).await;
    assert_eq!(s, 422);
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap(),
        json!({"errors": {"messages": ["should have at most 1000 item(s)"]}})
    );

    // Within the count, invalid messages are reported up to the tenth.
    let body = json!({"messages": vec![1; 1000]}).to_string();
    let (s, _, answer) = http(addr, "POST", "/api/broadcast", &headers, body.as_bytes()).await;
    assert_eq!(s, 422);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let reported = answer["errors"]["messages"].as_array().unwrap();
    assert_eq!(reported.len(), 10);
    assert_eq!(reported[9], json!({"message": ["is invalid"]}));

    // A full batch of valid messages still goes through.
    let one = json!({"topic": "t", "event": "e", "payload": {"n": 1}});
    let body = json!({"messages": vec![one; 1000]}).to_string();
    let (s, _, _) = http(addr, "POST", "/api/broadcast", &headers, body.as_bytes()).await;
    assert_eq!(s, 202);
    stop(server).await;
}

/// REST bodies are read whole before a request is answered, so the bodies being read at once
/// are bounded in bytes (64 MB by their declared length): past that, requests wait and get 429;
/// a request that announces a body and stalls gets 408 and gives its share back.
#[tokio::test]
async fn rest_bodies_in_flight_are_bounded_in_bytes() {
    let (server, addr) = start(test_config());
    let auth = format!("Bearer {}", token());
    // Twenty requests announce 5 MB bodies and send none. Thirteen fit the budget and are
    // answered 408 once they have stalled too long; the other seven wait and are answered 429.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /api/broadcast HTTP/1.1\r\nhost: {addr}\r\nauthorization: {auth}\r\n\
             content-type: application/json\r\ncontent-length: 5000000\r\n\r\n{{\"messages\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
                .await
                .expect("the stalled request is answered")
                .unwrap();
            String::from_utf8_lossy(&got)
                .chars()
                .take(12)
                .collect::<String>()
        }));
    }
    let mut statuses = Vec::new();
    for answer in stalled {
        statuses.push(answer.await.unwrap());
    }
    let count = |status: &str| statuses.iter().filter(|s| s.ends_with(status)).count();
    assert_eq!((count(" 408"), count(" 429")), (13, 7), "{statuses:?}");
    // Their shares were given back: a request goes through again.
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let one = json!({"messages": [{"topic": "t", "event": "e", "payload": {}}]}).to_string();
    let (s, _, _) = http(addr, "POST", "/api/broadcast", &headers, one.as_bytes()).await;
    assert_eq!(s, 202);
    stop(server).await;
}

#[tokio::test]
async fn outbound_queues_are_bounded_in_bytes() {
    let (server, addr) = start(Config {
        outbound_queue: 1024,
        outbound_queue_bytes: 1024 * 1024,
        ..test_config()
    });
    let mut slow = connect_small_rcvbuf(addr, "2.0.0").await;
    let mut fast = connect(addr, "2.0.0").await;
    join_v2(&mut slow, "firehose", "1", json!({})).await;
    join_v2(&mut fast, "firehose", "1", json!({})).await;
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    // 300 frames are far fewer than the 1024 the frame bound allows, and 19 MB are far more
    // than the kernel's buffers plus 1 MiB.
    for i in 0..300 {
        server.publish(DbBroadcast {
            topic: "firehose".into(),
            event: "x".into(),
            private: false,
            id: i.to_string(),
            payload: Payload::Binary(chunk.clone()),
            offset: None,
        });
        next_binary(&mut fast).await;
        if server.connection_count() == 1 {
            break;
        }
    }
    eventually(|| server.connection_count() == 1).await;
    // The one left is the reader.
    send_text(&mut fast, json!([null, "z", "phoenix", "heartbeat", {}])).await;
    loop {
        if let Message::Text(t) = next_frame(&mut fast).await {
            assert_eq!(serde_json::from_str::<Value>(t.as_str()).unwrap()[1], "z");
            break;
        }
    }
    stop(server).await;
}

#[tokio::test]
async fn writes_held_for_a_write_check_are_bounded_in_bytes() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_held_write_bytes: 1_000_000,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    send_text(
        &mut ws,
        json!(["1", "1", "realtime:vip", "phx_join",
        {"config": {"private": true, "broadcast": {"ack": true}}, "access_token": token()}]),
    )
    .await;
    let join = next_authorization(&server).await;
    assert!(server.complete_authorization(join.id, Ok(read_only()), Replay::default()));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    let big = "x".repeat(300_000);
    for i in 0..4 {
        send_text(
            &mut ws,
            json!(["1", format!("m{i}"), "realtime:vip", "broadcast",
            {"type": "broadcast", "event": "e", "payload": {"big": big}}]),
        )
        .await;
    }
    let refused = next_json(&mut ws).await;
    assert_eq!(refused[1], "m3");
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": "Too many messages per second"}})
    );
    let write = next_authorization(&server).await;
    assert!(server.complete_authorization(
        write.id,
        Ok(Authorization {
            broadcast_write: true,
            ..read_only()
        }),
        Replay::default()
    ));
    for i in 0..3 {
        let reply = next_json(&mut ws).await;
        assert_eq!(reply[1], format!("m{i}"));
        assert_eq!(reply[4]["status"], "ok");
    }
    stop(unwrap_arc(server)).await;
}

/// Drains the server's events (playing the worker) and returns the authorization requests.
async fn authorizations_now(server: &Arc<Server>) -> Vec<realtime_server::AuthorizationRequest> {
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        server
            .poll_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Authorize(r) => Some(r),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The authorization requests, drained until there are `n` (or `WAIT` passed), then once more
/// after a pause for any beyond them. Each join or write check asks from a task of its own, so
/// a refusal of a later one can reach the client before the earlier ones have asked.
async fn authorizations_at_least(
    server: &Arc<Server>,
    n: usize,
) -> Vec<realtime_server::AuthorizationRequest> {
    let mut asked = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while asked.len() < n && tokio::time::Instant::now() < deadline {
        asked.extend(authorizations_now(server).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    asked.extend(authorizations_now(server).await);
    asked
}

/// A heartbeat and its reply: everything sent before it has been handled.
async fn sync(ws: &mut Ws, r: &str) {
    send_text(ws, json!([null, r, "phoenix", "heartbeat", {}])).await;
    loop {
        let m = next_json(ws).await;
        if m[2] == "phoenix" && m[1] == r {
            return;
        }
    }
}

fn private_join(join_ref: &str, topic: &str) -> Value {
    json!([join_ref, join_ref, format!("realtime:{topic}"), "phx_join",
        {"config": {"private": true}, "access_token": token()}])
}

#[tokio::test]
async fn pending_private_joins_are_capped_per_connection() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_pending_joins_per_connection: 3,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    for i in 0..4 {
        send_text(&mut ws, private_join(&i.to_string(), &format!("t{i}"))).await;
    }
    let refused = next_json(&mut ws).await;
    assert_eq!(refused[0], "3");
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": "ClientJoinRateLimitReached: Too many pending joins"}})
    );
    let asked = authorizations_at_least(&server, 3).await;
    assert_eq!(asked.len(), 3, "nothing queued for the refused join");
    // Answering one makes room for another.
    assert!(server.complete_authorization(asked[0].id, Ok(read_only()), Replay::default()));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    send_text(&mut ws, private_join("4", "t4")).await;
    sync(&mut ws, "h").await;
    assert_eq!(authorizations_now(&server).await.len(), 1);
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn a_left_pending_join_is_forgotten_so_join_leave_loops_queue_nothing() {
    let (server, addr) = start(Config {
        authorize_private: true,
        joins_per_second: 0.0,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    for i in 0..500 {
        let r = i.to_string();
        send_text(&mut ws, private_join(&r, "loop")).await;
        send_text(&mut ws, json!([r, r, "realtime:loop", "phx_leave", {}])).await;
    }
    sync(&mut ws, "h").await;
    assert!(
        authorizations_now(&server).await.is_empty(),
        "the worker gets no request whose join was left"
    );
    // A join that stays is still asked for, and a request whose asker left is not pending.
    send_text(&mut ws, private_join("a", "stays")).await;
    let asked = next_authorization(&server).await;
    assert!(server.authorization_pending(asked.id));
    send_text(
        &mut ws,
        json!(["a", "b", "realtime:stays", "phx_leave", {}]),
    )
    .await;
    sync(&mut ws, "h2").await;
    // The leave aborts the task that waits for the answer; the runtime drops it (and the
    // request with it) on its next turn, not within the leave itself.
    eventually(|| !server.authorization_pending(asked.id)).await;
    assert!(!server.complete_authorization(asked.id, Ok(read_only()), Replay::default()));
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn authorization_requests_are_bounded_over_all_connections() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_pending_authorizations: 3,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut a = connect(addr, "2.0.0").await;
    let mut b = connect(addr, "2.0.0").await;
    send_text(&mut a, private_join("1", "x")).await;
    send_text(&mut a, private_join("2", "y")).await;
    sync(&mut a, "h").await;
    send_text(&mut b, private_join("1", "x")).await;
    send_text(&mut b, private_join("2", "y")).await;
    let refused = next_json(&mut b).await;
    assert_eq!(refused[0], "2");
    assert_eq!(
        refused[4]["response"]["reason"],
        "IncreaseConnectionPool: Too many authorization requests are waiting for the database"
    );
    assert_eq!(authorizations_now(&server).await.len(), 3);
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn joins_are_rate_limited_per_connection() {
    let (server, addr) = start(Config {
        // Refills one join per 1000 s: none during the test.
        joins_per_second: 0.001,
        join_burst: 3,
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    for i in 0..3 {
        let r = join_v2(&mut ws, &format!("t{i}"), &i.to_string(), json!({})).await;
        assert_eq!(r["status"], "ok");
    }
    let r = join_v2(&mut ws, "t3", "3", json!({})).await;
    assert_eq!(
        r,
        json!({"status": "error", "response": {"reason": "ClientJoinRateLimitReached: Too many joins per second"}})
    );
    // Another connection has its own budget.
    let mut other = connect(addr, "2.0.0").await;
    assert_eq!(
        join_v2(&mut other, "t", "1", json!({})).await["status"],
        "ok"
    );
    stop(server).await;
}

fn db(topic: &str, event: &str, private: bool, id: &str) -> DbBroadcast {
    DbBroadcast {
        topic: topic.into(),
        event: event.into(),
        private,
        id: id.into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    }
}

/// Events of the user broadcasts in `frames`, in order.
fn broadcast_events(frames: &[Message]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|m| match m {
            Message::Binary(b) => Some(decode_user_broadcast(b).unwrap().event),
            _ => None,
        })
        .collect()
}

async fn replay_join(ws: &mut Ws, join_ref: &str, topic: &str) {
    send_text(
        ws,
        json!([join_ref, join_ref, format!("realtime:{topic}"), "phx_join",
            {"config": {"private": true, "broadcast": {"replay": {"since": 0}}}, "access_token": token()}]),
    )
    .await;
}

#[tokio::test]
async fn replayed_and_live_copies_arrive_once_and_in_order() {
    let (server, addr) = start(Config {
        authorize_private: true,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    replay_join(&mut ws, "1", "hist").await;
    let asked = next_authorization(&server).await;
    let old = Replayed {
        id: "1".into(),
        event: "old".into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    };
    // As the worker does: answer, then publish what committed after the replay's snapshot
    // (and a message the replay already holds), before the connection has seen the answer.
    assert!(server.complete_authorization(
        asked.id,
        Ok(read_only()),
        Replay {
            messages: vec![old],
            gap: None
        }
    ));
    server.publish(db("hist", "old", true, "1"));
    server.publish(db("hist", "live", true, "2"));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    let mut frames = Vec::new();
    while broadcast_events(&frames).len() < 2 {
        frames.push(next_frame(&mut ws).await);
    }
    sync(&mut ws, "h").await;
    assert_eq!(broadcast_events(&frames), ["old", "live"]);
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn a_replaying_join_on_a_stuck_connection_does_not_hold_back_database_messages() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_frame_bytes: 16 * 1024 * 1024,
        outbound_queue_bytes: 64 * 1024 * 1024,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut stuck = connect_small_rcvbuf(addr, "2.0.0").await;
    for i in 0..8 {
        replay_join(&mut stuck, &i.to_string(), &format!("r{i}")).await;
    }
    let mut asked = Vec::new();
    for _ in 0..1000 {
        asked.extend(authorizations_now(&server).await);
        if asked.len() == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(asked.len(), 8);
    // A reply far larger than the socket buffers: this connection's loop sits in a write (and
    // reads nothing meanwhile, so this is the last thing the client sends).
    let big_ref = "r".repeat(12_000_000);
    send_text(
        &mut stuck,
        json!([null, big_ref, "phoenix", "heartbeat", {}]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reader = connect(addr, "2.0.0").await;
    join_v2(&mut reader, "room", "1", json!({})).await;
    for r in &asked {
        assert!(server.complete_authorization(r.id, Ok(read_only()), Replay::default()));
    }
    server.publish(db("r0", "for-stuck", true, "a"));
    server.publish(db("room", "for-reader", false, "b"));
    let got = decode_user_broadcast(&next_binary(&mut reader).await).unwrap();
    assert_eq!(got.event, "for-reader");

    // The stuck client, once it reads, gets its join reply and then the message it was
    // subscribed for while its loop was busy.
    let mut joined = false;
    loop {
        match next_frame(&mut stuck).await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v[3] == "phx_reply" && v[2] == "realtime:r0" {
                    assert_eq!(v[4]["status"], "ok", "{v}");
                    joined = true;
                }
            }
            Message::Binary(b) => {
                assert!(joined, "live after the join reply");
                assert_eq!(decode_user_broadcast(&b).unwrap().event, "for-stuck");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn an_expired_channel_gets_nothing_more_even_while_its_socket_is_stuck() {
    let (server, addr) = start(Config {
        max_frame_bytes: 16 * 1024 * 1024,
        outbound_queue_bytes: 64 * 1024 * 1024,
        ..test_config()
    });
    let mut ws = connect_small_rcvbuf(addr, "2.0.0").await;
    let exp = now() + 2;
    let short = token_with(json!({"role": "anon", "exp": exp}));
    send_text(
        &mut ws,
        json!(["1", "1", "realtime:exp", "phx_join", {"config": {}, "access_token": short}]),
    )
    .await;
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    server.publish(db("exp", "before", false, "0"));
    // The connection's loop now sits in a write it cannot finish, past the token's expiry.
    let big_ref = "r".repeat(12_000_000);
    send_text(&mut ws, json!([null, big_ref, "phoenix", "heartbeat", {}])).await;
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..10 {
        server.publish(db("exp", "after", false, &format!("late-{i}")));
    }
    let mut events = Vec::new();
    loop {
        let frame = next_frame(&mut ws).await;
        if let Message::Text(t) = &frame {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v[3] == "phx_close" {
                assert_eq!(v[2], "realtime:exp");
                break;
            }
        }
        events.extend(broadcast_events(&[frame]));
    }
    assert_eq!(events, ["before"]);
    stop(server).await;
}

/// Sends a track on `topic` with `meta` and returns its reply (skipping other frames).
async fn track(ws: &mut Ws, join_ref: &str, msg_ref: &str, topic: &str, meta: Value) -> Value {
    send_text(
        ws,
        json!([join_ref, msg_ref, format!("realtime:{topic}"), "presence",
            {"type": "presence", "event": "track", "payload": meta}]),
    )
    .await;
    loop {
        let m = next_json(ws).await;
        if m[3] == "phx_reply" && m[1] == msg_ref {
            return m[4].clone();
        }
    }
}

#[tokio::test]
async fn presence_is_capped_per_meta_key_and_topic() {
    let (server, addr) = start(Config {
        max_presence_metas_per_key: 2,
        max_presence_keys_per_topic: 2,
        presence_calls_limit: 0,
        ..test_config()
    });
    let error = |reason: &str| json!({"status": "error", "response": {"reason": reason}});
    let mut sockets = Vec::new();
    for (i, key) in ["k", "k", "k", "other", "third"].iter().enumerate() {
        let mut ws = connect(addr, "2.0.0").await;
        let cfg = json!({"presence": {"enabled": true, "key": key}});
        assert_eq!(join_v2(&mut ws, "room", "1", cfg).await["status"], "ok");
        let reply = track(&mut ws, "1", "t", "room", json!({"n": i})).await;
        sockets.push((ws, reply));
    }
    let replies: Vec<Value> = sockets.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(replies[0]["status"], "ok");
    assert_eq!(replies[1]["status"], "ok");
    assert_eq!(replies[2], error("Too many presences for this key"));
    assert_eq!(replies[3]["status"], "ok");
    assert_eq!(replies[4], error("Too many presence keys in this topic"));

    let ws = &mut sockets[0].0;
    let big = "x".repeat(40 * 1024);
    assert_eq!(
        track(ws, "1", "big", "room", json!({"big": big})).await,
        error("Presence meta is too large: at most 32768 bytes")
    );
    assert_eq!(
        track(ws, "1", "nul", "room", json!({"name": "a\u{0}b"})).await,
        error("Presence meta must not contain the NUL character (\\u0000)")
    );
    // Refused tracks changed nothing: a new joiner sees the three accepted metas.
    let mut late = connect(addr, "2.0.0").await;
    let cfg = json!({"presence": {"enabled": true}});
    join_v2(&mut late, "room", "1", cfg).await;
    let state = next_json(&mut late).await;
    assert_eq!(state[3], "presence_state");
    assert_eq!(state[4]["k"]["metas"].as_array().unwrap().len(), 2);
    assert!(state[4]["k"]["metas"][0]["n"].as_u64().unwrap() < 2);
    assert_eq!(state[4]["other"]["metas"][0]["n"], 3);
    assert!(state[4].get("third").is_none());
    stop(server).await;
}

#[tokio::test]
async fn presence_bytes_per_topic_are_capped() {
    let (server, addr) = start(Config {
        max_presence_bytes_per_topic: 50_000,
        presence_calls_limit: 0,
        ..test_config()
    });
    let mut a = connect(addr, "2.0.0").await;
    let mut b = connect(addr, "2.0.0").await;
    for ws in [&mut a, &mut b] {
        join_v2(ws, "room", "1", json!({"presence": {"enabled": true}})).await;
    }
    let meta = json!({"fill": "x".repeat(30_000)});
    assert_eq!(
        track(&mut a, "1", "t", "room", meta.clone()).await["status"],
        "ok"
    );
    assert_eq!(
        track(&mut b, "1", "t", "room", meta).await["response"]["reason"],
        "Too much presence data in this topic"
    );
    stop(server).await;
}

#[tokio::test]
async fn a_flood_of_refused_joins_is_not_held_for_the_error_delay() {
    let (server, addr) = start(Config {
        join_error_delay: Duration::from_secs(3600),
        joins_per_second: 0.0,
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    for i in 0..20 {
        let r = i.to_string();
        send_text(&mut ws, json!([r, r, "realtime:", "phx_join", {}])).await;
    }
    // The first 16 wait out the delay; the rest are answered at once.
    for i in 16..20 {
        let reply = next_json(&mut ws).await;
        assert_eq!(reply[1], i.to_string());
        assert_eq!(
            reply[4]["response"]["reason"],
            "TopicNameRequired: You must provide a topic name"
        );
    }
    stop(server).await;
}

// One client flooding one frame type: what the server holds for it (by `Server::usage`) stays
// under a bound, and another client is still served.

/// Bytes the server holds in its bounded queues and stores.
fn held_bytes(u: &realtime_server::Usage) -> u64 {
    u.queued_bytes
        + u.held_write_bytes
        + u.presence_bytes
        + u.publish_queue_bytes
        + u.rest_body_bytes
}

/// Another client still connects, joins and gets its heartbeat answered.
async fn others_are_served(addr: std::net::SocketAddr) {
    let mut other = connect(addr, "2.0.0").await;
    assert_eq!(
        join_v2(&mut other, "bystander", "1", json!({})).await["status"],
        "ok"
    );
    sync(&mut other, "b").await;
}

/// Sends `frames` without reading anything back, until all are sent or the server closes the
/// socket (as a slow consumer); returns the highest usage seen meanwhile.
async fn flood_without_reading(
    server: &Server,
    ws: &mut Ws,
    frames: impl Iterator<Item = Value>,
) -> realtime_server::Usage {
    use futures_util::SinkExt;
    let mut peak = server.usage();
    for (i, frame) in frames.enumerate() {
        if ws.send(Message::text(frame.to_string())).await.is_err() {
            break;
        }
        if i.is_multiple_of(64) {
            let u = server.usage();
            if held_bytes(&u) > held_bytes(&peak) {
                peak = u;
            }
        }
    }
    peak
}

#[tokio::test]
async fn a_heartbeat_or_reply_flood_is_bounded_by_the_outbound_queue() {
    let max_queue = 256 * 1024;
    let (server, addr) = start(Config {
        outbound_queue_bytes: max_queue,
        // A write to a client that does not read stops the server reading from it, so the
        // flood ends stuck in TCP; the idle timeout then closes it.
        idle_timeout: Duration::from_secs(2),
        ..test_config()
    });
    let mut ws = connect_small_rcvbuf(addr, "2.0.0").await;
    join_v2(&mut ws, "room", "1", json!({"broadcast": {"ack": true}})).await;
    let big = "x".repeat(2000);
    // About 20 MB of replies, far more than the queue and the kernel's buffers hold.
    let frames = (0..20_000u32).map(|i| match i % 4 {
        0 => json!([null, i.to_string(), "phoenix", "heartbeat", {}]),
        // Unknown events and unjoined topics get error replies.
        1 => json!(["1", i.to_string(), format!("realtime:{big}"), "nope", {}]),
        2 => json!([
            "1",
            i.to_string(),
            format!("realtime:{big}"),
            "phx_leave",
            {}
        ]),
        _ => json!(["1", i.to_string(), "realtime:room", "broadcast",
            {"type": "broadcast", "event": "e", "payload": {"n": i}}]),
    });
    let peak = flood_without_reading(&server, &mut ws, frames).await;
    assert!(
        peak.queued_bytes <= max_queue as u64 + 64 * 1024,
        "{peak:?}"
    );
    // Closed (as a slow consumer, or idle while stuck): nothing of it is left.
    eventually(|| server.connection_count() == 0).await;
    eventually(|| server.usage() == Default::default()).await;
    others_are_served(addr).await;
    stop(server).await;
}

#[tokio::test]
async fn a_join_leave_flood_holds_no_channels_or_requests() {
    let (server, addr) = start(Config {
        authorize_private: true,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    let mut peak_pending = 0;
    for i in 0..3000u32 {
        let r = i.to_string();
        let topic = format!("flood-{}", i % 8);
        let private = i % 2 == 0;
        send_text(
            &mut ws,
            json!([r, r, format!("realtime:{topic}"), "phx_join",
                {"config": {"private": private, "presence": {"enabled": true}}}]),
        )
        .await;
        send_text(
            &mut ws,
            json!([r, r, format!("realtime:{topic}"), "phx_leave", {}]),
        )
        .await;
        if i.is_multiple_of(100) {
            peak_pending = peak_pending.max(server.usage().pending_authorizations);
            // Read the replies, as a client that wants to stay connected does.
            sync(&mut ws, &format!("h{i}")).await;
        }
    }
    sync(&mut ws, "end").await;
    assert!(peak_pending <= 16, "{peak_pending} pending at once");
    eventually(|| {
        let u = server.usage();
        u.pending_authorizations == 0 && u.channels == 0 && u.presence_keys == 0
    })
    .await;
    assert!(authorizations_now(&server).await.is_empty());
    others_are_served(addr).await;
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn an_access_token_flood_keeps_one_refresh_check_per_channel() {
    let (server, addr) = start(Config {
        authorize_private: true,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    send_text(&mut ws, private_join("1", "vip")).await;
    let join = next_authorization(&server).await;
    assert!(server.complete_authorization(join.id, Ok(read_only()), Replay::default()));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    for i in 0..2000 {
        let t = token_with(json!({"role": "anon", "exp": now() + 3600, "n": i}));
        send_text(
            &mut ws,
            json!(["1", format!("t{i}"), "realtime:vip", "access_token", {"access_token": t}]),
        )
        .await;
    }
    sync(&mut ws, "h").await;
    // Each new token forgets the previous token's check (its task is aborted, and the runtime
    // drops it on its next turn).
    eventually(|| server.usage().pending_authorizations <= 1).await;
    let asked = authorizations_now(&server).await;
    assert!(asked.len() <= 1, "{} requests for the worker", asked.len());
    // The last token's check is answered, and the channel stays.
    if let Some(last) = asked.last() {
        assert!(server.complete_authorization(last.id, Ok(read_only()), Replay::default()));
    }
    sync(&mut ws, "h2").await;
    assert_eq!(server.usage().channels, 1);
    others_are_served(addr).await;
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn writes_held_for_write_checks_are_bounded_per_connection() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_held_write_bytes: 1_000_000,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    for c in 0..4 {
        send_text(
            &mut ws,
            json!([c.to_string(), c.to_string(), format!("realtime:vip{c}"), "phx_join",
            {"config": {"private": true, "broadcast": {"ack": true}}, "access_token": token()}]),
        )
        .await;
        let join = next_authorization(&server).await;
        assert!(server.complete_authorization(join.id, Ok(read_only()), Replay::default()));
        assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    }
    // Three channels' first writes fit the connection's bound; the fourth does not, however
    // many channels the writes are spread over.
    let big = "x".repeat(300_000);
    for c in 0..4 {
        send_text(
            &mut ws,
            json!([c.to_string(), format!("m{c}"), format!("realtime:vip{c}"), "broadcast",
            {"type": "broadcast", "event": "e", "payload": {"big": big}}]),
        )
        .await;
    }
    let refused = next_json(&mut ws).await;
    assert_eq!(refused[1], "m3");
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": "Too many messages per second"}})
    );
    let u = server.usage();
    assert!(
        u.held_write_bytes > 900_000 && u.held_write_bytes <= 1_000_000,
        "{u:?}"
    );
    let asked = authorizations_at_least(&server, 3).await;
    assert_eq!(asked.len(), 3, "the refused write asked nothing");
    // Closing a channel gives its held bytes back.
    send_text(&mut ws, json!(["0", "l", "realtime:vip0", "phx_leave", {}])).await;
    sync(&mut ws, "h").await;
    let u = server.usage();
    assert!(u.held_write_bytes <= 700_000, "{u:?}");
    let writes = Authorization {
        broadcast_write: true,
        ..read_only()
    };
    for a in &asked {
        server.complete_authorization(a.id, Ok(writes), Replay::default());
    }
    eventually(|| server.usage().held_write_bytes == 0).await;
    others_are_served(addr).await;
    stop(unwrap_arc(server)).await;
}

#[tokio::test]
async fn a_presence_flood_holds_one_meta_per_channel() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;
    join_v2(
        &mut ws,
        "room",
        "1",
        json!({"presence": {"enabled": true, "key": "k"}}),
    )
    .await;
    let meta = json!({"blob": "y".repeat(10_000)});
    let frames = (0..5000u32).map(|i| {
        let event = if i % 2 == 0 { "track" } else { "untrack" };
        json!(["1", i.to_string(), "realtime:room", "presence",
            {"type": "presence", "event": event, "payload": meta}])
    });
    let peak = flood_without_reading(&server, &mut ws, frames).await;
    assert!(
        peak.presence_keys <= 1 && peak.presence_bytes <= 11_000,
        "{peak:?}"
    );
    sync(&mut ws, "h").await;
    // Past the per-channel call limit the channel was closed: nothing of it is left.
    let u = server.usage();
    assert_eq!((u.presence_keys, u.presence_bytes), (0, 0), "{u:?}");
    others_are_served(addr).await;
    stop(server).await;
}

#[tokio::test]
async fn a_rest_batch_flood_is_bounded_by_the_body_budget() {
    let (server, addr) = start(test_config());
    let server = Arc::new(server);
    let watcher = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..200 {
                peak = peak.max(server.usage().rest_body_bytes);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    let messages: Vec<Value> = (0..1000)
        .map(|i| json!({"topic": "room", "event": "e", "payload": {"n": i, "pad": "z".repeat(1000)}}))
        .collect();
    let body = json!({"messages": messages}).to_string();
    let mut requests = Vec::new();
    for _ in 0..16 {
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            let auth = format!("Bearer {}", token());
            let headers = [
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            http(addr, "POST", "/api/broadcast", &headers, body.as_bytes()).await
        }));
    }
    for r in requests {
        let (status, _, _) = r.await.unwrap();
        assert!(status == 202 || status == 429, "{status}");
    }
    let peak = watcher.await.unwrap();
    assert!(peak <= 64 * 1024 * 1024, "{peak}");
    assert_eq!(server.usage().rest_body_bytes, 0);
    others_are_served(addr).await;
    stop(unwrap_arc(server)).await;
}
