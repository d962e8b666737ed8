//! Persisted client broadcasts (`persist`), frame by frame: realtime-js puts
//! `{"persist": true}` or `{"persist": {"ttl": N}}` in the metadata of a kind-3 frame. A
//! message the INSERT policies let the sender store (`extension = 'persistence'`) is stored in
//! `realtime.messages` and delivered once, after its commit, with `meta.id`; an acked send is
//! answered `{"id": ...}`. Everything refused is answered with a reason, stores nothing and
//! delivers nothing.

use realtime_integration_tests::{Cluster, Socket, jwt};
use realtime_test_client::binary::user_broadcast_push_with_meta;
use realtime_test_client::phoenix::Message;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
/// Long enough for a message that was going to arrive to arrive; only used to show absence.
const QUIET: Duration = Duration::from_secs(2);

/// Who may do what: `authenticated` reads and writes `persist-*` topics and may store on them;
/// `anon` reads and writes `persist-*` topics but may not store.
const POLICIES: &str = "
    CREATE POLICY persist_read ON realtime.messages FOR SELECT TO anon, authenticated
      USING (realtime.topic() LIKE 'persist-%');
    CREATE POLICY persist_write ON realtime.messages FOR INSERT TO anon, authenticated
      WITH CHECK (realtime.topic() LIKE 'persist-%' AND extension = 'broadcast');
    CREATE POLICY persist_store ON realtime.messages FOR INSERT TO authenticated
      WITH CHECK (realtime.topic() LIKE 'persist-%' AND extension = 'persistence');";

fn cluster(name: &str) -> Cluster {
    let cluster = Cluster::start(name, &["realtime.retention = '1d'"]);
    cluster.execute(POLICIES);
    cluster
}

fn member() -> String {
    jwt(json!({"role": "authenticated", "sub": "member"}))
}

/// A kind-3 frame with metadata and a JSON payload, as realtime-js builds it for
/// `send({..., persist})`.
fn push_with_meta(
    join_ref: &str,
    reference: &str,
    topic: &str,
    event: &str,
    meta: &str,
    payload: &[u8],
) -> Vec<u8> {
    user_broadcast_push_with_meta(
        join_ref,
        reference,
        topic,
        event,
        meta.as_bytes(),
        payload,
        true,
    )
}

/// A socket joined to `realtime:<topic>` with `config`; the join's ref is "1".
fn joined(cluster: &Cluster, token: &str, topic: &str, config: Value) -> Socket {
    let mut s = Socket::connect(cluster, token, "2.0.0");
    let reply = s.join(topic, config);
    assert_eq!(reply["status"], "ok", "{reply}");
    s
}

/// Sends a persisted broadcast and returns the reply to it.
fn send_persisted(s: &mut Socket, topic: &str, meta: &str, payload: &Value) -> Value {
    let r = s.next_ref();
    let frame = push_with_meta(
        "1",
        &r,
        &format!("realtime:{topic}"),
        "note",
        meta,
        payload.to_string().as_bytes(),
    );
    s.send_binary(frame);
    reply_to(s, &r)
}

fn reply_to(s: &mut Socket, r: &str) -> Value {
    loop {
        let m = s.recv_event("phx_reply", WAIT).expect("a reply");
        if m.reference.as_deref() == Some(r) {
            return m.payload;
        }
    }
}

/// The broadcasts that arrive within QUIET.
fn broadcasts(s: &mut Socket) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) = s.recv_event("broadcast", QUIET) {
        out.push(m);
    }
    out
}

