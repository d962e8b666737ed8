//! Reading the commit queue: committed records are delivered in commit order once nothing can
//! commit before them any more, aborted ones are skipped, and an unfinished one holds back
//! whatever may still be overtaken by it.

use super::{authorization, logging, presence};
use crate::gucs;
use crate::queue::shmem;
use bytes::Bytes;
use commit_ring::{Message, PayloadKind, Pending};
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::{AuthorizationRequest, Config, DbBroadcast, Event, Payload, Server};
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Transactions taken per lock hold, so committing backends never wait long for the ring.
const BATCH: usize = 256;
/// Authorization requests checked per turn of the main loop at most: the commit queue is
/// delivered between batches, so authorization work can never keep it from draining.
const AUTHORIZATION_BATCH: usize = 256;
/// While a transaction is unfinished, look again this often even without a wake-up (its
/// backend wakes the worker at commit or abort; this only bounds a lost wake-up).
const BLOCKED_POLL: Duration = Duration::from_millis(50);
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Under a heavy stream of commits the worker looks at the ring this often without being
/// woken, until the rate has stayed below [`BUSY_RATE`] for [`BUSY_LINGER`]: that spares every committer a wake-up
/// signal (a cross-CPU interrupt) and the worker a wake-up per commit. Below [`BUSY_RATE`] it
/// is woken per commit instead, so a lone message never waits for the next poll.
const BUSY_POLL: Duration = Duration::from_millis(1);
const BUSY_LINGER: Duration = Duration::from_millis(50);
/// Messages per [`RATE_WINDOW`] from which the worker polls (2,000 messages/s).
const BUSY_RATE: u64 = 20;
const RATE_WINDOW: Duration = Duration::from_millis(10);
/// A record whose transaction is over but was never marked by its backend (only possible if
/// that backend died between its commit and its commit callback) is settled from the commit
/// log after this long, so that it cannot hold back the queue forever.
const ABANDONED_AFTER: Duration = Duration::from_secs(5);
/// How often presence tracked from SQL with a ttl is checked for expiry.
const PRESENCE_EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long clients get to see their close frames at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A committed message, copied out of shared memory.
#[derive(Debug)]
pub struct Committed {
    pub topic: String,
    pub event: String,
    pub id: String,
    pub private: bool,
    pub kind: PayloadKind,
    pub payload: Vec<u8>,
}

/// Takes up to [`BATCH`] ready transactions off the ring. Returns the committed messages of
/// `database`, in commit order, and the unfinished transaction that holds back the rest.
pub fn drain(database: u32) -> (Vec<Committed>, Option<Pending>) {
    let mut out = Vec::new();
    let mut discarded = 0u64;
    let pending = shmem::take_ready(BATCH, |ready, _| {
        discarded += ready.aborted_messages;
        for record in &ready.records {
            if record.database != database {
                discarded += u64::from(record.message_count());
                continue;
            }
            for body in record.messages() {
                match Message::decode(body) {
                    Ok(m) => out.push(Committed {
                        topic: m.topic.to_owned(),
                        event: m.event.to_owned(),
                        id: m.id.to_owned(),
                        private: m.private,
                        kind: m.kind,
                        payload: m.payload.to_vec(),
                    }),
                    Err(_) => discarded += 1,
                }
            }
        }
        ready.pending
    });
    shmem::stats()
        .discarded
        .fetch_add(discarded, Ordering::Relaxed);
    (out, pending)
}

/// Frees the ring while there is no server to deliver to (the extension does not exist in
/// the worker's database yet, so nothing in the ring can be for it).
pub fn discard_queue() {
    loop {
        let (messages, pending) = drain(0);
        if messages.is_empty() && (pending.is_some() || shmem::usage().0 == 0) {
            return;
        }
    }
}

/// Watches the record that holds back delivery, to settle it if its backend never does.
#[derive(Default)]
struct Stall {
    since: Option<(Pending, Instant)>,
}

impl Stall {
    fn observe(&mut self, pending: Option<Pending>) {
        let Some(pending) = pending else {
            self.since = None;
            return;
        };
        let running =
            unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(pending.xid)) };
        match self.since {
            _ if running => self.since = None,
            Some((p, since)) if p == pending => {
                if since.elapsed() >= ABANDONED_AFTER {
                    let committed = unsafe {
                        pg_sys::TransactionIdDidCommit(pg_sys::TransactionId::from(pending.xid))
                    };
                    log!(
                        "pg_realtime: transaction {} ended without marking its queued messages; {} them",
                        pending.xid,
                        if committed { "delivering" } else { "dropping" }
                    );
                    // Its commit record came after its floor: close enough for a lost stamp.
                    shmem::settle(&pending, committed.then_some(pending.floor));
                    self.since = None;
                }
            }
            _ => self.since = Some((pending, Instant::now())),
        }
    }
}

