//! Drives a real `Server` on 127.0.0.1 with a raw WebSocket client, frame by frame.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use realtime_server::protocol::Payload;
use realtime_server::protocol::binary::{decode_user_broadcast, encode_user_broadcast_push};
use realtime_server::{Authorization, AuthorizationPurpose, Config, DbBroadcast, Replay};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn connect_refusals_use_supabase_texts() {
    let (server, addr) = start(test_config());
    let base = format!("ws://{addr}/realtime/v1/websocket");
    let cases = [
        (format!("{base}?vsn=2.0.0"), 401, "API key is missing"),
        (
            format!(
                "{base}?apikey={}",
                token_with(json!({"role":"anon","exp": now() - 10}))
            ),
            401,
            "Token has expired",
        ),
        (
            format!("{base}?apikey={}", token_with(json!({"exp": now() + 100}))),
            401,
            "Fields `role` and `exp` are required in JWT",
        ),
        (
            format!("{base}?apikey=garbage"),
            401,
            "The token provided is not a valid JWT",
        ),
    ];
    for (url, status, text) in cases {
        let (s, body) = refused(url).await;
        assert_eq!(s, status);
        assert_eq!(body, json!({"error": text}));
    }
    let mut forged = token();
    forged.push('x');
    let (s, body) = refused(format!("{base}?apikey={forged}")).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("Failed to validate JWT signature"))
    );
    let (s, _) = refused(format!("{base}?apikey={}&vsn=3.0.0", token())).await;
    assert_eq!(s, 400);

    // x-api-key wins over the query parameter.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("{base}?apikey=garbage&vsn=2.0.0"),
    )
    .unwrap();
    req.headers_mut()
        .insert("x-api-key", token().parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    stop(server).await;
}

