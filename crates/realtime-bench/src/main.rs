//! `realtime-bench`: a load generator for pg_realtime (and, in plain mode, its peers).
//!
//! ```text
//! realtime-bench fanout      --jwt-secret S [--pubs 4 --topics 4 --subs 25 --rate 10000 --payload 100]
//!                            [--frames text|binary --private true --persist true --ack true
//!                            --pg CONN]  (private: signed-in users under policies the run installs)
//! realtime-bench database    --jwt-secret S --pg CONN [--conns 8 --topics 10 --subs 10 --rate 1000]
//! realtime-bench connections --jwt-secret S --pg CONN [--count 1000 --per-proc 5000 --topics 100]
//! realtime-bench presence    --jwt-secret S [--members 100 --per-proc 5000 --timeout 60]
//! realtime-bench presence-room --jwt-secret S [--pg CONN --members 1000 --batch 500 --pause 1
//!                            --samples 100 --gap 0.2 --per-proc 5000]
//! realtime-bench private-joins --jwt-secret S --pg CONN [--joins 2000 --concurrency 200]
//! realtime-bench memory      --jwt-secret S --pg CONN [--flood 12 --idle 30 --sample-ms 250
//!                            --pubs 10 --topics 10 --subs 100 --rate 12000]  (root: reads smaps)
//! realtime-bench multinode   --jwt-secret S --urls PRIMARY,STANDBY.. --pgs CONN,CONN..
//!                            [--send broadcast|database --pub-node 1 --pubs 10 --topics 10 --subs 30]
//! common: --url ws://127.0.0.1:4000/realtime/v1/websocket --warmup 2 --duration 10 --drain 2
//!         --json FILE --threads 2 --source-addrs 4 --pid PID
//!         --protocol plain --sub-url ws://host:port/{topic} [--pub-url ...]   (peers)
//! ```
//! Each scenario prints a table and, with `--json`, writes the same figures as JSON.
//! `realtime-bench ratio --ours A.json --peer B.json --key deliveries_per_sec` compares two.

mod args;
mod client;
mod common;
mod connections;
mod database;
mod fanout;
mod memory;
mod multinode;
mod presence;
mod presence_room;
mod private_joins;
mod ratio;
mod stats;

use args::Args;

const USAGE: &str = "usage: realtime-bench <fanout|database|connections|presence|presence-room|private-joins|memory|multinode|ratio> \
                     [--option value ...]\n\
                     (see the top of crates/realtime-bench/src/main.rs and BENCHMARKS.md)";

fn main() {
    if let Err(e) = run() {
        eprintln!("realtime-bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut words = std::env::args().skip(1);
    let scenario = words.next().ok_or(USAGE)?;
    let args = Args::parse(words)?;
    let threads: usize = args.get("threads", 2)?;
    // Read before the scenario checks for unknown options.
    let json = args.opt("json");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let report = match scenario.as_str() {
            "fanout" => fanout::run(&args).await?,
            "database" => database::run(&args).await?,
            "connections" => connections::run(&args).await?,
            "connections-child" => return connections::child(&args).await,
            "presence" => presence::run(&args).await?,
            "presence-child" => return presence::child(&args).await,
            "presence-room" => presence_room::run(&args).await?,
            "presence-room-child" => return presence_room::child(&args).await,
            "private-joins" => private_joins::run(&args).await?,
            "memory" => memory::run(&args).await?,
            "multinode" => multinode::run(&args).await?,
            "ratio" => return ratio::run(&args),
            _ => return Err(USAGE.to_owned()),
        };
        report.emit(json.as_deref())
    })
}