/// The worker's link to the socket server.
pub struct Delivery {
    database: u32,
    blocked: bool,
    /// Polling the ring until then (see [`BUSY_POLL`]).
    busy_until: Option<Instant>,
    /// Messages delivered since the start of the current rate window.
    rate_window: (Instant, u64),
    /// Latch, server wake-up fd and postmaster death, created once: `WaitLatchOrSocket` would
    /// build and tear down an epoll set on every wait.
    waits: *mut pg_sys::WaitEventSet,
    stall: Stall,
    server: Server,
    last_expiry: Instant,
    /// The last expiry failed (logged once until one succeeds).
    expiry_failing: bool,
    /// Authorization requests not checked yet, oldest first.
    authorizations: VecDeque<AuthorizationRequest>,
}

/// The settings the socket server reads, snapshotted on the main thread (the only thread that
/// may read GUCs).
fn server_config() -> Config {
    let listen = gucs::text(&gucs::LISTEN_ADDRESSES).unwrap_or_default();
    Config {
        listen_addresses: listen,
        port: u16::try_from(gucs::PORT.get()).unwrap_or(4000),
        jwt_secret: gucs::jwt_secret(),
        jwt_jwks: gucs::text(&gucs::JWT_JWKS),
        max_connections: gucs::MAX_CONNECTIONS.get().max(1) as usize,
        max_channels_per_connection: gucs::MAX_CHANNELS_PER_CONNECTION.get().max(1) as usize,
        max_payload_bytes: gucs::max_payload_bytes(),
        outbound_queue: gucs::OUTBOUND_QUEUE.get().max(1) as usize,
        idle_timeout: Duration::from_secs(gucs::IDLE_TIMEOUT.get().max(1) as u64),
        connect_error_delay: Duration::from_millis(gucs::CONNECT_ERROR_DELAY.get().max(0) as u64),
        join_error_delay: Duration::from_millis(gucs::JOIN_ERROR_DELAY.get().max(0) as u64),
        private_only: gucs::PRIVATE_ONLY.get(),
        worker_threads: gucs::WORKER_THREADS.get().max(1) as usize,
        authorize_private: true,
        max_replay_limit: gucs::REPLAY_LIMIT.get().max(1) as usize,
        presence_calls_limit: gucs::PRESENCE_CALLS_LIMIT.get().max(0) as u32,
        presence_calls_window: Duration::from_secs(gucs::PRESENCE_CALLS_WINDOW.get().max(1) as u64),
        outbound_queue_bytes: gucs::kb_bytes(&gucs::OUTBOUND_QUEUE_SIZE),
        joins_per_second: f64::from(gucs::JOINS_PER_SECOND.get().max(0)),
        join_burst: gucs::JOIN_BURST.get().max(1) as u32,
        max_pending_joins_per_connection: gucs::MAX_PENDING_JOINS.get().max(1) as usize,
        max_presence_meta_bytes: gucs::kb_bytes(&gucs::MAX_PRESENCE_META_SIZE),
        max_presence_keys_per_topic: gucs::MAX_PRESENCE_KEYS.get().max(1) as usize,
        max_presence_bytes_per_topic: gucs::kb_bytes(&gucs::MAX_PRESENCE_SIZE),
        max_batch_messages: gucs::MAX_BATCH_MESSAGES.get().max(1) as usize,
        ..Config::default()
    }
}