#[tokio::test]
async fn heartbeat_join_leave_and_errors_v2() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;

    send_text(&mut ws, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );

    let reply = join_v2(
        &mut ws,
        "room-1",
        "3",
        json!({"broadcast": {"self": false}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"status": "ok", "response": {"postgres_changes": []}})
    );

    send_text(
        &mut ws,
        json!(["3", "4", "realtime:room-1", "phx_leave", {}]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!(["3", "4", "realtime:room-1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!(["3", "3", "realtime:room-1", "phx_close", {}])
    );

    // Not joined any more; join_ref may be missing.
    send_text(&mut ws, json!([null, "5", "realtime:room-1", "broadcast", {"type":"broadcast","event":"e","payload":{}}])).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([null, "5", "realtime:room-1", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );

    let reply = join_v2(&mut ws, "", "6", json!({})).await;
    assert_eq!(
        reply["response"]["reason"],
        json!("TopicNameRequired: You must provide a topic name")
    );

    let reply = join_v2(&mut ws, "secret", "7", json!({"private": true})).await;
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": "Unauthorized: You do not have permissions to read from this Channel topic: secret"}})
    );

    // An expired access_token in the join payload.
    let expired = token_with(json!({"role": "anon", "exp": now() - 100}));
    send_text(
        &mut ws,
        json!(["8", "8", "realtime:r", "phx_join", {"config": {}, "access_token": expired}]),
    )
    .await;
    let reason = next_json(&mut ws).await[4]["response"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.starts_with("InvalidJWTToken: Token has expired "),
        "{reason}"
    );
    assert!(reason.ends_with(" seconds ago"), "{reason}");

    // Unknown events on a joined channel get an error reply, not a crash.
    join_v2(&mut ws, "r2", "9", json!({})).await;
    send_text(&mut ws, json!(["9", "10", "realtime:r2", "wat", {}])).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r[4]["status"], json!("error"));
    assert!(r[4]["response"]["reason"].as_str().unwrap().contains("wat"));

    // postgres_changes: ok reply plus a system message that says why nothing will arrive.
    let reply = join_v2(
        &mut ws,
        "pg",
        "11",
        json!({"postgres_changes": [{"event": "*", "schema": "public"}]}),
    )
    .await;
    assert_eq!(reply["status"], json!("ok"));
    let sys = next_json(&mut ws).await;
    assert_eq!(sys[3], json!("system"));
    assert_eq!(sys[4]["extension"], json!("postgres_changes"));
    assert_eq!(sys[4]["status"], json!("error"));

    // Topics outside realtime:* are unmatched.
    send_text(&mut ws, json!(["12", "12", "other:x", "phx_join", {}])).await;
    assert_eq!(
        next_json(&mut ws).await[4]["response"]["reason"],
        json!("unmatched topic")
    );
    stop(server).await;
}

#[tokio::test]
async fn duplicate_join_closes_the_old_one() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;
    join_v2(&mut ws, "dup", "1", json!({})).await;
    send_text(
        &mut ws,
        json!(["2", "2", "realtime:dup", "phx_join", {"config": {}}]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!(["1", "1", "realtime:dup", "phx_close", {}])
    );
    let r = next_json(&mut ws).await;
    assert_eq!(r[0], json!("2"));
    assert_eq!(r[4]["status"], json!("ok"));
    stop(server).await;
}

#[tokio::test]
async fn v1_serializer_round() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "1.0.0").await;
    send_text(
        &mut ws,
        json!({"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"1"})
    );
    let reply = join_v1(
        &mut ws,
        "room",
        "2",
        json!({"broadcast": {"self": "true", "ack": true}}),
    )
    .await;
    assert_eq!(reply["status"], json!("ok"));
    send_text(&mut ws, json!({"topic":"realtime:room","event":"broadcast","payload":{"type":"broadcast","event":"hi","payload":{"n":1}},"ref":"3","join_ref":"2"})).await;
    // self:true echoes the message; ack:true replies after the fan-out.
    let a = next_json(&mut ws).await;
    let b = next_json(&mut ws).await;
    let (msg, ack) = if a["event"] == json!("broadcast") {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(
        msg,
        json!({"topic":"realtime:room","event":"broadcast","payload":{"type":"broadcast","event":"hi","payload":{"n":1}},"ref":null})
    );
    assert_eq!(ack["payload"], json!({"status":"ok","response":{}}));
    assert_eq!(ack["ref"], json!("3"));
    stop(server).await;
}

#[tokio::test]
async fn broadcast_between_sockets_all_formats() {
    let (server, addr) = start(test_config());
    let mut sender = connect(addr, "2.0.0").await;
    let mut v2 = connect(addr, "2.0.0").await;
    let mut v1 = connect(addr, "1.0.0").await;
    join_v2(
        &mut sender,
        "room",
        "1",
        json!({"broadcast": {"ack": true}}),
    )
    .await;
    join_v2(&mut v2, "room", "1", json!({})).await;
    join_v1(&mut v1, "room", "1", json!({})).await;

    // realtime-js vsn 2.0.0 sends every broadcast as a kind-3 frame.
    let frame = encode_user_broadcast_push(
        "1",
        "2",
        "realtime:room",
        "cursor",
        None,
        &Payload::Json(Bytes::from_static(b"{\"x\":1}")),
    )
    .unwrap();
    send_binary(&mut sender, frame).await;
    assert_eq!(
        next_json(&mut sender).await,
        json!(["1", "2", "realtime:room", "phx_reply", {"status": "ok", "response": {}}]),
        "ack, and no echo to the sender (self:false)"
    );
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(k4.topic, "realtime:room");
    assert_eq!(k4.event, "cursor");
    assert_eq!(k4.payload, Payload::Json(Bytes::from_static(b"{\"x\":1}")));
    assert_eq!(
        next_json(&mut v1).await,
        json!({"topic":"realtime:room","event":"broadcast","payload":{"type":"broadcast","event":"cursor","payload":{"x":1}},"ref":null})
    );

    // Binary payload: kind-4 for V2, dropped for V1.
    let frame = encode_user_broadcast_push(
        "1",
        "3",
        "realtime:room",
        "blob",
        None,
        &Payload::Binary(Bytes::from_static(&[0, 1, 2, 255])),
    )
    .unwrap();
    send_binary(&mut sender, frame).await;
    next_json(&mut sender).await;
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(
        k4.payload,
        Payload::Binary(Bytes::from_static(&[0, 1, 2, 255]))
    );

    // A JSON text push goes out as text; the V1 socket's next frame proves it skipped the blob.
    send_text(&mut sender, json!(["1", "4", "realtime:room", "broadcast", {"type":"broadcast","event":"t","payload":{"y":2}}])).await;
    next_json(&mut sender).await;
    assert_eq!(
        next_json(&mut v2).await,
        json!([null, null, "realtime:room", "broadcast", {"type":"broadcast","event":"t","payload":{"y":2}}])
    );
    assert_eq!(next_json(&mut v1).await["payload"]["event"], json!("t"));

    // A different topic and the private namespace stay separate.
    let mut other = connect(addr, "2.0.0").await;
    join_v2(&mut other, "elsewhere", "1", json!({})).await;
    send_text(&mut sender, json!(["1", "5", "realtime:room", "broadcast", {"type":"broadcast","event":"u","payload":{}}])).await;
    next_json(&mut sender).await;
    next_json(&mut v2).await;
    send_text(&mut other, json!([null, "2", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        next_json(&mut other).await[1],
        json!("2"),
        "nothing from room reached elsewhere"
    );
    stop(server).await;
}

#[tokio::test]
async fn oversized_payload_ack_error_and_silent_drop() {
    let (server, addr) = start(Config {
        max_payload_bytes: 64,
        ..test_config()
    });
    let mut a = connect(addr, "2.0.0").await;
    let mut b = connect(addr, "2.0.0").await;
    join_v2(&mut a, "big", "1", json!({"broadcast": {"ack": true}})).await;
    join_v2(&mut b, "big", "1", json!({})).await;
    let big = Payload::Json(Bytes::from(format!("{{\"s\":\"{}\"}}", "x".repeat(100))));
    send_binary(
        &mut a,
        encode_user_broadcast_push("1", "2", "realtime:big", "e", None, &big).unwrap(),
    )
    .await;
    assert_eq!(
        next_json(&mut a).await,
        json!(["1", "2", "realtime:big", "phx_reply", {"status": "error", "response": "payload_size_exceeded"}])
    );
    // b got nothing: its next frame is the heartbeat reply.
    send_text(&mut b, json!([null, "9", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next_json(&mut b).await[1], json!("9"));
    stop(server).await;
}

#[tokio::test]
async fn bad_frames_are_survived() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;
    join_v2(&mut ws, "r", "1", json!({})).await;
    for junk in [
        "not json",
        "[1,2]",
        "{\"topic\":1}",
        "[null,null,\"realtime:r\",\"broadcast\"]",
        "",
    ] {
        // As a JSON string (valid JSON, wrong shape) and as raw text.
        send_text(&mut ws, Value::String(junk.into())).await;
        futures_util::SinkExt::send(&mut ws, Message::text(junk))
            .await
            .unwrap();
    }
    for junk in [
        vec![],
        vec![3],
        vec![3, 255, 255, 255, 255, 255, 1],
        vec![1, 0, 0],
        vec![3, 0, 0, 1, 1, 0, 1, b'r', b'e', b'{'],
        vec![3, 0, 0, 2, 1, 0, 0, 0xff, 0xfe, b'e'],
    ] {
        send_binary(&mut ws, Bytes::from(junk)).await;
    }
    send_text(&mut ws, json!([null, "2", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next_json(&mut ws).await[1], json!("2"));
    stop(server).await;
}

#[tokio::test]
async fn publish_delivers_with_meta_id() {
    let (server, addr) = start(test_config());
    let mut v2 = connect(addr, "2.0.0").await;
    let mut v1 = connect(addr, "1.0.0").await;
    join_v2(&mut v2, "db", "1", json!({})).await;
    join_v1(&mut v1, "db", "1", json!({})).await;
    // Private: nobody here may read it.
    server.publish(DbBroadcast {
        topic: "db".into(),
        event: "hidden".into(),
        private: true,
        id: "p".into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    });
    server.publish(DbBroadcast {
        topic: "db".into(),
        event: "INSERT".into(),
        private: false,
        id: "11111111-2222-3333-4444-555555555555".into(),
        payload: Payload::Json(Bytes::from_static(b"{\"record\":{\"id\":1}}")),
        offset: None,
    });
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(k4.event, "INSERT");
    assert_eq!(
        k4.metadata.as_deref(),
        Some(&b"{\"id\":\"11111111-2222-3333-4444-555555555555\"}"[..])
    );
    assert_eq!(
        next_json(&mut v1).await["payload"],
        json!({"type":"broadcast","event":"INSERT","payload":{"record":{"id":1}},"meta":{"id":"11111111-2222-3333-4444-555555555555"}})
    );
    server.publish(DbBroadcast {
        topic: "db".into(),
        event: "bin".into(),
        private: false,
        id: "b".into(),
        payload: Payload::Binary(Bytes::from_static(&[7, 8])),
        offset: None,
    });
    server.publish(DbBroadcast {
        topic: "db".into(),
        event: "after".into(),
        private: false,
        id: "c".into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    });
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(
        (k4.event.as_str(), k4.payload),
        ("bin", Payload::Binary(Bytes::from_static(&[7, 8])))
    );
    assert_eq!(
        next_json(&mut v1).await["payload"]["event"],
        json!("after"),
        "binary skipped for V1"
    );
    stop(server).await;
}

#[tokio::test]
async fn rest_batch_and_single() {
    let (server, addr) = start(test_config());
    let mut v2 = connect(addr, "2.0.0").await;
    join_v2(&mut v2, "room-1", "1", json!({})).await;
    let tok = token();
    let bearer = format!("Bearer {tok}");
    let json_ct = ("content-type", "application/json");

    let body = json!({"messages": [{"topic": "room-1", "event": "cursor", "payload": {"x": 1}, "private": false, "id": "m1"},
                                   {"topic": "room-1", "event": "secret", "payload": {}, "private": true}]});
    let (s, _, b) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast?apikey=x&vsn=2.0.0",
        &[("apikey", &tok), json_ct],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!((s, b.len()), (202, 0));
    assert_eq!(
        next_json(&mut v2).await,
        json!([null, null, "realtime:room-1", "broadcast", {"type":"broadcast","event":"cursor","payload":{"x":1},"meta":{"id":"m1"}}])
    );

    let (s, _, b) = http(
        addr,
        "POST",
        "/api/broadcast",
        &[("authorization", "Bearer nope"), json_ct],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"message": "Unauthorized"})
    );

    let bad = json!({"messages": [{"topic": "", "event": "e", "payload": 1}]});
    let (s, _, b) = http(
        addr,
        "POST",
        "/api/broadcast",
        &[("authorization", &bearer), json_ct],
        bad.to_string().as_bytes(),
    )
    .await;
    assert_eq!(s, 422);
    let errors: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        errors["errors"]["messages"][0]["topic"],
        json!(["can't be blank"])
    );

    let (s, _, _) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast/room-1/events/ping?vsn=2.0.0",
        &[("authorization", &bearer), json_ct],
        b"{\"p\":true}",
    )
    .await;
    assert_eq!(s, 202);
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(
        (k4.event.as_str(), k4.payload),
        ("ping", Payload::Json(Bytes::from_static(b"{\"p\":true}")))
    );

    let (s, _, _) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast/room-1/events/raw",
        &[
            ("apikey", &tok),
            ("content-type", "application/octet-stream"),
        ],
        &[1, 2, 3],
    )
    .await;
    assert_eq!(s, 202);
    let k4 = decode_user_broadcast(&next_binary(&mut v2).await).unwrap();
    assert_eq!(k4.payload, Payload::Binary(Bytes::from_static(&[1, 2, 3])));

    let (s, _, b) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast/room-1/events/x",
        &[("apikey", &tok), ("content-type", "text/plain")],
        b"hi",
    )
    .await;
    assert_eq!(s, 415);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["error"],
        json!("Unsupported Media Type. Use application/json or application/octet-stream")
    );

    let (s, _, b) = http(
        addr,
        "POST",
        "/realtime/v1/api/broadcast/room-1/events/x?private=true",
        &[("apikey", &tok), json_ct],
        b"{}",
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"message": "Unauthorized"})
    );

    let (s, head, _) = http(
        addr,
        "OPTIONS",
        "/realtime/v1/api/broadcast",
        &[
            ("origin", "http://example.test"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    )
    .await;
    assert!(s == 204 || s == 200, "{s}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("access-control-allow-origin: *"));
    assert!(head.contains("x-client-info"));

    // Only the public messages arrived: the next frame is the heartbeat reply.
    send_text(&mut v2, json!([null, "h", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next_json(&mut v2).await[1], json!("h"));
    stop(server).await;
}

#[tokio::test]
async fn rest_payload_limit() {
    let (server, addr) = start(Config {
        max_payload_bytes: 10,
        ..test_config()
    });
    let tok = token();
    let body =
        json!({"messages": [{"topic": "t", "event": "e", "payload": {"long": "0123456789"}}]});
    let (s, _, b) = http(
        addr,
        "POST",
        "/api/broadcast",
        &[("apikey", &tok), ("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(s, 422);
    assert!(String::from_utf8_lossy(&b).contains("Payload size exceeds tenant limit"));
    stop(server).await;
}

#[tokio::test]
async fn token_refresh_and_expiry_close_the_channel() {
    let (server, addr) = start(test_config());
    let mut ws = connect(addr, "2.0.0").await;
    join_v2(&mut ws, "r", "1", json!({})).await;
    // An sb_ key is ignored (no reply), a bad token shuts the channel down.
    send_text(
        &mut ws,
        json!(["1", "2", "realtime:r", "access_token", {"access_token": "sb_publishable_abc"}]),
    )
    .await;
    send_text(&mut ws, json!(["1", "3", "realtime:r", "access_token", {"access_token": token_with(json!({"exp": now() + 100}))}])).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!(["1", null, "realtime:r", "system", {"extension": "system", "status": "error", "message": "Fields `role` and `exp` are required in JWT", "channel": "r"}])
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!(["1", "1", "realtime:r", "phx_close", {}])
    );

    // A token that expires while joined.
    let short = token_with(json!({"role": "anon", "exp": now() + 2}));
    send_text(
        &mut ws,
        json!(["5", "5", "realtime:short", "phx_join", {"config": {}, "access_token": short}]),
    )
    .await;
    assert_eq!(next_json(&mut ws).await[4]["status"], json!("ok"));
    let sys = next_json(&mut ws).await;
    assert_eq!(sys[3], json!("system"));
    assert_eq!(sys[4]["channel"], json!("short"));
    let msg = sys[4]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Token has expired ") && msg.ends_with(" seconds ago"),
        "{msg}"
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!(["5", "5", "realtime:short", "phx_close", {}])
    );
    stop(server).await;
}

#[tokio::test]
async fn limits_connections_and_channels() {
    let (server, addr) = start(Config {
        max_connections: 1,
        max_channels_per_connection: 1,
        private_only: false,
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    let (s, body) = refused(format!(
        "ws://{addr}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        token()
    ))
    .await;
    assert_eq!(
        (s, body),
        (429, json!({"error": "Too many connected users"}))
    );
    join_v2(&mut ws, "a", "1", json!({})).await;
    let r = join_v2(&mut ws, "b", "2", json!({})).await;
    assert_eq!(
        r["response"]["reason"],
        json!("ChannelRateLimitReached: Too many channels")
    );
    stop(server).await;

    let (server, addr) = start(Config {
        private_only: true,
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    let r = join_v2(&mut ws, "a", "1", json!({})).await;
    assert_eq!(
        r["response"]["reason"],
        json!("PrivateOnly: This project only allows private channels")
    );
    stop(server).await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_without_hurting_others() {
    let (server, addr) = start(Config {
        outbound_queue: 4,
        ..test_config()
    });
    let mut slow = connect(addr, "2.0.0").await;
    let mut fast = connect(addr, "2.0.0").await;
    join_v2(&mut slow, "firehose", "1", json!({})).await;
    join_v2(&mut fast, "firehose", "1", json!({})).await;
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let mut received = 0usize;
    // `slow` never reads; `fast` keeps up. Kernel buffers absorb a few MB, then the queue fills.
    for i in 0..600 {
        server.publish(DbBroadcast {
            topic: "firehose".into(),
            event: "x".into(),
            private: false,
            id: i.to_string(),
            payload: Payload::Binary(chunk.clone()),
            offset: None,
        });
        next_binary(&mut fast).await;
        received += 1;
        if server.connection_count() == 1 {
            break;
        }
    }
    assert!(received > 0);
    // Wait (bounded) for the slow socket to be gone.
    for _ in 0..1000 {
        if server.connection_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.connection_count(), 1, "slow consumer disconnected");
    // The slow client eventually sees the close (after its backlog), or a reset.
    let mut saw_policy_close = false;
    while let Ok(Some(m)) = tokio::time::timeout(WAIT, slow.next()).await {
        match m {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Policy);
                assert_eq!(f.reason.as_str(), "slow consumer: outbound queue full");
                saw_policy_close = true;
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let _ = saw_policy_close; // the close frame may be lost when the write side was stuck
    // The fast one still works.
    send_text(&mut fast, json!([null, "z", "phoenix", "heartbeat", {}])).await;
    loop {
        match next_frame(&mut fast).await {
            Message::Text(t) => {
                assert_eq!(
                    serde_json::from_str::<Value>(t.as_str()).unwrap()[1],
                    json!("z")
                );
                break;
            }
            _ => continue,
        }
    }
    stop(server).await;
}

#[tokio::test]
async fn idle_sockets_are_closed() {
    let (server, addr) = start(Config {
        idle_timeout: Duration::from_millis(200),
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    match tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("closed in time")
    {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    stop(server).await;
}

#[tokio::test]
async fn shutdown_sends_going_away() {
    let (server, addr) = start(test_config());
    let mut a = connect(addr, "2.0.0").await;
    let mut b = connect(addr, "1.0.0").await;
    // Make sure both upgrades are fully handed over to their connection tasks.
    send_text(&mut a, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    next_json(&mut a).await;
    send_text(
        &mut b,
        json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"}),
    )
    .await;
    next_json(&mut b).await;
    let stopping = tokio::task::spawn_blocking(move || server.shutdown(Duration::from_secs(5)));
    for ws in [&mut a, &mut b] {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close arrives")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Away);
                assert_eq!(f.reason.as_str(), "server shutting down");
            }
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn private_join_through_the_authorization_hook() {
    let (server, addr) = start(Config {
        authorize_private: true,
        ..test_config()
    });
    let mut ws = connect(addr, "2.0.0").await;
    send_text(&mut ws, json!(["1", "1", "realtime:vip", "phx_join", {"config": {"private": true}, "access_token": token()}])).await;
    let server = std::sync::Arc::new(server);
    let request = next_authorization(&server).await;
    assert_eq!(request.subtopic, "vip");
    assert_eq!(request.purpose, AuthorizationPurpose::Join);
    assert_eq!(request.claims.role, "anon");
    assert_eq!(request.claims.sub.as_deref(), Some("user-1"));
    assert!(server.complete_authorization(
        request.id,
        Ok(Authorization {
            broadcast_read: true,
            broadcast_write: true,
            ..Default::default()
        }),
        Replay::default()
    ));
    assert_eq!(
        next_json(&mut ws).await[4],
        json!({"status": "ok", "response": {"postgres_changes": []}})
    );

    // Private DB messages now reach it; public ones of the same name do not.
    server.publish(DbBroadcast {
        topic: "vip".into(),
        event: "pub".into(),
        private: false,
        id: "1".into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    });
    server.publish(DbBroadcast {
        topic: "vip".into(),
        event: "priv".into(),
        private: true,
        id: "2".into(),
        payload: Payload::Json(Bytes::from_static(b"{}")),
        offset: None,
    });
    assert_eq!(
        decode_user_broadcast(&next_binary(&mut ws).await)
            .unwrap()
            .event,
        "priv"
    );
    let server = std::sync::Arc::try_unwrap(server).ok().expect("sole owner");
    stop(server).await;
}

#[tokio::test]
async fn writes_beyond_the_hold_of_a_running_write_check_are_refused_not_lost_silently() {
    let (server, addr) = start(Config {
        authorize_private: true,
        ..test_config()
    });
    let server = std::sync::Arc::new(server);
    let mut ws = connect(addr, "2.0.0").await;
    send_text(
        &mut ws,
        json!(["1", "1", "realtime:vip", "phx_join",
        {"config": {"private": true, "broadcast": {"ack": true}}, "access_token": token()}]),
    )
    .await;
    let join = next_authorization(&server).await;
    assert!(server.complete_authorization(
        join.id,
        Ok(Authorization {
            broadcast_read: true,
            ..Default::default()
        }),
        Replay::default()
    ));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");

    // The write check is not answered yet: 256 writes wait for it, the next one is refused.
    for i in 0..=256 {
        send_text(
            &mut ws,
            json!(["1", format!("m{i}"), "realtime:vip", "broadcast",
            {"type": "broadcast", "event": "e", "payload": {"i": i}}]),
        )
        .await;
    }
    let refused = next_json(&mut ws).await;
    assert_eq!(refused[1], "m256");
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": "Too many messages per second"}})
    );

    let write = next_authorization(&server).await;
    assert_eq!(write.purpose, AuthorizationPurpose::Write);
    assert!(server.complete_authorization(
        write.id,
        Ok(Authorization {
            broadcast_read: true,
            broadcast_write: true,
            ..Default::default()
        }),
        Replay::default()
    ));
    for i in 0..256 {
        let reply = next_json(&mut ws).await;
        assert_eq!(reply[1], format!("m{i}"), "held writes go on in order");
        assert_eq!(reply[4]["status"], "ok");
    }
    let server = std::sync::Arc::try_unwrap(server).ok().expect("sole owner");
    stop(server).await;
}

#[tokio::test]
async fn presence_track_update_and_leave() {
    let (server, addr) = start(test_config());
    let mut a = connect(addr, "2.0.0").await;
    let mut b = connect(addr, "1.0.0").await;
    let cfg = json!({"presence": {"enabled": true, "key": "alice"}});
    assert_eq!(
        join_v2(&mut a, "lobby", "1", cfg).await["status"],
        json!("ok")
    );
    assert_eq!(
        next_json(&mut a).await,
        json!(["1", null, "realtime:lobby", "presence_state", {}])
    );

    send_text(&mut a, json!(["1", "2", "realtime:lobby", "presence", {"type": "presence", "event": "track", "payload": {"name": "Alice"}}])).await;
    let (mut diff, mut reply) = (next_json(&mut a).await, next_json(&mut a).await);
    if diff[3] == json!("phx_reply") {
        std::mem::swap(&mut diff, &mut reply);
    }
    assert_eq!(reply[4], json!({"status": "ok", "response": {}}));
    assert_eq!(diff[3], json!("presence_diff"));
    let meta = &diff[4]["joins"]["alice"]["metas"][0];
    assert_eq!(meta["name"], json!("Alice"));
    let first_ref = meta["phx_ref"].as_str().unwrap().to_string();

    // A late joiner gets the snapshot (V1 object form).
    let reply = join_v1(
        &mut b,
        "lobby",
        "1",
        json!({"presence": {"enabled": "true"}}),
    )
    .await;
    assert_eq!(reply["status"], json!("ok"));
    let state = next_json(&mut b).await;
    assert_eq!(state["event"], json!("presence_state"));
    assert_eq!(
        state["payload"]["alice"]["metas"][0]["phx_ref"],
        json!(first_ref)
    );

    // Update: join + leave for the same key, with phx_ref_prev.
    send_text(&mut a, json!(["1", "3", "realtime:lobby", "presence", {"type": "presence", "event": "TRACK", "payload": {"name": "Alice2"}}])).await;
    let d = next_json(&mut b).await;
    assert_eq!(d["event"], json!("presence_diff"));
    assert_eq!(
        d["payload"]["joins"]["alice"]["metas"][0]["phx_ref_prev"],
        json!(first_ref)
    );
    assert_eq!(
        d["payload"]["leaves"]["alice"]["metas"][0]["name"],
        json!("Alice")
    );

    // Non-map payloads are refused.
    send_text(&mut a, json!(["1", "4", "realtime:lobby", "presence", {"type": "presence", "event": "track", "payload": 5}])).await;
    let mut r = next_json(&mut a).await;
    while r[1] != json!("4") {
        r = next_json(&mut a).await;
    }
    assert_eq!(
        r[4]["response"]["reason"],
        json!("Presence track payload must be a map")
    );

    // The tracker's socket goes away: a leave diff follows.
    drop(a);
    let d = next_json(&mut b).await;
    assert_eq!(d["event"], json!("presence_diff"));
    assert_eq!(
        d["payload"]["leaves"]["alice"]["metas"][0]["name"],
        json!("Alice2")
    );
    stop(server).await;
}

/// Checks the signal mask of every runtime thread; returns how many there are.
fn check_runtime_threads() -> usize {
    let mut checked = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "pg_realtime net" {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        for sig in [1, 2, 10, 12, 15, 17] {
            // SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGTERM, SIGCHLD
            assert!(
                blocked & (1 << (sig - 1)) != 0,
                "signal {sig} not blocked in {dir:?}"
            );
        }
        checked += 1;
    }
    checked
}

/// Postgres signals must only ever reach the worker's main thread.
#[test]
fn runtime_threads_block_signals() {
    let server = realtime_server::Server::start(test_config()).unwrap();
    // The runtime starts its threads asynchronously: wait until they exist.
    let mut checked = 0;
    for _ in 0..200 {
        checked = check_runtime_threads();
        if checked >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(checked >= 2, "found {checked} runtime threads");
    // The calling thread's own mask is left as it was.
    let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let own_blocked = own
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        own_blocked & (1 << 14),
        0,
        "SIGTERM still deliverable to the caller"
    );
    server.shutdown(Duration::from_secs(1));
}
