//! Persisted broadcasts at the server's edge, the test playing the worker: what may wait to be
//! stored is bounded per connection, and a stored row's delivery leaves its sender out.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use realtime_server::protocol::binary::decode_user_broadcast;
use realtime_server::{
    Authorization, AuthorizationRequest, Config, DbBroadcast, Event, Payload, PersistRequest,
    Replay, Server,
};
use serde_json::{Value, json};

fn unwrap_arc(server: Arc<Server>) -> Server {
    Arc::try_unwrap(server).ok().expect("sole owner")
}

/// A kind-3 frame with `meta`, as realtime-js sends `send({..., persist})`.
fn persisted_push(r: &str, topic: &str, meta: &str, payload: &str) -> Bytes {
    let topic = format!("realtime:{topic}");
    let mut f = vec![
        3u8,
        1,
        r.len() as u8,
        topic.len() as u8,
        4,
        meta.len() as u8,
        1,
    ];
    for s in ["1", r, &topic, "note", meta, payload] {
        f.extend_from_slice(s.as_bytes());
    }
    Bytes::from(f)
}

/// Plays the worker until `want` says it has what it waits for.
async fn worker_events(
    server: &Arc<Server>,
    mut want: impl FnMut(&[Event]) -> bool + Send + 'static,
) -> Vec<Event> {
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for _ in 0..2000 {
            all.extend(server.poll_events());
            if want(&all) {
                return all;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the server never asked: {all:?}");
    })
    .await
    .unwrap()
}

fn authorizations(events: &[Event]) -> Vec<AuthorizationRequest> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Authorize(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn persists(events: &[Event]) -> Vec<PersistRequest> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// Joins private `topic` on a new socket, answering its read check as the worker.
async fn join_private(
    server: &Arc<Server>,
    addr: std::net::SocketAddr,
    topic: &str,
    self_: bool,
) -> Ws {
    let mut ws = connect(addr, "2.0.0").await;
    send_text(
        &mut ws,
        json!(["1", "1", format!("realtime:{topic}"), "phx_join",
        {"config": {"private": true, "broadcast": {"ack": true, "self": self_}}, "access_token": token()}]),
    )
    .await;
    let asked = worker_events(server, |e| !authorizations(e).is_empty()).await;
    let join = &authorizations(&asked)[0];
    let read = Authorization {
        broadcast_read: true,
        ..Default::default()
    };
    assert!(server.complete_authorization(join.id, Ok(read), Replay::default()));
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    ws
}

#[tokio::test]
async fn persisted_sends_waiting_for_the_worker_are_bounded_per_connection() {
    let (server, addr) = start(Config {
        authorize_private: true,
        max_persist_per_connection: 2,
        ..test_config()
    });
    let server = Arc::new(server);
    let mut sender = join_private(&server, addr, "vip", false).await;
    let mut reader = join_private(&server, addr, "vip", false).await;
    for r in ["m1", "m2", "m3"] {
        send_binary(
            &mut sender,
            persisted_push(r, "vip", r#"{"persist":true}"#, r#"{"r":1}"#),
        )
        .await;
    }
    // The first write asks for the write rights; the messages wait for them, in order.
    let asked = worker_events(&server, |e| !authorizations(e).is_empty()).await;
    let write = authorizations(&asked)[0].clone();
    let rights = Authorization {
        broadcast_read: true,
        broadcast_write: true,
        ..Default::default()
    };
    assert!(server.complete_authorization(write.id, Ok(rights), Replay::default()));
    // Two wait for the worker; the third is refused at once.
    let refused = next_json(&mut sender).await;
    assert_eq!(refused[1], "m3", "{refused}");
    let why = "Too many messages are waiting to be stored";
    assert_eq!(
        refused[4],
        json!({"status": "error", "response": {"reason": why, "error": why}})
    );
    let waiting = persists(&worker_events(&server, |e| persists(e).len() == 2).await);
    assert!(
        waiting
            .iter()
            .all(|r| r.check && r.subtopic == "vip" && r.event == "note")
    );

    // Stored: the acked sender gets the row's id; the other is refused by its policy.
    assert!(server.complete_persist(waiting[0].id, Ok("row-1".into())));
    let denied = realtime_server::PersistError::Denied {
        subtopic: "vip".into(),
    };
    assert!(server.complete_persist(waiting[1].id, Err(denied)));
    // Each answer is delivered by its own task, so the two replies may come in either order.
    let mut replies = [next_json(&mut sender).await, next_json(&mut sender).await];
    replies.sort_by_key(|r| r[1].as_str().map(str::to_string));
    let [ok, no] = replies;
    assert_eq!(
        (&ok[1], &ok[4]),
        (
            &json!("m1"),
            &json!({"status": "ok", "response": {"id": "row-1"}})
        )
    );
    assert_eq!(no[1], "m2");
    assert_eq!(no[4]["status"], "error");

    // The committed row reaches the reader but not its sender (broadcast.self is off): the
    // sender's next frame is the database message that follows it.
    for id in ["row-1", "row-2"] {
        assert!(server.publish(DbBroadcast {
            topic: "vip".into(),
            event: "note".into(),
            private: true,
            id: id.into(),
            payload: Payload::Json(Bytes::from_static(b"{}")),
            offset: None,
        }));
    }
    for (ws, first) in [(&mut reader, "row-1"), (&mut sender, "row-2")] {
        let frame = next_binary(ws).await;
        let m = decode_user_broadcast(&frame).expect("a broadcast");
        let meta: Value = serde_json::from_slice(m.metadata.as_deref().unwrap_or(b"{}")).unwrap();
        assert_eq!(meta["id"], first);
    }
    stop(unwrap_arc(server)).await;
}