impl Delivery {
    /// Starts the socket server; exits the worker with code 1 (so the postmaster retries) when
    /// it cannot, e.g. because the port is taken.
    pub fn start(database_name: &str) -> Delivery {
        logging::install();
        let config = server_config();
        let where_ = format!("{}:{}", config.listen_addresses, config.port);
        let server = match Server::start(config) {
            Ok(server) => server,
            Err(e) => {
                log!("pg_realtime: cannot start the socket server on {where_}: {e}");
                unsafe { pg_sys::proc_exit(1) }
            }
        };
        let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
        log!(
            "pg_realtime: worker ready, serving database \"{database_name}\" on ws://{}/realtime/v1/websocket",
            addrs.join(", ws://")
        );
        presence::forget_sockets();
        presence::load_all(&server);
        let waits = unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            let none = std::ptr::null_mut();
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                server.wake_fd(),
                std::ptr::null_mut(),
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                none,
            );
            set
        };
        Delivery {
            database: u32::from(unsafe { pg_sys::MyDatabaseId }),
            blocked: false,
            busy_until: None,
            rate_window: (Instant::now(), 0),
            waits,
            stall: Stall::default(),
            server,
            last_expiry: Instant::now(),
            expiry_failing: false,
            authorizations: VecDeque::new(),
        }
    }

    pub fn poll_interval(&self) -> Duration {
        if !self.authorizations.is_empty() {
            // More requests wait: come straight back after delivering.
            Duration::ZERO
        } else if self.busy_until.is_some() {
            BUSY_POLL
        } else if self.blocked {
            BLOCKED_POLL
        } else {
            IDLE_POLL
        }
    }

    /// Sleeps until the latch is set, the server has news, or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) {
        unsafe {
            let mut event = pg_sys::WaitEvent::default();
            pg_sys::WaitEventSetWait(
                self.waits,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                &mut event,
                1,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
        logging::flush();
        let mut presence_changes = Vec::new();
        for event in self.server.poll_events() {
            match event {
                Event::Presence(change) => presence_changes.push(change),
                Event::Fatal(reason) => {
                    log!("pg_realtime: the socket server failed: {reason}");
                    unsafe { pg_sys::proc_exit(1) };
                }
                Event::Authorize(request) => self.authorizations.push_back(request),
            }
        }
        self.answer_authorizations();
        presence::mirror(presence_changes);
        if self.last_expiry.elapsed() >= PRESENCE_EXPIRY_INTERVAL {
            self.last_expiry = Instant::now();
            match presence::expire() {
                Ok(()) => self.expiry_failing = false,
                Err(e) => {
                    super::exit_if_extension_dropped();
                    // Once per streak of failures: it is retried every second.
                    if !std::mem::replace(&mut self.expiry_failing, true) {
                        log!("pg_realtime: cannot expire SQL presence (retrying quietly): {e}");
                    }
                }
            }
        }
    }

    /// Checks up to [`AUTHORIZATION_BATCH`] waiting requests, skipping those nobody waits for
    /// any more (the join was left, the connection closed, the wait timed out).
    fn answer_authorizations(&mut self) {
        let mut batch = Vec::new();
        while batch.len() < AUTHORIZATION_BATCH {
            let Some(request) = self.authorizations.pop_front() else {
                break;
            };
            if self.server.authorization_pending(request.id) {
                batch.push(request);
            }
        }
        if batch.is_empty() {
            return;
        }
        let answers = authorization::answer_all(&batch);
        for (request, (answer, replay)) in batch.iter().zip(answers) {
            self.server
                .complete_authorization(request.id, answer, replay);
        }
    }

    pub fn reload(&mut self) {
        self.server.reload(server_config());
    }

    /// Delivers whatever is ready, and decides whether to poll.
    pub fn deliver(&mut self) {
        let now = Instant::now();
        let delivered = self.deliver_ready();
        let (since, count) = &mut self.rate_window;
        *count += delivered;
        if now.duration_since(*since) >= RATE_WINDOW {
            if *count >= BUSY_RATE {
                if self.busy_until.is_none() {
                    shmem::set_worker_polling(true);
                }
                self.busy_until = Some(now + BUSY_LINGER);
            }
            self.rate_window = (now, 0);
        }
        if self.busy_until.is_some_and(|until| now >= until) {
            self.busy_until = None;
            shmem::set_worker_polling(false);
            // A commit may have skipped the wake-up while we were still polling.
            self.rate_window.1 += self.deliver_ready();
        }
    }

    /// Delivers every ready transaction; returns how many messages went out.
    fn deliver_ready(&mut self) -> u64 {
        let mut total = 0;
        loop {
            let (messages, pending) = drain(self.database);
            let blocked = pending.is_some();
            self.blocked = blocked;
            self.stall.observe(pending);
            let n = messages.len() as u64;
            let mut dropped = 0u64;
            let mut presence_topics = BTreeSet::new();
            for m in messages {
                let payload = match m.kind {
                    PayloadKind::Json => Payload::Json(Bytes::from(m.payload)),
                    PayloadKind::Binary => Payload::Binary(Bytes::from(m.payload)),
                    // Not a broadcast: re-read that topic's SQL presence once, below.
                    PayloadKind::PresenceSync => {
                        presence_topics.insert((m.topic, m.private));
                        continue;
                    }
                };
                let published = self.server.publish(DbBroadcast {
                    topic: m.topic,
                    event: m.event,
                    private: m.private,
                    id: m.id,
                    payload,
                });
                dropped += u64::from(!published);
            }
            presence::sync(&self.server, presence_topics);
            let stats = shmem::stats();
            stats.delivered.fetch_add(n - dropped, Ordering::Relaxed);
            stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            total += n;
            if n == 0 || blocked {
                return total;
            }
        }
    }

    /// Closes every socket with a close frame, then stops the network threads.
    pub fn shutdown(self) {
        self.server.shutdown(SHUTDOWN_GRACE);
        logging::flush();
    }
}
