//! `private-joins`: joins of private channels authorized by an RLS policy, `concurrency` joins
//! in flight; reports ok replies per second.
//!
//! The scenario installs its policy through `--pg` (idempotently: roles via
//! `realtime.setup_api_roles()`, then the policy dropped and created again). Each of
//! `concurrency` sockets is one signed-in user (a JWT with `role: authenticated` and its own
//! `sub`, sent as the channel's `access_token` as realtime-js does; the socket itself connects
//! with the anon key) and joins its share of distinct topics `room-<run>-<n>` one after the
//! other, leaving each channel again once joined, so a socket never holds more than one
//! channel and the per-connection channel limit never applies. Sockets are opened before the
//! clock starts: the figure is joins, not handshakes. One more socket joins a topic the policy
//! does not cover and must be refused, proving the policy is really evaluated.

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::args::Args;
use super::client::{self, JoinOptions, Protocol, Role, SETUP_TIMEOUT, Ws};
use super::common::{self, Common, Report};
use super::stats::{self, Recorder, histogram, latency_json, now_us, proc_delta_json, round2};
use realtime_test_client::jwt;

/// Read access to broadcast on `room-*` topics for any signed-in user: the shape of the
/// policies in Supabase's authorization guide.
const POLICY: &str = "CREATE POLICY bench_private_joins ON realtime.messages \
     FOR SELECT TO authenticated \
     USING (realtime.topic() LIKE 'room-%' AND extension = 'broadcast' \
            AND current_setting('request.jwt.claim.sub', true) LIKE 'user-%')";

fn setup(conn_str: &str) -> Result<(), String> {
    let mut c = postgres::Client::connect(conn_str, postgres::NoTls).map_err(|e| e.to_string())?;
    // One transaction, so a concurrent run never sees the policy missing.
    c.batch_execute(&format!(
        "BEGIN; SELECT realtime.setup_api_roles(); \
         DROP POLICY IF EXISTS bench_private_joins ON realtime.messages; {POLICY}; COMMIT"
    ))
    .map_err(|e| format!("policy setup: {e}"))
}

struct Joined {
    ok: u64,
    latency: Histogram<u64>,
    errors: Recorder,
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let joins: usize = args.get("joins", 2_000)?;
    let concurrency: usize = args.get("concurrency", 200)?;
    args.finish()?;
    let Protocol::Phoenix { token, .. } = &common.protocol else {
        return Err("private-joins speaks Phoenix only".into());
    };
    let secret = common
        .jwt_secret
        .clone()
        .ok_or("--jwt-secret is required")?;
    let conn_str = common
        .pg
        .clone()
        .ok_or("--pg <connection string> is required")?;
    if joins == 0 || concurrency == 0 {
        return Err("--joins and --concurrency must be at least 1".into());
    }
    common::blocking(move || setup(&conn_str)).ok_or("the setup thread panicked")??;
    let pid = common.watched_pid();
    let concurrency = concurrency.min(joins);
    // Topics of this run only, so nothing joined before can be in the way.
    let run_id = now_us() % 1_000_000_000;

    // One more socket than joiners: the last one checks that the policy refuses.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(
        common.connect_concurrency.max(1),
    ));
    let mut opening = Vec::with_capacity(concurrency + 1);
    for i in 0..=concurrency {
        let (gate, protocol) = (gate.clone(), common.protocol.clone());
        let source = client::source_addr(i, common.source_addrs);
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
            client::connect(&protocol, "", Role::Subscriber, source).await
        }));
    }
    let mut sockets = Vec::with_capacity(opening.len());
    for h in opening {
        sockets.push(h.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }

    let (go_tx, go_rx) = watch::channel(false);
    let mut setup_errors = Recorder::default();
    let mut joiners = Vec::new();
    let mut denied = None;
    for (i, socket) in sockets.into_iter().enumerate() {
        let ws = match socket {
            Ok(ws) => ws,
            Err(e) => {
                setup_errors.error(e);
                continue;
            }
        };
        let options = JoinOptions {
            private: true,
            access_token: Some(jwt::token(
                &secret,
                "authenticated",
                Some(&format!("user-{i}")),
            )),
            ..JoinOptions::default()
        };
        if i == concurrency {
            let topic = format!("lobby-{run_id}");
            denied = Some(tokio::spawn(refused(
                ws,
                topic,
                token.clone(),
                options,
                go_rx.clone(),
            )));
            continue;
        }
        let topics = (i..joins)
            .step_by(concurrency)
            .map(|n| format!("room-{run_id}-{n}"))
            .collect();
        joiners.push(tokio::spawn(joiner(
            ws,
            topics,
            token.clone(),
            options,
            go_rx.clone(),
        )));
    }

    let (worker0, me0) = stats::sample_worker_and_self(pid);
    let started = Instant::now();
    let _ = go_tx.send(true);
    let mut all = Joined {
        ok: 0,
        latency: histogram(),
        errors: setup_errors,
    };
    for j in joiners {
        let j = j.await.map_err(|e| e.to_string())?;
        all.ok += j.ok;
        let _ = all.latency.add(&j.latency);
        all.errors.merge(j.errors);
    }
    let secs = started.elapsed().as_secs_f64();
    let (worker1, me1) = stats::sample_worker_and_self(pid);
    // Refusals are answered after realtime.join_error_delay (5 s by default), so this one is
    // awaited after the clock stopped.
    let refused_as_expected = match denied {
        Some(task) => match task.await.map_err(|e| e.to_string())? {
            Ok(()) => true,
            Err(e) => {
                all.errors.error(e);
                false
            }
        },
        None => false,
    };

    let mut report = Report::new("private-joins");
    report.add(
        "params",
        json!({"joins": joins, "concurrency": concurrency,
               "topics": format!("room-{run_id}-<n>"), "policy": POLICY,
               "source_addrs": common.source_addrs}),
    );
    report.add("joins_ok", all.ok);
    report.add("join_seconds", round2(secs));
    report.add("joins_per_sec", round2(all.ok as f64 / secs.max(1e-9)));
    report.add("join_latency", latency_json(&all.latency));
    report.add("uncovered_topic_refused", refused_as_expected);
    report.add("errors", all.errors.errors);
    report.add("error_samples", json!(all.errors.error_samples));
    report.add("server_process", proc_delta_json(worker0, worker1));
    report.add(
        "server_cpu_us_per_join",
        stats::cpu_us_per(worker0, worker1, all.ok),
    );
    report.add("generator_process", proc_delta_json(me0, me1));
    Ok(report)
}