/// A JSON POST to the worker's port; (status, body as JSON, Null when it is not JSON).
fn http_post(cluster: &Cluster, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", cluster.ws_port)).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("an answer");
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

fn stored_rows(cluster: &Cluster, topic: &str) -> i64 {
    cluster
        .connect()
        .query_one(
            "SELECT count(*) FROM realtime.messages WHERE topic = $1 AND event IS NOT NULL",
            &[&topic],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_persisted_broadcast_is_stored_delivered_once_with_its_id_and_acked_with_that_id() {
    let cluster = cluster("persist_stored");
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-a", config.clone());
    let mut reader = joined(&cluster, &member(), "persist-a", config);

    let reply = send_persisted(
        &mut sender,
        "persist-a",
        r#"{"persist":true}"#,
        &json!({"n": 1}),
    );
    assert_eq!(reply["status"], "ok", "{reply}");
    let id = reply["response"]["id"]
        .as_str()
        .expect("the stored id")
        .to_string();

    let got = broadcasts(&mut reader);
    assert_eq!(got.len(), 1, "delivered exactly once: {got:?}");
    assert_eq!(got[0].payload["event"], "note");
    assert_eq!(got[0].payload["payload"], json!({"n": 1}));
    assert_eq!(got[0].payload["meta"]["id"], id.as_str());
    assert!(
        broadcasts(&mut sender).is_empty(),
        "broadcast.self is off: the sender does not get its own message"
    );

    let row = cluster
        .connect()
        .query_one(
            "SELECT topic, extension, event, payload, private, expires_at IS NULL
               FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "persist-a");
    assert_eq!(row.get::<_, String>(1), "broadcast");
    assert_eq!(row.get::<_, String>(2), "note");
    assert_eq!(row.get::<_, Value>(3), json!({"n": 1}));
    assert!(row.get::<_, bool>(4));
    assert!(row.get::<_, bool>(5), "no ttl, no expiry");
}

#[test]
fn a_sender_with_broadcast_self_receives_its_persisted_message_once() {
    let cluster = cluster("persist_self");
    let config = json!({"private": true, "broadcast": {"ack": true, "self": true}});
    let mut sender = joined(&cluster, &member(), "persist-self", config);
    // The stored message and the ack travel separately: either may arrive first.
    let r = sender.next_ref();
    sender.send_binary(push_with_meta(
        "1",
        &r,
        "realtime:persist-self",
        "note",
        r#"{"persist":true}"#,
        json!({"n": 2}).to_string().as_bytes(),
    ));
    let mut reply = None;
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while reply.is_none() && std::time::Instant::now() < deadline {
        let Some(frame) = sender.recv(QUIET) else {
            continue;
        };
        let Some(m) = Message::from_frame(&frame, sender.vsn) else {
            continue;
        };
        match m.event.as_str() {
            "phx_reply" if m.reference.as_deref() == Some(r.as_str()) => reply = Some(m.payload),
            "broadcast" => got.push(m),
            _ => {}
        }
    }
    let reply = reply.expect("the ack");
    assert_eq!(reply["status"], "ok", "{reply}");
    got.extend(broadcasts(&mut sender));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload["meta"]["id"], reply["response"]["id"]);
}

#[test]
fn a_ttl_is_stored_as_the_rows_expiry() {
    let cluster = cluster("persist_ttl");
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-ttl", config);
    let reply = send_persisted(
        &mut sender,
        "persist-ttl",
        r#"{"persist":{"ttl":3600}}"#,
        &json!({"n": 3}),
    );
    assert_eq!(reply["status"], "ok", "{reply}");
    let id = reply["response"]["id"].as_str().unwrap().to_string();
    let kept: bool = cluster
        .connect()
        .query_one(
            "SELECT expires_at - inserted_at = interval '1 hour'
               FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(kept, "expires_at is the insert time plus the ttl");
}

#[test]
fn a_sender_without_the_persistence_policy_is_refused_and_nothing_is_stored_or_delivered() {
    let cluster = cluster("persist_denied");
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let anon = jwt(json!({"role": "anon"}));
    let mut sender = joined(&cluster, &anon, "persist-denied", config.clone());
    let mut reader = joined(&cluster, &member(), "persist-denied", config);
    let denied = "Unauthorized: You do not have permissions to store messages on this Channel topic: persist-denied";
    // Twice: the second answer comes from the channel's cached verdict.
    for n in 0..2 {
        let reply = send_persisted(
            &mut sender,
            "persist-denied",
            r#"{"persist":true}"#,
            &json!({"n": n}),
        );
        assert_eq!(
            reply,
            json!({"status": "error", "response": {"reason": denied, "error": denied}})
        );
    }
    assert!(broadcasts(&mut reader).is_empty(), "nothing delivered");
    assert_eq!(stored_rows(&cluster, "persist-denied"), 0);

    // The channel still broadcasts without persist.
    let r = sender.next_ref();
    sender.send_binary(push_with_meta(
        "1",
        &r,
        "realtime:persist-denied",
        "note",
        "",
        br#"{"live":true}"#,
    ));
    assert_eq!(reply_to(&mut sender, &r)["status"], "ok");
    let got = broadcasts(&mut reader);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload["payload"], json!({"live": true}));
    assert_eq!(stored_rows(&cluster, "persist-denied"), 0);
}

#[test]
fn persist_on_a_public_channel_is_refused() {
    let cluster = cluster("persist_public");
    let config = json!({"broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-public", config.clone());
    let mut reader = joined(&cluster, &member(), "persist-public", config);
    let reply = send_persisted(
        &mut sender,
        "persist-public",
        r#"{"persist":true}"#,
        &json!({}),
    );
    let why = "persist is only available on private channels";
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": why, "error": why}})
    );
    assert!(broadcasts(&mut reader).is_empty());
    assert_eq!(stored_rows(&cluster, "persist-public"), 0);
}

#[test]
fn malformed_persist_values_get_a_clear_error_and_the_channel_loses_nothing() {
    let cluster = cluster("persist_malformed");
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-bad", config.clone());
    let mut reader = joined(&cluster, &member(), "persist-bad", config);
    let malformed = r#"persist must be true or an object such as {"ttl": 3600}"#;
    let bad_ttl =
        "persist ttl must be a whole number of seconds from 1 to 86400 (realtime.retention)";
    for (meta, why) in [
        (r#"{"persist":5}"#, malformed),
        (r#"{"persist":"yes"}"#, malformed),
        (r#"{"persist":{"ttl":"x"}}"#, bad_ttl),
        (r#"{"persist":{"ttl":0}}"#, bad_ttl),
        (r#"{"persist":{"ttl":86401}}"#, bad_ttl),
    ] {
        let reply = send_persisted(&mut sender, "persist-bad", meta, &json!({"bad": meta}));
        assert_eq!(
            reply,
            json!({"status": "error", "response": {"reason": why, "error": why}}),
            "{meta}"
        );
    }
    assert!(broadcasts(&mut reader).is_empty(), "nothing delivered");
    assert_eq!(stored_rows(&cluster, "persist-bad"), 0);
    // The socket and channel still work: the next valid one is stored and delivered.
    let reply = send_persisted(
        &mut sender,
        "persist-bad",
        r#"{"persist":{"ttl":86400}}"#,
        &json!({"ok": 1}),
    );
    assert_eq!(reply["status"], "ok", "{reply}");
    let got = broadcasts(&mut reader);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload["payload"], json!({"ok": 1}));
    assert_eq!(stored_rows(&cluster, "persist-bad"), 1);
}

#[test]
fn a_payload_over_the_limit_is_refused_and_not_stored() {
    let cluster = Cluster::start("persist_large", &["realtime.max_payload_size = '1kB'"]);
    cluster.execute(POLICIES);
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-large", config);
    let big = json!({"x": "y".repeat(2000)});
    let reply = send_persisted(&mut sender, "persist-large", r#"{"persist":true}"#, &big);
    assert_eq!(
        reply,
        json!({"status": "error", "response": "payload_size_exceeded"})
    );
    assert_eq!(stored_rows(&cluster, "persist-large"), 0);
}

#[test]
fn a_store_that_fails_answers_the_sender_and_stores_nothing() {
    let cluster = cluster("persist_fails");
    cluster.execute(
        "CREATE FUNCTION public.refuse_notes() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.event = 'note' AND NEW.topic = 'persist-fails' THEN
             RAISE EXCEPTION 'notes are closed today';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_notes BEFORE INSERT ON realtime.messages
           FOR EACH ROW EXECUTE FUNCTION public.refuse_notes();",
    );
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-fails", config.clone());
    let mut reader = joined(&cluster, &member(), "persist-fails", config);
    let reply = send_persisted(
        &mut sender,
        "persist-fails",
        r#"{"persist":true}"#,
        &json!({}),
    );
    let why = "The message could not be stored: notes are closed today";
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": why, "error": why}})
    );
    assert!(broadcasts(&mut reader).is_empty());
    assert_eq!(stored_rows(&cluster, "persist-fails"), 0);
}

#[test]
fn rest_persist_stores_before_answering_and_refuses_public_channels() {
    let cluster = cluster("persist_rest");
    let config = json!({"private": true});
    let mut reader = joined(&cluster, &member(), "persist-rest", config);
    let path = |query: &str| format!("/realtime/v1/api/broadcast/persist-rest/events/note?{query}");
    let post = |query: &str| http_post(&cluster, &path(query), &member(), br#"{"via":"rest"}"#);
    let (status, body) = post("private=true&persist%5Bttl%5D=60");
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("the stored id").to_string();
    let expiry: bool = cluster
        .connect()
        .query_one(
            "SELECT expires_at - inserted_at = interval '1 minute'
               FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(expiry);
    let got = broadcasts(&mut reader);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload["meta"]["id"], id.as_str());

    let (status, body) = post("persist=true");
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["message"],
        "persist is only available on private channels"
    );
    let anon = jwt(json!({"role": "anon"}));
    let (status, body) = http_post(&cluster, &path("private=true&persist=true"), &anon, b"{}");
    assert_eq!(status, 403, "{body}");
    assert_eq!(stored_rows(&cluster, "persist-rest"), 1);
}

#[test]
fn a_standby_refuses_persist_and_says_the_primary_serves_it() {
    let primary = Cluster::start_primary("persist_primary", &[]);
    primary.execute(POLICIES);
    let standby = Cluster::start_standby(&primary, "persist_standby", &[]);
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&standby, &member(), "persist-standby", config.clone());
    let mut reader = joined(&primary, &member(), "persist-standby", config);
    let reply = send_persisted(
        &mut sender,
        "persist-standby",
        r#"{"persist":true}"#,
        &json!({}),
    );
    let why = "persist is served by the primary node: connect to the primary to store messages";
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": why, "error": why}})
    );
    assert!(broadcasts(&mut reader).is_empty(), "nothing delivered");
    assert_eq!(stored_rows(&primary, "persist-standby"), 0);
}

#[test]
fn a_stored_broadcast_is_replayed_to_a_later_join_until_it_expires() {
    let cluster = cluster("persist_replay");
    let config = json!({"private": true, "broadcast": {"ack": true}});
    let mut sender = joined(&cluster, &member(), "persist-replay", config);
    let mut ids = Vec::new();
    for n in 0..2 {
        let reply = send_persisted(
            &mut sender,
            "persist-replay",
            r#"{"persist":{"ttl":3600}}"#,
            &json!({"n": n}),
        );
        assert_eq!(reply["status"], "ok", "{reply}");
        ids.push(reply["response"]["id"].as_str().unwrap().to_string());
    }
    // The first one's ttl has run out (set in the past rather than waited for).
    cluster
        .connect()
        .execute(
            "UPDATE realtime.messages SET expires_at = now() - interval '1 second'
              WHERE id = $1::text::uuid",
            &[&ids[0]],
        )
        .unwrap();
    let replaying = json!({"private": true, "broadcast": {"replay": {"since": 0, "limit": 10}}});
    let mut late = joined(&cluster, &member(), "persist-replay", replaying);
    let got = broadcasts(&mut late);
    assert_eq!(got.len(), 1, "only the unexpired one: {got:?}");
    assert_eq!(got[0].payload["payload"], json!({"n": 1}));
    assert_eq!(got[0].payload["meta"]["id"], ids[1].as_str());
    assert_eq!(got[0].payload["meta"]["replayed"], true);
}
