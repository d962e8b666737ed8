//! `multinode`: one load against a primary and its hot standbys at once. Subscribers of every
//! topic are spread over the nodes (`--subs` per topic, dealt out in turn); the messages come
//! from client broadcasts on one node (`--send broadcast --pub-node K`, `--pubs` sockets) or
//! from `realtime.send` on the primary, one message per transaction (`--send database`,
//! `--pubs` connections). Each node's deliveries, delivered ratio and latency are reported
//! side by side — the publisher's own node is the same-node baseline of the run — with each
//! node's worker CPU per delivery, the CPU of the processes that carry the bus between nodes
//! (walsenders and link backends on the primary, walreceiver and startup on a standby), and
//! the primary's WAL bytes per message.
//!
//! `--urls` and `--pgs` list the nodes, primary first, comma-separated; without them the
//! scenario runs against `--url`/`--pg` alone.

use std::thread;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::args::Args;
use super::client::{self, Frames, Protocol, Role};
use super::common::{self, Common, Report};
use super::database::{self, SEND_SQL, Sent};
use super::fanout::{self, Published, sleep_until_us, topic_name};
use super::stats::{self, ProcSample, Recorder, histogram, latency_json, proc_delta_json, round2};

/// The processes of a node that carry the bus: on the primary the walsenders and the backends
/// serving the standbys' links (their relayed broadcasts, presence and checks), on a standby
/// the walreceiver and the startup process replaying the WAL.
const BUS_PIDS_SQL: &str = "SELECT pid FROM pg_stat_activity \
     WHERE backend_type IN ('walsender', 'walreceiver', 'startup') \
        OR application_name = 'pg_realtime node link'";
const WAL_POSITION_SQL: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8";

struct Node {
    name: String,
    protocol: Protocol,
    pg: Option<String>,
    worker: Option<i32>,
    bus: Vec<i32>,
    /// Subscribers of each topic on this node.
    subs: usize,
}

/// The readings of every node at one edge of the window.
struct Readings {
    workers: Vec<Option<ProcSample>>,
    bus: Vec<Option<ProcSample>>,
    generator: Option<ProcSample>,
}

fn read_nodes(nodes: &[Node]) -> Readings {
    let mut readings = Readings {
        workers: Vec::new(),
        bus: Vec::new(),
        generator: None,
    };
    for node in nodes {
        let (worker, me) = stats::sample_worker_and_self(node.worker);
        readings.workers.push(worker);
        readings.generator = readings.generator.or(me);
        readings
            .bus
            .push(sum(node.bus.iter().map(|&pid| stats::sample(pid))));
    }
    readings
}

/// Several processes read as one: memory and CPU time added up (`None` if none could be read).
fn sum(samples: impl IntoIterator<Item = Option<ProcSample>>) -> Option<ProcSample> {
    samples.into_iter().flatten().reduce(|a, b| ProcSample {
        rss_kib: a.rss_kib + b.rss_kib,
        cpu_ticks: a.cpu_ticks + b.cpu_ticks,
        at_us: a.at_us.max(b.at_us),
    })
}