/// Waits for the start signal; false if the run was abandoned.
async fn started(go: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *go.borrow() {
            return true;
        }
        if go.changed().await.is_err() {
            return false;
        }
    }
}

/// Joins each topic in turn and leaves it again once joined.
async fn joiner(
    mut ws: Ws,
    topics: Vec<String>,
    connect_token: String,
    options: JoinOptions,
    mut go: watch::Receiver<bool>,
) -> Joined {
    let mut out = Joined {
        ok: 0,
        latency: histogram(),
        errors: Recorder::default(),
    };
    if !started(&mut go).await {
        return out;
    }
    for (n, topic) in topics.iter().enumerate() {
        // Refs are unique per socket: 2n+1 for the join, 2n+2 for its leave.
        let join_ref = (2 * n + 1).to_string();
        let t = now_us();
        match join(&mut ws, &join_ref, topic, &connect_token, &options).await {
            Ok(()) => {
                out.ok += 1;
                out.latency
                    .saturating_record(now_us().saturating_sub(t).max(1));
                let leave = client::leave_frame(&join_ref, &(2 * n + 2).to_string(), topic);
                if let Err(e) = ws.send(Message::text(leave)).await {
                    out.errors.error(format!("leave: {e}"));
                    break;
                }
            }
            Err(e) => {
                out.errors.error(format!("{topic}: {e}"));
                // After a timeout or a broken socket, later replies cannot be matched.
                if !e.starts_with("join refused") {
                    break;
                }
            }
        }
    }
    common::close(ws).await;
    out
}

/// Sends one join and waits for its reply, skipping everything else (replies to leaves,
/// their `phx_close`).
async fn join(
    ws: &mut Ws,
    join_ref: &str,
    topic: &str,
    connect_token: &str,
    options: &JoinOptions,
) -> Result<(), String> {
    let frame = client::join_frame(join_ref, topic, connect_token, options);
    ws.send(Message::text(frame))
        .await
        .map_err(|e| format!("send join: {e}"))?;
    let reply = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match client::reply_to(t.as_str(), join_ref) {
                    Ok(None) => continue,
                    Ok(Some(())) => return Ok(()),
                    Err(e) => return Err(format!("join {e}")),
                },
                Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("closed".into()),
            }
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, reply)
        .await
        .map_err(|_| "join timed out".to_owned())?
}

/// Joins a topic the policy does not cover: Ok only if the server refuses as unauthorized.
async fn refused(
    mut ws: Ws,
    topic: String,
    connect_token: String,
    options: JoinOptions,
    mut go: watch::Receiver<bool>,
) -> Result<(), String> {
    if !started(&mut go).await {
        return Err("abandoned".into());
    }
    let result = join(&mut ws, "1", &topic, &connect_token, &options).await;
    common::close(ws).await;
    match result {
        Err(e) if e.contains("Unauthorized") => Ok(()),
        Err(e) => Err(format!("{topic} (not covered by the policy): {e}")),
        Ok(()) => Err(format!(
            "{topic} is not covered by the policy, yet the join succeeded"
        )),
    }
}
