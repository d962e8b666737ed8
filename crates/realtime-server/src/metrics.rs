//! Prometheus metrics for `GET /metrics`, in the text format of the `prometheus` crate.
//!
//! Nothing here is touched per delivered frame. Counters of rare events (joins, slow
//! consumers, REST and database messages, replayed messages) are shared atomics bumped where
//! the event happens, once per message and never per subscriber. What happens per delivery
//! (frames and bytes written to sockets) and per client message is counted by each connection
//! in counters it owns, which a scrape sums (see `usage.rs`); gauges are read from
//! [`crate::Usage`], which sums counters that exist anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, TextEncoder};

use crate::Usage;
use crate::refusal::Refusal;

/// Where a message entered the server, the `source` label of `realtime_messages_in_total`
/// (besides `client`: client broadcasts, which their connections count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The REST broadcast endpoints.
    Rest,
    /// Committed database messages (`realtime.send`, `broadcast_changes`, INSERT).
    Database,
    /// Stored messages sent to a joining channel by Broadcast Replay.
    Replay,
}

/// Seconds an authorization check waits for its answer: bucket bounds from half a millisecond
/// (a check answered in the same worker wake-up) to the default timeout of 10 s.
const AUTHORIZATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The server's own counters; see the module comment for which are shared and why.
pub(crate) struct Metrics {
    joins_ok: AtomicU64,
    /// One per [`Refusal::KINDS`] entry, in that order.
    joins_refused: [AtomicU64; Refusal::KINDS.len()],
    messages_rest: AtomicU64,
    messages_database: AtomicU64,
    messages_replay: AtomicU64,
    slow_consumers: AtomicU64,
    authorization: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let opts = HistogramOpts::new(
            "realtime_authorization_seconds",
            "Time a private-channel check (join, token refresh, first write, REST send) waited \
             for the database's answer.",
        )
        .buckets(AUTHORIZATION_BUCKETS.to_vec());
        Metrics {
            joins_ok: AtomicU64::new(0),
            joins_refused: std::array::from_fn(|_| AtomicU64::new(0)),
            messages_rest: AtomicU64::new(0),
            messages_database: AtomicU64::new(0),
            messages_replay: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            // Only fails for invalid names or bucket bounds, which are constants here.
            authorization: Histogram::with_opts(opts).expect("valid histogram options"),
        }
    }
}

/// What the worker's main thread knows and the server does not (the commit queue in shared
/// memory, the extension's counters, the process's memory), handed over about once a second
/// with [`crate::Server::set_worker_stats`] for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Bytes in use in the shared-memory commit queue, and its size.
    pub commit_queue_used_bytes: u64,
    pub commit_queue_size_bytes: u64,
    /// Messages committing transactions put into the commit queue.
    pub committed_messages: u64,
    /// Messages skipped because their transaction aborted.
    pub discarded_messages: u64,
    /// `realtime.send` calls that could not store their message.
    pub failed_sends: u64,
    /// Message-only transactions that committed without waiting for the disk.
    pub async_commits: u64,
    /// Commits that did not wake the worker (their topics had no subscriber on this node).
    pub unwatched_commits: u64,
    /// The worker's private memory; None when the kernel does not say.
    pub worker_memory_bytes: Option<u64>,
}

/// Values the server computes per scrape, beside [`Metrics`]' own counters.
pub(crate) struct Snapshot {
    pub usage: Usage,
    /// Client broadcasts received, summed over the connections.
    pub client_messages: u64,
    /// Frames and bytes written to sockets, summed over the connections.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Database messages dropped because the network side fell behind.
    pub dropped_database_messages: u64,
    /// None until the worker's first report.
    pub worker: Option<WorkerStats>,
}

