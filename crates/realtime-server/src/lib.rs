//! The network side of pg_realtime: a Supabase-Realtime-compatible WebSocket/HTTP server running
//! on its own tokio threads. It never touches Postgres; the worker's main thread talks to it
//! through [`Server`]: [`Server::publish`] for committed database messages, [`Server::wake_fd`] +
//! [`Server::poll_events`] for what the network side needs from Postgres (authorization, fatal
//! errors), and [`Server::complete_authorization`] to answer.

mod authz;
mod broadcast;
mod broker;
pub mod bus;
mod channel;
mod config;
mod connection;
mod error;
mod events;
mod http;
mod inspector;
pub mod jwt;
mod metrics;
pub mod offset;
mod outbound;
mod persist;
mod presence;
mod presence_diffs;
pub mod protocol;
mod refusal;
mod registry;
mod rest;
mod signals;
mod topic;
mod usage;
mod wake;
mod websocket;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};

pub use config::{Config, NodeConfig};
pub use error::ServerError;
pub use events::{
    Authorization, AuthorizationPurpose, AuthorizationRequest, Event, PersistRequest,
    PresenceChange, Replay, ReplayFrom, ReplayGap, ReplayParams, Replayed,
};
pub use jwt::Claims;
pub use metrics::WorkerStats;
pub use protocol::Payload;
pub use refusal::write_denied;
pub use refusal::{PersistError, Refusal};
pub use registry::TopicWatcher;
pub use topic::MAX_STORED_TOPIC_BYTES;
pub use usage::{ChannelInfo, ConnectionInfo, DisconnectTarget, Usage};

use broadcast::{Body, Outgoing, stored_meta};
use broker::Broker;
use broker::replicated::ReplicatedBroker;
use events::EventQueue;
use jwt::JwtVerifier;
use topic::TopicKey;

/// Client strings can be megabytes long; logs get at most this many bytes of one.
const LOG_EXCERPT_BYTES: usize = 120;

/// `s`, or its first [`LOG_EXCERPT_BYTES`] with a note of the full length, for log lines.
pub(crate) fn log_excerpt(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= LOG_EXCERPT_BYTES {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = LOG_EXCERPT_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}... ({} bytes)", &s[..end], s.len()))
}

#[cfg(test)]
mod tests {
    use super::log_excerpt;

    #[test]
    fn the_publish_budget_bounds_messages_and_bytes() {
        let b = super::PublishBudget::default();
        assert!(
            b.admit(100, 3, 150),
            "one large message fits an empty queue"
        );
        assert!(!b.admit(60, 3, 150));
        assert!(b.admit(50, 3, 150));
        assert!(b.admit(0, 3, 150));
        assert!(!b.admit(0, 3, 150), "three messages at most");
        b.release(100);
        assert!(b.admit(90, 3, 150) && !b.admit(1, 3, 150));
    }

    #[test]
    fn log_excerpts_are_short_and_cut_at_char_boundaries() {
        assert_eq!(log_excerpt("short"), "short");
        let long = "é".repeat(1_000_000);
        let e = log_excerpt(&long);
        assert!(e.len() < 200, "{}", e.len());
        assert!(e.ends_with("... (2000000 bytes)"));
    }
}

/// A committed database message (`realtime.send`, `realtime.broadcast_changes`, ...).
#[derive(Clone, Debug)]
pub struct DbBroadcast {
    /// Sub-topic, without the `realtime:` prefix.
    pub topic: String,
    pub event: String,
    pub private: bool,
    /// `realtime.messages.id` (uuid text); subscribers get it as `meta.id`.
    pub id: String,
    pub payload: Payload,
    /// Its place in the commit order; subscribers get it as `meta.offset`.
    pub offset: Option<offset::Offset>,
}

