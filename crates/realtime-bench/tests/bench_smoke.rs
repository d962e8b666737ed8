//! Keeps the load generator working: every scenario runs for a second or two at tiny sizes
//! against a fresh cluster, and must deliver messages without errors. Nothing here looks at
//! how fast anything was (benchmarks are not tests; the figures live in BENCHMARKS.md).

use std::process::Command;

use realtime_integration_tests::{Cluster, JWT_SECRET};
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_realtime-bench");

fn run(cluster: &Cluster, scenario: &str, args: &[&str]) -> Value {
    let json = cluster.path().join(format!("bench-{scenario}.json"));
    let url = format!("ws://127.0.0.1:{}/realtime/v1/websocket", cluster.ws_port);
    let output = Command::new(BENCH)
        .arg(scenario)
        .args(["--url", &url, "--pg", &cluster.connection_string()])
        .args(["--warmup", "0.5", "--duration", "1", "--drain", "1"])
        .args(["--json", json.to_str().expect("utf-8 path")])
        .args(args)
        .env("REALTIME_JWT_SECRET", JWT_SECRET)
        .output()
        .expect("realtime-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{scenario} failed:\n{stdout}{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.log()
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report was written");
    let report: Value = serde_json::from_str(&text).expect("the JSON report parses");
    assert_eq!(report["scenario"], scenario, "{text}");
    assert_eq!(report["errors"], 0, "{scenario} saw errors:\n{stdout}");
    report
}

#[test]
fn every_scenario_delivers() {
    let cluster = Cluster::start("bench_smoke", &[]);

    let fanout = run(
        &cluster,
        "fanout",
        &[
            "--pubs", "2", "--topics", "2", "--subs", "3", "--rate", "200",
        ],
    );
    assert!(fanout["received_deliveries"].as_u64() > Some(0), "{fanout}");
    assert!(fanout["latency"]["p99_us"].is_u64(), "{fanout}");

    let binary = run(
        &cluster,
        "fanout",
        &[
            "--pubs", "1", "--topics", "1", "--subs", "2", "--rate", "100", "--frames", "binary",
        ],
    );
    assert!(binary["received_deliveries"].as_u64() > Some(0), "{binary}");

    // Private channels under the run's policies, every message stored, acked after its commit.
    let persist = run(
        &cluster,
        "fanout",
        &[
            "--pubs",
            "1",
            "--topics",
            "1",
            "--subs",
            "2",
            "--rate",
            "50",
            "--persist",
            "true",
            "--ack",
            "true",
        ],
    );
    assert!(
        persist["received_deliveries"].as_u64() > Some(0),
        "{persist}"
    );
    assert!(persist["acked"].as_u64() > Some(0), "{persist}");
    assert_eq!(persist["refused"], 0, "{persist}");
    assert_eq!(persist["unanswered"], 0, "{persist}");
    assert!(persist["stored_rows"].as_i64() > Some(0), "{persist}");
    assert!(
        persist["store_transactions"].as_i64() > Some(0),
        "{persist}"
    );

    let database = run(
        &cluster,
        "database",
        &[
            "--conns", "2", "--topics", "2", "--subs", "2", "--rate", "50",
        ],
    );
    assert!(
        database["received_deliveries"].as_u64() > Some(0),
        "{database}"
    );
    assert!(
        database["statement_latency"]["p50_us"].is_u64(),
        "{database}"
    );

    let batched = run(
        &cluster,
        "database",
        &[
            "--conns", "1", "--topics", "1", "--subs", "2", "--rate", "100", "--per-tx", "5",
        ],
    );
    assert!(
        batched["received_deliveries"].as_u64() > Some(0),
        "{batched}"
    );

    // Two child processes, so the parent/child protocol is exercised too.
    let connections = run(
        &cluster,
        "connections",
        &[
            "--count",
            "20",
            "--per-proc",
            "10",
            "--topics",
            "4",
            "--hold",
            "0.5",
        ],
    );
    assert_eq!(connections["joined"], 20, "{connections}");
    assert_eq!(connections["ping_received"], 20, "{connections}");

    // Two child processes again; every member must end up holding all 12 keys.
    let presence = run(
        &cluster,
        "presence",
        &["--members", "12", "--per-proc", "6", "--timeout", "20"],
    );
    assert_eq!(presence["joined"], 12, "{presence}");
    assert_eq!(presence["tracks_sent"], 12, "{presence}");
    assert_eq!(presence["converged_members"], 12, "{presence}");
    assert_eq!(presence["complete_before_close"], 12, "{presence}");
    assert!(presence["convergence_seconds"].is_f64(), "{presence}");

    // A room built in batches over two processes, then newcomers one after the other: each
    // gets the whole room, and its join and its leave reach every member.
    let room = run(
        &cluster,
        "presence-room",
        &[
            "--members",
            "12",
            "--per-proc",
            "6",
            "--batch",
            "4",
            "--pause",
            "0.1",
            "--samples",
            "3",
            "--gap",
            "0.05",
            "--settle",
            "0.2",
        ],
    );
    assert_eq!(room["joined"], 12, "{room}");
    assert_eq!(room["samples_measured"], 3, "{room}");
    assert_eq!(room["state_complete"], 3, "{room}");
    assert_eq!(room["diffs_missed"], 0, "{room}");
    assert_eq!(room["fewest_members_reached"], 12, "{room}");
    assert!(room["leave_reached_all"]["p99_us"].is_u64(), "{room}");

    let private = run(
        &cluster,
        "private-joins",
        &["--joins", "30", "--concurrency", "4"],
    );
    assert_eq!(private["joins_ok"], 30, "{private}");
    assert_eq!(private["uncovered_topic_refused"], true, "{private}");

    // Every phase ran and was measured; what the figures are is for BENCHMARKS.md.
    let memory = run(
        &cluster,
        "memory",
        &[
            "--flood", "1", "--idle", "1", "--pubs", "1", "--topics", "1", "--subs", "2", "--rate",
            "100",
        ],
    );
    for key in [
        "fresh_mib",
        "flood_peak_mib",
        "after_fanout_mib",
        "after_idle_mib",
    ] {
        assert!(memory[key].is_f64(), "{key}: {memory}");
    }
    assert!(memory["flood_pairs_sent"].as_u64() > Some(0), "{memory}");
    assert!(memory["fanout_deliveries_per_sec"].is_f64(), "{memory}");
}
