//! The worker's memory: what `realtime.stats()` says it holds, and that one client flooding it
//! cannot make it grow without bound.

use realtime_integration_tests::{Cluster, Socket, eventually, jwt};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// The worker's usage gauges from `realtime.stats()`, by column name; None before the worker's
/// first snapshot.
fn usage(c: &mut postgres::Client, column: &str) -> Option<i64> {
    c.query_one(&format!("SELECT {column} FROM realtime.stats()"), &[])
        .unwrap()
        .get(0)
}

#[test]
fn stats_show_sockets_channels_presence_and_memory_and_go_back_down() {
    let cluster = Cluster::start("memory_stats", &[]);
    let mut c = cluster.connect();
    assert!(
        eventually(WAIT, || usage(&mut c, "worker_memory_bytes").unwrap_or(0)
            > 0),
        "the worker reports its memory"
    );
    let fresh: bool = c
        .query_one(
            "SELECT usage_updated_at > now() - interval '1 minute' FROM realtime.stats()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(fresh, "the snapshot says when it was taken");

    let n = 3;
    let mut sockets = Vec::new();
    for i in 0..n {
        let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
        let key = format!("member-{i}");
        let config = json!({"presence": {"enabled": true, "key": key}, "private": false});
        assert_eq!(s.join(&format!("room-{i}"), config)["status"], "ok");
        let r = s.next_ref();
        s.push(
            Some("1"),
            &r,
            &format!("realtime:room-{i}"),
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"here": true}}),
        );
        sockets.push(s);
    }
    let at_least = |c: &mut postgres::Client, column: &str, min: i64| {
        usage(c, column).is_some_and(|v| v >= min)
    };
    assert!(
        eventually(WAIT, || at_least(&mut c, "sockets", n)
            && at_least(&mut c, "channels", n)
            && at_least(&mut c, "presence_keys", n)
            && at_least(&mut c, "presence_bytes", 1)),
        "stats() shows the sockets, channels and presence"
    );
    for column in [
        "socket_queued_bytes",
        "pending_authorizations",
        "held_write_bytes",
        "publish_queue_bytes",
    ] {
        assert!(at_least(&mut c, column, 0), "{column} is reported");
    }

    drop(sockets);
    assert!(
        eventually(WAIT, || usage(&mut c, "sockets") == Some(0)
            && usage(&mut c, "channels") == Some(0)
            && usage(&mut c, "presence_keys") == Some(0)),
        "they go back down once the clients leave"
    );
}

/// One anonymous socket sending private join/leave pairs as fast as it can (reading what comes
/// back so it is not closed as a slow consumer) does not grow the worker's private memory by
/// more than 64 MiB.
#[test]
fn a_private_join_leave_flood_does_not_grow_the_worker() {
    let cluster = Cluster::start("memory_flood", &[]);
    let mut c = cluster.connect();
    assert!(eventually(WAIT, || usage(&mut c, "worker_memory_bytes").is_some()));
    let mut fresh = usage(&mut c, "worker_memory_bytes").unwrap_or(0);
    // A first connection and its first replies warm up the network threads.
    let mut warm = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    assert_eq!(warm.join("warm", json!({}))["status"], "ok");
    drop(warm);
    assert!(eventually(WAIT, || usage(&mut c, "sockets") == Some(0)));
    let observed_at = |c: &mut postgres::Client| {
        c.query_one("SELECT usage_updated_at FROM realtime.stats()", &[])
            .unwrap()
            .get::<_, Option<std::time::SystemTime>>(0)
    };
    let before = observed_at(&mut c);
    assert!(eventually(WAIT, || observed_at(&mut c) != before));
    fresh = fresh.max(usage(&mut c, "worker_memory_bytes").unwrap_or(0));

    let mut flood = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    let mut peak = fresh;
    let until = Instant::now() + Duration::from_secs(12);
    let mut i = 0u64;
    while Instant::now() < until {
        for _ in 0..200 {
            i += 1;
            let (r, topic) = (i.to_string(), format!("realtime:flood-{}", i % 32));
            flood.push(
                Some(&r),
                &r,
                &topic,
                "phx_join",
                json!({"config": {"private": true}}),
            );
            flood.push(Some(&r), &r, &topic, "phx_leave", json!({}));
        }
        assert!(flood.discard_arrived(), "the flooding socket stays open");
        if i.is_multiple_of(2000) {
            peak = peak.max(usage(&mut c, "worker_memory_bytes").unwrap_or(0));
        }
    }
    peak = peak.max(usage(&mut c, "worker_memory_bytes").unwrap_or(0));
    let grown = peak - fresh;
    assert!(
        grown < 64 << 20,
        "the worker grew by {} MiB (from {} MiB)",
        grown >> 20,
        fresh >> 20
    );
    // Others are still served.
    let mut other = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    assert_eq!(other.join("other", json!({}))["status"], "ok");
}