/// State shared by every task of the server.
pub(crate) struct Inner {
    config: RwLock<Arc<Config>>,
    jwt: RwLock<Arc<JwtVerifier>>,
    /// Every message and presence change goes through it; see `broker.rs`.
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) events: Arc<EventQueue>,
    pub(crate) authz: authz::Authorizer,
    pub(crate) persister: persist::Persister,
    pub(crate) active_connections: AtomicUsize,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Fixed at start: the WebSocket limits are set per upgrade but the REST body limit is
    /// part of the router.
    pub(crate) max_frame_bytes: usize,
    /// Connections the open-file limit allows; past it, connects get the same 429 as past
    /// `max_connections` instead of hanging in the listen backlog.
    pub(crate) socket_cap: usize,
    /// KiB of REST bodies being read and answered; see [`rest::REST_BODY_BUDGET`].
    pub(crate) rest_budget: tokio::sync::Semaphore,
    /// Every live connection's counters, for [`Server::usage`].
    pub(crate) conns: usage::ConnTable,
    /// What `GET /metrics` reports besides usage; see `metrics.rs`.
    pub(crate) metrics: metrics::Metrics,
    /// Committed database messages between [`Server::publish`] and the dispatch task.
    publish_budget: Arc<PublishBudget>,
    /// The worker's last [`Server::set_worker_stats`].
    worker_stats: std::sync::Mutex<Option<WorkerStats>>,
}

impl Inner {
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn jwt(&self) -> Arc<JwtVerifier> {
        self.jwt.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// See [`Server::usage`].
    pub(crate) fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        self.broker.usage(&mut usage);
        let (queued, held) = self.conns.sum();
        usage.connections = self.active_connections.load(Ordering::Acquire) as u64;
        usage.queued_bytes = queued;
        usage.held_write_bytes = held;
        usage.pending_authorizations = self.authz.pending_count() as u64;
        usage.queued_events = self.events.len() as u64;
        usage.publish_queue_bytes = self.publish_budget.bytes.load(Ordering::Acquire) as u64;
        usage.rest_body_bytes = rest::body_budget_used(&self.rest_budget) as u64;
        usage
    }

    /// The `GET /metrics` text.
    pub(crate) fn render_metrics(&self) -> String {
        let traffic = self.conns.traffic();
        self.metrics.render(&metrics::Snapshot {
            usage: self.usage(),
            client_messages: traffic.messages_in,
            frames_out: traffic.frames_out,
            bytes_out: traffic.bytes_out,
            dropped_database_messages: self.publish_budget.dropped.load(Ordering::Relaxed),
            worker: *self.worker_stats.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

/// How long a standby waits for its link to the primary before it serves anyway.
const BUS_WAIT: Duration = Duration::from_secs(10);

/// How long [`Server::publish`] waits for room in a full publish queue before it drops.
const PUBLISH_WAIT: Duration = Duration::from_millis(100);

/// What waits between [`Server::publish`] and the dispatch task, in messages and payload
/// bytes. Only the worker's main thread adds, only the dispatch task removes.
#[derive(Default)]
struct PublishBudget {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// The queue stayed full for [`PUBLISH_WAIT`]: drop without waiting until it has room.
    shedding: std::sync::atomic::AtomicBool,
    dropped: std::sync::atomic::AtomicU64,
}

impl PublishBudget {
    /// Takes room for a message of `size` bytes if there is any. A message larger than the
    /// byte bound still goes into an empty queue.
    fn admit(&self, size: usize, max_messages: usize, max_bytes: usize) -> bool {
        let bytes = self.bytes.load(Ordering::Acquire);
        if self.messages.load(Ordering::Acquire) >= max_messages.max(1)
            || (bytes > 0 && bytes.saturating_add(size) > max_bytes)
        {
            return false;
        }
        self.messages.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(size, Ordering::AcqRel);
        true
    }

    fn release(&self, size: usize) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(size, Ordering::AcqRel);
    }
}

pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    shutdown_tx: watch::Sender<bool>,
    publish_tx: mpsc::UnboundedSender<DbBroadcast>,
    publish_budget: Arc<PublishBudget>,
    local_addrs: Vec<SocketAddr>,
    /// The broker again, as what it is: the bus side is driven from here.
    bus: Arc<ReplicatedBroker>,
    /// On a standby: checks forwarded to the primary over the link.
    forward_tx: Option<mpsc::Sender<bus::link::Forwarded>>,
    /// The in-process broker under the replicated one: it holds every node's presence.
    memory: Arc<broker::memory::MemoryBroker>,
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            // `::` must not also claim the IPv4 port, which `0.0.0.0` binds separately.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a live socket with a pointer to a c_int of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    std::ptr::from_ref::<libc::c_int>(&one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Every socket is a file: raise the soft open-file limit to the hard one, since servers are
/// often started with a soft limit of 1024 (PAM sessions do that), which would cap the
/// connections far below `max_connections`. Only this process is affected.
/// Returns the soft limit now in force.
fn raise_open_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return u64::MAX;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return limit.rlim_max;
            }
            log::warn!(
                "realtime: cannot raise the open-file limit from {}: {}",
                limit.rlim_cur,
                std::io::Error::last_os_error()
            );
        }
        limit.rlim_cur
    }
}