impl Metrics {
    pub(crate) fn join_ok(&self) {
        self.joins_ok.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn join_refused(&self, refusal: &Refusal) {
        self.joins_refused[refusal.kind_index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `n` messages came in from `source`.
    pub(crate) fn messages_in(&self, source: Source, n: u64) {
        let counter = match source {
            Source::Rest => &self.messages_rest,
            Source::Database => &self.messages_database,
            Source::Replay => &self.messages_replay,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn authorization_waited(&self, waited: Duration) {
        self.authorization.observe(waited.as_secs_f64());
    }

    /// The scrape: every family, in the Prometheus text format.
    pub(crate) fn render(&self, s: &Snapshot) -> String {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let u = &s.usage;
        let mut joins = vec![(
            vec![("result", "ok"), ("reason", "none")],
            load(&self.joins_ok),
        )];
        for (kind, count) in Refusal::KINDS.iter().zip(&self.joins_refused) {
            joins.push((vec![("result", "refused"), ("reason", kind)], load(count)));
        }
        let mut families = vec![
            counter(
                "realtime_joins_total",
                "Channel joins answered, by result and, for refusals, the kind of refusal.",
                joins,
            ),
            counter(
                "realtime_messages_in_total",
                "Broadcast messages received, by where they came from.",
                vec![
                    (vec![("source", "client")], s.client_messages as f64),
                    (vec![("source", "rest")], load(&self.messages_rest)),
                    (vec![("source", "database")], load(&self.messages_database)),
                    (vec![("source", "replay")], load(&self.messages_replay)),
                ],
            ),
            counter(
                "realtime_messages_out_total",
                "Frames written to WebSocket clients: broadcasts, presence, replies.",
                vec![(vec![], s.frames_out as f64)],
            ),
            counter(
                "realtime_bytes_out_total",
                "Bytes of the frames written to WebSocket clients (payloads, before framing).",
                vec![(vec![], s.bytes_out as f64)],
            ),
            counter(
                "realtime_slow_consumers_total",
                "Connections closed because their outbound queue was full.",
                vec![(vec![], load(&self.slow_consumers))],
            ),
            counter(
                "realtime_database_messages_dropped_total",
                "Committed database messages dropped because the network threads fell behind.",
                vec![(vec![], s.dropped_database_messages as f64)],
            ),
            counter(
                "realtime_worker_cpu_seconds_total",
                "CPU time (user and system) of the worker process, network threads included.",
                vec![(vec![], process_cpu_seconds())],
            ),
        ];
        let gauges: [(&str, &str, u64); 12] = [
            (
                "realtime_connections",
                "Open WebSocket connections.",
                u.connections,
            ),
            (
                "realtime_channels",
                "Joined channels over all connections.",
                u.channels,
            ),
            (
                "realtime_topics",
                "Topics with at least one joined channel.",
                u.topics,
            ),
            (
                "realtime_presence_members",
                "Presence keys over all topics (tracked by sockets and from SQL).",
                u.presence_keys,
            ),
            (
                "realtime_presence_bytes",
                "Bytes of presence keys and metas over all topics.",
                u.presence_bytes,
            ),
            (
                "realtime_socket_queued_bytes",
                "Bytes waiting in the connections' outbound queues.",
                u.queued_bytes,
            ),
            (
                "realtime_publish_queue_bytes",
                "Payload bytes of committed database messages waiting for the network threads.",
                u.publish_queue_bytes,
            ),
            (
                "realtime_pending_authorizations",
                "Private-channel checks waiting for the database.",
                u.pending_authorizations,
            ),
            (
                "realtime_queued_events",
                "Events queued for the worker's main thread and not taken yet.",
                u.queued_events,
            ),
            (
                "realtime_held_write_bytes",
                "Bytes of client messages held while their channel's write check runs.",
                u.held_write_bytes,
            ),
            (
                "realtime_rest_body_bytes",
                "Bytes of REST request bodies being read and answered.",
                u.rest_body_bytes,
            ),
            (
                "realtime_bus_queued_bytes",
                "Bytes of this node's frames waiting for the bus to other nodes.",
                u.bus_queued_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            families.push(gauge(name, help, value as f64));
        }
        if let Some(w) = s.worker {
            families.extend([
                gauge(
                    "realtime_commit_queue_bytes",
                    "Bytes in use in the shared-memory queue of committed messages.",
                    w.commit_queue_used_bytes as f64,
                ),
                gauge(
                    "realtime_commit_queue_size_bytes",
                    "Size of the shared-memory queue of committed messages (realtime.queue_size).",
                    w.commit_queue_size_bytes as f64,
                ),
                counter(
                    "realtime_committed_messages_total",
                    "Messages committing transactions queued for delivery.",
                    vec![(vec![], w.committed_messages as f64)],
                ),
                counter(
                    "realtime_discarded_messages_total",
                    "Messages skipped because their transaction aborted.",
                    vec![(vec![], w.discarded_messages as f64)],
                ),
                counter(
                    "realtime_send_failures_total",
                    "realtime.send calls that could not store their message.",
                    vec![(vec![], w.failed_sends as f64)],
                ),
                counter(
                    "realtime_async_commits_total",
                    "Message-only transactions committed without waiting for the disk \
                     (realtime.send_synchronous_commit = off).",
                    vec![(vec![], w.async_commits as f64)],
                ),
                counter(
                    "realtime_unwatched_commits_total",
                    "Commits that did not wake the worker because no socket on this node had \
                     joined their topics (the worker took them on its next look).",
                    vec![(vec![], w.unwatched_commits as f64)],
                ),
            ]);
            if let Some(bytes) = w.worker_memory_bytes {
                families.push(gauge(
                    "realtime_worker_memory_bytes",
                    "Private memory of the worker process (heap and thread stacks).",
                    bytes as f64,
                ));
            }
        }
        families.extend(self.authorization.collect());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding into a Vec only fails for families the encoder cannot represent, which these
        // are not; a failed scrape then shows what was written before the error.
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::warn!("realtime: cannot encode the metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

type Labels<'a> = Vec<(&'a str, &'a str)>;

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labelled(labels: Labels<'_>) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .into_iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect(),
    );
    m
}

fn counter(name: &str, help: &str, series: Vec<(Labels<'_>, f64)>) -> MetricFamily {
    let metrics = series
        .into_iter()
        .map(|(labels, value)| {
            let mut c = Counter::default();
            c.set_value(value);
            let mut m = labelled(labels);
            m.set_counter(c);
            m
        })
        .collect();
    family(name, help, MetricType::COUNTER, metrics)
}

fn gauge(name: &str, help: &str, value: f64) -> MetricFamily {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::default();
    m.set_gauge(g);
    family(name, help, MetricType::GAUGE, vec![m])
}

/// User and system CPU seconds of this process (every thread), from getrusage.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given and nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Whether the request's `Authorization` header carries `token` as a bearer token. Compared
/// in time independent of where the first difference is, so a client cannot find the token a
/// byte at a time.
pub(crate) fn bearer_matches(header: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    let want = token.as_bytes();
    if given.len() != want.len() {
        return false;
    }
    given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            usage: Usage {
                connections: 3,
                channels: 5,
                ..Usage::default()
            },
            client_messages: 7,
            frames_out: 11,
            bytes_out: 1234,
            dropped_database_messages: 0,
            worker: Some(WorkerStats {
                commit_queue_size_bytes: 1024,
                async_commits: 2,
                unwatched_commits: 3,
                worker_memory_bytes: None,
                ..WorkerStats::default()
            }),
        }
    }

    #[test]
    fn the_scrape_has_every_family_with_labels_and_types() {
        let m = Metrics::default();
        m.join_ok();
        m.join_refused(&Refusal::TooManyJoins);
        m.join_refused(&Refusal::Policy("boom".into()));
        m.messages_in(Source::Rest, 2);
        m.messages_in(Source::Database, 4);
        m.authorization_waited(Duration::from_millis(3));
        let text = m.render(&snapshot());
        for line in [
            "# TYPE realtime_joins_total counter",
            "realtime_joins_total{result=\"ok\",reason=\"none\"} 1",
            "realtime_joins_total{result=\"refused\",reason=\"too_many_joins\"} 1",
            "realtime_joins_total{result=\"refused\",reason=\"policy\"} 1",
            "realtime_joins_total{result=\"refused\",reason=\"token\"} 0",
            "realtime_messages_in_total{source=\"client\"} 7",
            "realtime_messages_in_total{source=\"rest\"} 2",
            "realtime_messages_in_total{source=\"database\"} 4",
            "realtime_messages_in_total{source=\"replay\"} 0",
            "realtime_messages_out_total 11",
            "realtime_bytes_out_total 1234",
            "# TYPE realtime_connections gauge",
            "realtime_connections 3",
            "realtime_channels 5",
            "# TYPE realtime_authorization_seconds histogram",
            "realtime_authorization_seconds_bucket{le=\"0.005\"} 1",
            "realtime_authorization_seconds_count 1",
            "# TYPE realtime_worker_cpu_seconds_total counter",
            "realtime_commit_queue_size_bytes 1024",
            "realtime_send_failures_total 0",
            "realtime_async_commits_total 2",
            "realtime_unwatched_commits_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // The policy's text never becomes a label: the set of series is fixed.
        assert!(!text.contains("boom"));
        assert!(
            !text.contains("realtime_worker_memory_bytes"),
            "unknown: left out"
        );
    }

    #[test]
    fn the_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds() > 0.0);
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(bearer_matches(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cres"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cret "), "s3cret"));
        assert!(!bearer_matches(Some(b"bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }
}