fn list(args: &Args, key: &str) -> Option<Vec<String>> {
    args.opt(key).map(|v| {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

fn pids(conn_str: Option<String>, sql: &'static str) -> Vec<i32> {
    let Some(conn_str) = conn_str else {
        return Vec::new();
    };
    common::blocking(move || {
        let mut c = postgres::Client::connect(&conn_str, postgres::NoTls).ok()?;
        let rows = c.query(sql, &[]).ok()?;
        Some(rows.iter().map(|r| r.get(0)).collect())
    })
    .flatten()
    .unwrap_or_default()
}

/// The primary's WAL insert position in bytes, on a connection opened beforehand so that the
/// reading sits at the window's edge.
fn wal_position(client: Option<postgres::Client>) -> (Option<postgres::Client>, Option<f64>) {
    let Some(mut c) = client else {
        return (None, None);
    };
    common::blocking(move || {
        let at = c
            .query_one(WAL_POSITION_SQL, &[])
            .ok()
            .map(|r| r.get::<_, f64>(0));
        (Some(c), at)
    })
    .unwrap_or((None, None))
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let common = Common::from_args(args)?;
    let urls = list(args, "urls");
    let pgs = list(args, "pgs");
    let send = args.string("send", "broadcast");
    let pub_node: usize = args.get("pub-node", 0)?;
    let pubs: usize = args.get("pubs", 10)?;
    let topics: usize = args.get("topics", 10)?;
    let subs: usize = args.get("subs", 30)?;
    let rate: f64 = args.get("rate", 1_000.0)?;
    let size: usize = args.get("payload", 100)?;
    args.finish()?;

    let Protocol::Phoenix { base, token } = &common.protocol else {
        return Err("multinode speaks the Phoenix protocol only".into());
    };
    let urls = urls.unwrap_or_else(|| vec![base.clone()]);
    let pgs = match pgs {
        Some(p) => p.into_iter().map(Some).collect(),
        None => vec![common.pg.clone()],
    };
    if urls.len() != pgs.len() {
        return Err(format!(
            "--urls names {} nodes, --pgs {}",
            urls.len(),
            pgs.len()
        ));
    }
    if pubs == 0 || topics == 0 || rate <= 0.0 {
        return Err("--pubs, --topics and --rate must be positive".into());
    }
    let database = match send.as_str() {
        "broadcast" => false,
        "database" => true,
        other => return Err(format!("--send: broadcast or database, not {other:?}")),
    };
    // Database messages are sent on the primary, whose connection string comes first.
    let pub_node = if database { 0 } else { pub_node };
    if pub_node >= urls.len() {
        return Err(format!(
            "--pub-node {pub_node}: there are {} nodes",
            urls.len()
        ));
    }
    let primary_pg = pgs[0].clone();
    if database && primary_pg.is_none() {
        return Err("--send database needs the primary's connection string (--pgs or --pg)".into());
    }

    let count = urls.len();
    let mut nodes = Vec::with_capacity(count);
    for (i, (url, pg)) in urls.into_iter().zip(pgs).enumerate() {
        let mut watched = common.clone();
        watched.pg = pg.clone();
        nodes.push(Node {
            name: if i == 0 {
                "primary".to_owned()
            } else {
                format!("standby{i}")
            },
            protocol: Protocol::Phoenix {
                base: url,
                token: token.clone(),
            },
            worker: watched.watched_pid(),
            bus: pids(pg.clone(), BUS_PIDS_SQL),
            pg,
            subs: subs / count + usize::from(i < subs % count),
        });
    }

    // Subscribers node by node, then the publishers (sockets on their node, or connections).
    let mut setup = Recorder::default();
    let mut sockets = Vec::with_capacity(count);
    let mut first_index = 0;
    for node in &nodes {
        let specs: Vec<(String, Role)> = (0..topics)
            .flat_map(|t| (0..node.subs).map(move |_| (topic_name(t), Role::Subscriber)))
            .collect();
        sockets.push(
            common::connect_many(
                &node.protocol,
                &specs,
                first_index,
                common.source_addrs,
                common.connect_concurrency,
            )
            .await,
        );
        first_index += specs.len();
    }
    let pub_specs: Vec<(String, Role)> = if database {
        Vec::new()
    } else {
        (0..pubs)
            .map(|p| (topic_name(p % topics), Role::Publisher))
            .collect()
    };
    let pub_sockets = common::connect_many(
        &nodes[pub_node].protocol,
        &pub_specs,
        first_index,
        common.source_addrs,
        common.connect_concurrency,
    )
    .await;

    let window = common.window();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers: Vec<Vec<JoinHandle<Recorder>>> = Vec::with_capacity(count);
    for node_sockets in sockets {
        let mut mine = Vec::new();
        for socket in node_sockets {
            match socket {
                Ok(ws) => mine.push(tokio::spawn(common::receive(
                    ws,
                    window,
                    stop_rx.clone(),
                    true,
                ))),
                Err(e) => setup.error(e),
            }
        }
        receivers.push(mine);
    }

    let pad = client::padding(size);
    let mut publishers: Vec<JoinHandle<Published>> = Vec::new();
    for ((topic, _), socket) in pub_specs.iter().zip(pub_sockets) {
        match socket {
            Ok(ws) => publishers.push(tokio::spawn(fanout::publish(
                ws,
                nodes[pub_node].protocol.clone(),
                Frames::Text,
                fanout::Pushes::default(),
                topic.clone(),
                rate / pubs as f64,
                window,
                pad.clone(),
            ))),
            Err(e) => setup.error(e),
        }
    }
    let senders: Vec<thread::JoinHandle<Sent>> = if database {
        let conn_str = primary_pg.clone().unwrap_or_default();
        (0..pubs)
            .map(|i| {
                let (conn_str, pad) = (conn_str.clone(), pad.clone());
                let per_conn = rate / pubs as f64;
                thread::spawn(move || {
                    database::sender(
                        conn_str, SEND_SQL, 1, i, pubs, topics, per_conn, window, pad,
                    )
                })
            })
            .collect()
    } else {
        Vec::new()
    };

    let wal_client = common::blocking(move || {
        primary_pg.and_then(|c| postgres::Client::connect(&c, postgres::NoTls).ok())
    })
    .flatten();
    sleep_until_us(window.start_us).await;
    let before = read_nodes(&nodes);
    let (wal_client, wal0) = wal_position(wal_client);
    sleep_until_us(window.end_us).await;
    let after = read_nodes(&nodes);
    let (wal_client, wal1) = wal_position(wal_client);
    // The `postgres` client's drop, too, must not run inside tokio's runtime.
    common::blocking(move || drop(wal_client));

    let mut published = 0u64;
    let mut send_errors = Recorder::default();
    let mut statement = histogram();
    for p in publishers {
        let r = p.await.map_err(|e| e.to_string())?;
        published += r.in_window;
        send_errors.merge(r.errors);
    }
    let joined = tokio::task::block_in_place(|| {
        senders
            .into_iter()
            .map(|h| h.join().map_err(|_| "a sender thread panicked".to_owned()))
            .collect::<Result<Vec<Sent>, String>>()
    })?;
    for s in joined {
        published += s.in_window;
        let _ = statement.add(&s.statement);
        send_errors.merge(s.errors);
    }
    tokio::time::sleep(common.drain).await;
    let _ = stop_tx.send(true);
    let mut per_node = Vec::with_capacity(count);
    for mine in receivers {
        let mut received = Recorder::default();
        for r in mine {
            received.merge(r.await.map_err(|e| e.to_string())?);
        }
        per_node.push(received);
    }

    let secs = window.secs();
    let mut report = Report::new("multinode");
    report.add(
        "params",
        json!({"send": send, "publisher_node": nodes[pub_node].name,
               "pubs": pubs, "topics": topics, "subs_per_topic": subs,
               "subs_per_topic_per_node": nodes.iter().map(|n| n.subs).collect::<Vec<_>>(),
               "nodes": nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
               "rate": rate, "payload_bytes": size, "duration_s": secs}),
    );
    report.add("published_per_sec", round2(published as f64 / secs));
    if database {
        report.add("statement_latency", latency_json(&statement));
    }
    if let (Some(a), Some(b)) = (wal0, wal1)
        && published > 0
    {
        report.add(
            "primary_wal_bytes_per_message",
            round2((b - a) / published as f64),
        );
        report.add(
            "primary_wal_mib_per_sec",
            round2((b - a) / secs / 1_048_576.0),
        );
    }

    // Every node, then all of them together.
    let mut total = Recorder::default();
    let mut total_expected = 0;
    for (i, (node, received)) in nodes.iter().zip(per_node).enumerate() {
        let expected = published * node.subs as u64;
        let name = &node.name;
        report.add(
            &format!("{name}_deliveries_per_sec"),
            round2(received.in_window as f64 / secs),
        );
        report.add(
            &format!("{name}_delivered_ratio"),
            if expected > 0 {
                round2(received.in_window as f64 / expected as f64)
            } else {
                0.0
            },
        );
        report.add(&format!("{name}_expected"), expected);
        report.add(&format!("{name}_received"), received.in_window);
        report.add(&format!("{name}_latency"), latency_json(&received.latency));
        report.add(
            &format!("{name}_worker"),
            proc_delta_json(before.workers[i], after.workers[i]),
        );
        report.add(
            &format!("{name}_worker_cpu_us_per_delivery"),
            stats::cpu_us_per(before.workers[i], after.workers[i], received.in_window),
        );
        report.add(
            &format!("{name}_bus_processes"),
            proc_delta_json(before.bus[i], after.bus[i]),
        );
        report.add(
            &format!("{name}_bus_cpu_us_per_message"),
            stats::cpu_us_per(before.bus[i], after.bus[i], published),
        );
        if node.pg.is_none() || node.worker.is_none() {
            report.add(
                &format!("{name}_note"),
                "worker pid unknown: no CPU figures",
            );
        }
        total_expected += expected;
        total.merge(received);
    }
    report.add_deliveries(&total, total_expected, secs);
    // All workers together, only if every one of them could be read.
    let all = |r: &Readings| {
        r.workers
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|w| sum(w.into_iter().map(Some)))
    };
    report.add(
        "workers_cpu_us_per_delivery",
        stats::cpu_us_per(all(&before), all(&after), total.in_window),
    );
    report.add(
        "generator_process",
        proc_delta_json(before.generator, after.generator),
    );
    report.add_errors(&[&setup, &send_errors, &total]);
    Ok(report)
}