/// Files the worker needs besides client sockets: listeners, the event fd, the runtime's, and
/// PostgreSQL's own. The worker only touches a few relations, and PostgreSQL's file cache closes
/// files and retries when it runs out, so a small reserve is enough.
const RESERVED_FILES: u64 = 256;

impl Server {
    /// Binds all listeners synchronously (so bind errors are returned here), then serves on the
    /// runtime's own threads, all of which block every signal.
    pub fn start(config: Config) -> Result<Server, ServerError> {
        Server::start_watched(config, None)
    }

    /// [`Server::start`], telling `watcher` which topics have subscribers from the first one on.
    pub fn start_watched(
        config: Config,
        watcher: Option<Arc<dyn TopicWatcher>>,
    ) -> Result<Server, ServerError> {
        let targets = config::listen_targets(&config.listen_addresses, config.port)?;
        if targets.is_empty() {
            return Err(ServerError::NoListenAddress);
        }
        let wake = wake::WakeFd::new().map_err(ServerError::WakeFd)?;
        let open_files = raise_open_file_limit();
        let runtime = {
            // Threads inherit the creating thread's mask, so block first: no runtime thread
            // ever runs with signals unblocked, not even before on_thread_start.
            let _blocked = signals::BlockedSignals::new();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads.max(1))
                .thread_name("pg_realtime net")
                .on_thread_start(signals::block_all_signals)
                .enable_all()
                .build()
                .map_err(ServerError::Runtime)?
        };
        let mut listeners = Vec::new();
        {
            let _enter = runtime.enter();
            let mut chosen_port: Option<u16> = None;
            for t in &targets {
                let mut addr = t.addr;
                // With port 0, every address should share the port picked for the first one.
                if addr.port() == 0
                    && let Some(p) = chosen_port
                {
                    addr.set_port(p);
                }
                match bind(addr) {
                    Ok(l) => {
                        if chosen_port.is_none() {
                            chosen_port = l.local_addr().ok().map(|a| a.port());
                        }
                        listeners.push(l);
                    }
                    Err(e) if t.optional => {
                        log::info!("realtime: not listening on {addr}: {e}");
                    }
                    Err(source) => return Err(ServerError::Bind { addr, source }),
                }
            }
        }
        if listeners.is_empty() {
            return Err(ServerError::NoListenAddress);
        }
        let local_addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let publish_budget = Arc::new(PublishBudget::default());
        let max_frame_bytes = config.max_frame_bytes;
        let jwt = JwtVerifier::new(config.jwt_secret.as_deref(), config.jwt_jwks.as_deref());
        let events = Arc::new(EventQueue::new(wake));
        let memory = Arc::new(broker::memory::MemoryBroker::new(events.clone(), watcher));
        let node = config.node.clone();
        let standby = node.primary.clone();
        // A standby sends at once; a primary once its worker knows of a standby.
        let broker = Arc::new(ReplicatedBroker::new(
            memory.clone(),
            node,
            standby.is_some(),
            Some(events.clone()),
        ));
        let inner = Arc::new(Inner {
            config: RwLock::new(Arc::new(config)),
            jwt: RwLock::new(Arc::new(jwt)),
            broker: broker.clone(),
            events,
            authz: authz::Authorizer::default(),
            persister: persist::Persister::default(),
            active_connections: AtomicUsize::new(0),
            shutdown: shutdown_rx,
            max_frame_bytes,
            socket_cap: usize::try_from(open_files.saturating_sub(RESERVED_FILES))
                .unwrap_or(usize::MAX),
            rest_budget: rest::body_budget(),
            conns: usage::ConnTable::default(),
            metrics: metrics::Metrics::default(),
            publish_budget: publish_budget.clone(),
            worker_stats: std::sync::Mutex::new(None),
        });
        let app = http::router(inner.clone(), max_frame_bytes);
        // A standby serves once its link reached the primary (or after BUS_WAIT, when the
        // primary is away): before that the primary may not write the bus yet, and a client
        // that joined could miss what commits. Connections wait in the listen backlog.
        let (bus_ready_tx, bus_ready) = watch::channel(standby.is_none());
        for listener in listeners {
            let app = app.clone();
            let inner = inner.clone();
            let mut stop = inner.shutdown.clone();
            let mut bus_ready = bus_ready.clone();
            runtime.spawn(async move {
                let _ = tokio::time::timeout(BUS_WAIT, bus_ready.wait_for(|r| *r)).await;
                // Frames are small and already batched per flush: Nagle's algorithm would only
                // hold a reply back until the client's delayed ACK (~40 ms) whenever an earlier
                // write is unacknowledged, e.g. a join reply right after a leave reply.
                let listener = listener.tap_io(|stream| {
                    if let Err(e) = stream.set_nodelay(true) {
                        log::debug!("cannot set TCP_NODELAY: {e}");
                    }
                });
                let served = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
                if let Err(e) = served {
                    inner
                        .events
                        .push(Event::Fatal(format!("realtime listener failed: {e}")));
                }
            });
        }
        let (publish_tx, publish_rx) = mpsc::unbounded_channel();
        runtime.spawn(dispatch_db_messages(
            publish_rx,
            publish_budget.clone(),
            inner.clone(),
        ));
        runtime.spawn(memory.clone().flush_presence_diffs(inner.shutdown.clone()));
        runtime.spawn(broker.clone().keep_alive(inner.shutdown.clone()));
        let forward_tx = standby.map(|link| {
            let (tx, rx) = mpsc::channel(64);
            runtime.spawn(bus::link::run(
                link,
                broker.clone(),
                rx,
                bus_ready_tx,
                inner.shutdown.clone(),
            ));
            tx
        });
        Ok(Server {
            runtime: Some(runtime),
            inner,
            shutdown_tx,
            publish_tx,
            publish_budget,
            local_addrs,
            bus: broker,
            forward_tx,
            memory,
        })
    }

    /// Readable when [`Server::poll_events`] has something.
    pub fn wake_fd(&self) -> RawFd {
        self.inner.events.wake_fd()
    }

    /// Non-blocking: drains pending events and resets the wake fd. Authorization requests
    /// nobody waits for any more are left out.
    pub fn poll_events(&self) -> Vec<Event> {
        let mut events = self.inner.events.drain();
        events.retain(|e| match e {
            Event::Authorize(r) => self.inner.authz.is_pending(r.id),
            e => persist::still_wanted(&self.inner.persister, e),
        });
        events
    }

    /// Whether an [`Event::Authorize`] is still waited for; the worker skips those that are
    /// not (the join was left, the connection closed, the wait timed out).
    pub fn authorization_pending(&self, id: u64) -> bool {
        self.inner.authz.is_pending(id)
    }

    /// Hands a committed database message to the network side, which fans it out to the
    /// subscribers of (private, topic). Returns false if it was dropped.
    ///
    /// The queue in between is bounded (`publish_queue_messages`, `publish_queue_bytes`). The
    /// network side never waits on a client, so it only fills when the network threads cannot
    /// keep up at all. Then this waits up to 100 ms for room and, failing that, drops the
    /// message (with a warning and [`Server::dropped_messages`]), and keeps dropping without
    /// waiting until there is room again: the caller is the worker's main thread, which must
    /// go on draining the commit queue, or every sending transaction would fail.
    pub fn publish(&self, msg: DbBroadcast) -> bool {
        let cfg = self.inner.config();
        let (max_messages, max_bytes) = (cfg.publish_queue_messages, cfg.publish_queue_bytes);
        let size = msg.payload.len();
        let budget = &self.publish_budget;
        if !budget.admit(size, max_messages, max_bytes) {
            let deadline = std::time::Instant::now() + PUBLISH_WAIT;
            let mut admitted = false;
            while !budget.shedding.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                if budget.admit(size, max_messages, max_bytes) {
                    admitted = true;
                    break;
                }
            }
            if !admitted {
                if !budget.shedding.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "realtime: the network side is not keeping up with database messages; \
                         dropping them until it does"
                    );
                }
                budget.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        budget.shedding.store(false, Ordering::Relaxed);
        if self.publish_tx.send(msg).is_err() {
            budget.release(size);
            log::warn!("realtime server is stopped; database message dropped");
            return false;
        }
        true
    }

    /// Database messages [`Server::publish`] dropped because the network side fell behind.
    pub fn dropped_messages(&self) -> u64 {
        self.publish_budget.dropped.load(Ordering::Relaxed)
    }

    /// Applies reloadable settings: JWT secret/JWKS, limits, delays, private_only,
    /// authorization. Addresses, port, frame size and threads need a restart.
    pub fn reload(&self, config: Config) {
        let jwt = JwtVerifier::new(config.jwt_secret.as_deref(), config.jwt_jwks.as_deref());
        *self.inner.jwt.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(jwt);
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// Answers an [`Event::Authorize`]. `Err` says why the join is refused (its text is the
    /// join reply's reason, e.g. `Refusal::Policy(e)` → `"Unauthorized: <e>"`). Returns false
    /// if nobody waits any more (timed out, connection gone).
    /// `replay` holds the stored messages for a join that asked for Broadcast Replay, oldest
    /// first; they are sent after the join reply with `meta.replayed`.
    ///
    /// Call it on the thread that publishes, before publishing anything committed after the
    /// replay's snapshot: a replaying join that may read is subscribed here, before its
    /// connection has even seen the answer, and what is published from now on waits for it
    /// (in a queue of its own) behind the replayed messages. Nothing else waits for that
    /// connection.
    pub fn complete_authorization(
        &self,
        id: u64,
        result: Result<Authorization, Refusal>,
        replay: Replay,
    ) -> bool {
        let inner = &self.inner;
        inner
            .authz
            .complete(id, result.map(|a| (a, replay)), |pre, a, replay| {
                let replayed = registry::replayed_ids(&replay.messages);
                let reads = registry::Reads::of(a);
                // Messages wait in a queue of their own, bounded like the connection's, until
                // the connection takes the subscription over.
                let (staging, staged) =
                    outbound::ConnHandle::new(pre.queue_frames, pre.queue_bytes);
                let sub = inner.broker.subscribe(
                    pre.key.clone(),
                    broker::Subscriber {
                        vsn: pre.vsn,
                        expires: pre.expires.clone(),
                        conn: Arc::new(staging),
                        reads,
                        replayed,
                    },
                );
                registry::PendingSubscription::new(inner.clone(), pre.key.clone(), sub, staged)
            })
    }

    /// Answers a [`Event::Persist`] request after its row committed (`Ok` with the row's id) or
    /// with why it was not stored; returns false when nobody waits any more. Call it before
    /// [`Server::publish`]es that row, so that its sender is left out as `broadcast.self` asks.
    pub fn complete_persist(&self, id: u64, result: Result<String, PersistError>) -> bool {
        self.inner.persister.complete(id, result)
    }

    /// Whether somebody still waits for persist request `id` (the worker skips the others).
    pub fn persist_pending(&self, id: u64) -> bool {
        self.inner.persister.is_pending(id)
    }

    /// Sets the members tracked from SQL (`realtime.track`) on one topic to exactly `members`
    /// (key, meta as a JSON object), telling the topic's subscribers what changed.
    pub fn sync_sql_presence(&self, topic: &str, private: bool, members: Vec<(String, String)>) {
        let members = members
            .into_iter()
            .map(|(key, meta)| {
                let meta = match serde_json::from_str::<serde_json::Value>(&meta) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                (key, presence::stored_meta(meta))
            })
            .collect();
        let key = TopicKey {
            private,
            subtopic: topic.to_string(),
        };
        self.inner.broker.sync_sql_presence(&key, members);
    }

    /// What the server holds now: connections, channels, queued bytes, waiting authorizations,
    /// presence, held writes, queued database messages. Sums counters the connections, the
    /// broker and the queues keep anyway (walking the connections and topics once, nothing on
    /// the fan-out path), so calling it once a second is cheap even with many thousands of
    /// sockets.
    pub fn usage(&self) -> Usage {
        self.inner.usage()
    }

    /// What the worker knows for `/metrics` (commit queue, its counters, its memory); the
    /// worker calls it about once a second.
    pub fn set_worker_stats(&self, stats: WorkerStats) {
        *self
            .inner
            .worker_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Every open connection of this node: who it is, what it joined, what it sent and
    /// received. Walks the connection table once; nothing is counted for it on the fan-out path.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.inner.conns.snapshot()
    }

    /// Every topic this node's connections joined or that holds presence: its subscribers
    /// here and its presence keys (of every node, and from SQL), by topic.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut topics: std::collections::BTreeMap<(String, bool), ChannelInfo> = self
            .inner
            .conns
            .channel_counts()
            .into_iter()
            .map(|((topic, private), subscribers)| {
                let info = ChannelInfo {
                    topic: topic.clone(),
                    private,
                    subscribers,
                    presence_keys: 0,
                };
                ((topic, private), info)
            })
            .collect();
        for (key, keys) in self.memory.presence_keys_by_topic() {
            topics
                .entry((key.subtopic.clone(), key.private))
                .or_insert_with(|| ChannelInfo {
                    topic: key.subtopic,
                    private: key.private,
                    subscribers: 0,
                    presence_keys: 0,
                })
                .presence_keys = keys as u64;
        }
        topics.into_values().collect()
    }

    /// Closes the connections `target` names: each of their channels gets a `system` message
    /// with `reason` and `phx_close`, then the socket is closed. Returns how many were asked
    /// to close (they close on their own threads a moment later).
    pub fn disconnect(&self, target: &DisconnectTarget, reason: &str) -> u64 {
        self.inner.conns.disconnect(target, reason)
    }

    /// This node's id on the bus.
    pub fn node_id(&self) -> u64 {
        self.bus.node()
    }

    /// On a primary: whether this node's frames go to the bus (there are standbys to read
    /// them from the WAL). Turning it on says hello and sends this node's members.
    pub fn set_relaying(&self, on: bool) {
        self.bus.set_relaying(on);
    }

    /// On a primary: this node's frames waiting for the bus, as one encoded envelope of up to
    /// about `max_bytes`, for the main thread to write into the WAL.
    pub fn take_bus_envelope(&self, max_bytes: usize) -> Option<Vec<u8>> {
        self.bus.take_envelope(max_bytes).map(|e| e.encode())
    }

    /// Applies an envelope from the bus (another node's broadcasts, presence and, on a
    /// standby, the primary's database messages, in order). Returns the (topic, private)
    /// whose SQL presence changed and must be re-read.
    pub fn apply_envelope(&self, envelope: bus::Envelope) -> Vec<(String, bool)> {
        self.bus.apply(envelope, |m| {
            self.publish(m);
        })
    }

    /// Other nodes heard from within the lease: (name, their presence members here).
    pub fn peers(&self) -> Vec<(String, usize)> {
        self.bus.peers()
    }

    /// On a standby: runs the checks of `requests` on the primary and waits up to `timeout`
    /// for the answers, in order. A primary that cannot be reached refuses them all.
    pub fn forward_authorizations(
        &self,
        requests: &[AuthorizationRequest],
        timeout: Duration,
    ) -> Vec<Result<Authorization, Refusal>> {
        let refuse_all = |why: String| {
            requests
                .iter()
                .map(|_| Err(Refusal::Policy(why.clone())))
                .collect()
        };
        let Some(tx) = &self.forward_tx else {
            return refuse_all("this node has no link to a primary".into());
        };
        let (answer, rx) = tokio::sync::oneshot::channel();
        let forwarded = bus::link::Forwarded {
            requests: bus::link::encode_requests(requests),
            answer,
        };
        if tx.try_send(forwarded).is_err() {
            return refuse_all("the link to the primary is busy".into());
        }
        let Some(runtime) = &self.runtime else {
            return refuse_all("the server is stopped".into());
        };
        let waited = runtime.block_on(async { tokio::time::timeout(timeout, rx).await });
        match waited {
            Ok(Ok(Ok(text))) => bus::link::decode_answers(&text, requests.len()),
            Ok(Ok(Err(why))) => refuse_all(why),
            Ok(Err(_)) => refuse_all("the link to the primary closed".into()),
            Err(_) => refuse_all("the primary did not answer in time".into()),
        }
    }

    /// Number of open WebSocket connections (including upgrades in progress).
    pub fn connection_count(&self) -> usize {
        self.inner.active_connections.load(Ordering::Acquire)
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// Stops accepting, closes every socket with 1001 "server shutting down", waits up to
    /// `grace` for them, then stops the runtime and joins its threads. Call it from a plain
    /// thread (the worker's main thread), not from inside an async task.
    pub fn shutdown(mut self, grace: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let _ = self.shutdown_tx.send(true);
        let deadline = std::time::Instant::now() + grace;
        let inner = self.inner.clone();
        runtime.block_on(async move {
            while inner.active_connections.load(Ordering::Acquire) > 0
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        runtime.shutdown_timeout(left.max(Duration::from_millis(100)));
    }
}

impl Drop for Server {
    /// Without an explicit shutdown nothing is waited for: drop may run anywhere, even inside
    /// an async context where blocking on the runtime would panic.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let _ = self.shutdown_tx.send(true);
            runtime.shutdown_background();
        }
    }
}

async fn dispatch_db_messages(
    mut rx: mpsc::UnboundedReceiver<DbBroadcast>,
    budget: Arc<PublishBudget>,
    inner: Arc<Inner>,
) {
    while let Some(msg) = rx.recv().await {
        budget.release(msg.payload.len());
        if msg.payload.len() > inner.config().max_payload_bytes {
            log::warn!(
                "realtime: database message {} on {} exceeds the payload limit; not delivered",
                msg.id,
                msg.topic
            );
            continue;
        }
        // A stored client broadcast is not sent back to its sender without `broadcast.self`.
        let exclude = inner.persister.take_exclude(&msg.id);
        let key = TopicKey {
            private: msg.private,
            subtopic: msg.topic,
        };
        let out = Outgoing::new(
            key.full_topic(),
            Body::User {
                event: msg.event,
                payload: msg.payload,
                meta: Some(stored_meta(&msg.id, msg.offset)),
            },
        )
        .with_origin_id(msg.id);
        inner.broker.deliver(&key, &out, exclude);
        inner.metrics.messages_in(metrics::Source::Database, 1);
    }
}
