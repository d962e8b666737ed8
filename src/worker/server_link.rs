//! The main thread's side of the socket server: committed messages go out to it; its events
//! come in (authorization requests, presence changes, a fatal error) and are answered here.
//! The server's threads never call Postgres; everything that needs SQL happens on this side.

use super::admin::Admin;
use super::bus_reader::BusReader;
use super::bus_writer::BusWriter;
use super::offset_writer::{self, DeliveredOffsets, OffsetWriter};
use super::presence_events::PresenceEvents;
use super::queue_reader::Committed;
use super::{authorization, logging, persist, presence};
use crate::gucs;
use bytes::Bytes;
use commit_ring::PayloadKind;
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::bus::{Envelope, Frame};
use realtime_server::{AuthorizationRequest, DbBroadcast, Event, Payload, Server};
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

/// Authorization requests checked per turn of the main loop at most: the commit queue is
/// delivered between batches, so authorization work can never keep it from draining.
const AUTHORIZATION_BATCH: usize = 256;
/// How long clients get to see their close frames at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a standby waits for the primary to answer a batch of checks.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of this node's frames per WAL message.
const ENVELOPE_BYTES: usize = 1 << 20;

/// What this node is on the bus.
enum Role {
    /// Writes every envelope into the WAL (when there are standbys).
    Primary(BusWriter),
    /// Reads them back from its own WAL; forwards checks to the primary.
    Standby(BusReader),
}

pub struct ServerLink {
    server: Server,
    /// Authorization requests not checked yet, oldest first.
    authorizations: VecDeque<AuthorizationRequest>,
    role: Role,
    /// SQL backends' requests about sockets.
    admin: Admin,
    /// Presence changes waiting to be written into `realtime.presence_events` (primary only).
    presence_events: PresenceEvents,
    /// Offsets of delivered messages waiting to be stored on their rows (primary only).
    offsets: OffsetWriter,
    /// Offsets of the database messages this standby delivered lately (standby only).
    delivered: DeliveredOffsets,
}

impl ServerLink {
    /// Starts the socket server; exits the worker with code 1 (so the postmaster retries) when
    /// it cannot, e.g. because the port is taken.
    pub fn start(database_name: &str) -> ServerLink {
        logging::install();
        // SAFETY: reads shared recovery state.
        let standby = unsafe { pg_sys::RecoveryInProgress() };
        let config = realtime_server::Config {
            node: gucs::node_config(),
            ..gucs::server_config()
        };
        let node_name = config.node.name.clone();
        let where_ = format!("{}:{}", config.listen_addresses, config.port);
        let server = match Server::start_watched(config, Some(Arc::new(WatchedInSharedMemory))) {
            Ok(server) => server,
            Err(e) => {
                log!("pg_realtime: cannot start the socket server on {where_}: {e}");
                // SAFETY: the worker's main thread, outside any transaction.
                unsafe { pg_sys::proc_exit(1) }
            }
        };
        let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
        log!(
            "pg_realtime: worker ready, serving database \"{database_name}\" on ws://{}/realtime/v1/websocket{}",
            addrs.join(", ws://"),
            if standby {
                format!(" as standby node \"{node_name}\"")
            } else {
                String::new()
            }
        );
        let role = if standby {
            Role::Standby(BusReader::start())
        } else {
            presence::forget_sockets();
            offset_writer::mark_running();
            Role::Primary(BusWriter::start(&server))
        };
        presence::load_all(&server);
        ServerLink {
            server,
            authorizations: VecDeque::new(),
            role,
            admin: Admin::default(),
            presence_events: PresenceEvents::default(),
            offsets: OffsetWriter::default(),
            delivered: DeliveredOffsets::default(),
        }
    }

    /// Readable when the server has events for the main thread.
    pub fn wake_fd(&self) -> RawFd {
        self.server.wake_fd()
    }

    /// Authorization requests are still waiting for their checks.
    pub fn has_work(&self) -> bool {
        !self.authorizations.is_empty()
    }

    /// Takes the server's events: presence changes are mirrored into SQL, authorization
    /// requests are queued and a batch of them answered, a fatal error ends the worker.
    pub fn handle_events(&mut self) {
        logging::flush();
        let mut presence_changes = Vec::new();
        let mut to_store = Vec::new();
        for event in self.server.poll_events() {
            match event {
                Event::Presence(change) => presence_changes.push(change),
                Event::Fatal(reason) => {
                    log!("pg_realtime: the socket server failed: {reason}");
                    // SAFETY: the worker's main thread, outside any transaction.
                    unsafe { pg_sys::proc_exit(1) };
                }
                Event::Authorize(request) => self.authorizations.push_back(request),
                Event::Persist(request) => to_store.push(request),
            }
        }
        self.answer_authorizations();
        self.store_persisted(to_store);
        // Only the primary can write; it mirrors the members of every node.
        if matches!(self.role, Role::Primary(_)) {
            self.presence_events.record(&presence_changes);
            presence::mirror(presence_changes);
            self.presence_events.flush();
        }
    }

    /// Answers SQL backends' requests about sockets; `check_stale` also frees the slots of
    /// backends that went away.
    pub fn serve_admin(&mut self, check_stale: bool) {
        self.admin.serve(&self.server, check_stale);
    }

    /// Presence rows wait to be written: the loop must come back soon even if idle.
    pub fn presence_events_waiting(&self) -> bool {
        self.presence_events.waiting()
    }

    /// Whether the bus needs the main loop back soon: a standby polls its WAL, a primary has
    /// envelopes waiting for a flush.
    pub fn bus_poll(&self) -> Option<Duration> {
        match &self.role {
            Role::Primary(writer) => writer
                .waiting_for_flush()
                .then_some(super::bus_writer::FLUSH_GRACE),
            Role::Standby(_) => None,
        }
    }

    /// Whether this node serves as a standby.
    pub fn is_standby(&self) -> bool {
        matches!(self.role, Role::Standby(_))
    }

    /// Moves the bus: a primary writes this node's waiting frames into the WAL; a standby
    /// applies the envelopes its WAL replayed since the last call. Returns whether a standby
    /// found any.
    pub fn pump_bus(&mut self) -> bool {
        match &mut self.role {
            Role::Primary(writer) => {
                if writer.relaying(&self.server) {
                    let own: Vec<Vec<u8>> = self
                        .server
                        .take_bus_envelope(ENVELOPE_BYTES)
                        .into_iter()
                        .collect();
                    writer.write(&own);
                }
                writer.flush_if_late();
                false
            }
            Role::Standby(reader) => {
                let envelopes = reader.read();
                let found = !envelopes.is_empty();
                let mut sql_presence = BTreeSet::new();
                for bytes in envelopes {
                    match Envelope::decode(&bytes) {
                        Ok(e) => {
                            for frame in &e.frames {
                                if let Frame::Database {
                                    topic,
                                    private,
                                    id,
                                    offset: Some(offset),
                                    ..
                                } = frame
                                {
                                    self.delivered.record(topic, *private, id, *offset);
                                }
                            }
                            sql_presence.extend(self.server.apply_envelope(e));
                        }
                        Err(e) => log!("pg_realtime: skipping a bus message: {e}"),
                    }
                }
                presence::sync(&self.server, sql_presence);
                found
            }
        }
    }

    /// Once a second: a primary keeps its record of standbys; a standby that was promoted
    /// restarts its worker, which comes back as the primary's.
    pub fn bus_tick(&mut self) {
        match &mut self.role {
            Role::Primary(writer) => writer.tick(&self.server),
            Role::Standby(_) => {
                // SAFETY: reads shared recovery state.
                if !unsafe { pg_sys::RecoveryInProgress() } {
                    log!(
                        "pg_realtime: this node was promoted; restarting the worker as the primary's"
                    );
                    // SAFETY: the worker's main thread, outside any transaction.
                    unsafe { pg_sys::proc_exit(1) };
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
        // A replay must see the offset of every message delivered before it.
        if batch.iter().any(|r| r.replay.is_some()) {
            self.offsets.flush();
        }
        let answers = match self.role {
            Role::Primary(_) => authorization::answer_all(&batch),
            Role::Standby(_) => {
                // Public channels have no checks to forward (they come here only to replay).
                let private: Vec<AuthorizationRequest> =
                    batch.iter().filter(|r| r.private).cloned().collect();
                let mut forwarded = self
                    .server
                    .forward_authorizations(&private, FORWARD_TIMEOUT)
                    .into_iter();
                let rights = batch
                    .iter()
                    .map(|r| {
                        if r.private {
                            forwarded
                                .next()
                                .unwrap_or(Err(realtime_server::Refusal::AuthorizationTimeout))
                        } else {
                            Ok(authorization::PUBLIC)
                        }
                    })
                    .collect();
                authorization::with_local_replay(&batch, rights, &self.delivered)
            }
        };
        for (request, (answer, replay)) in batch.iter().zip(answers) {
            self.server
                .complete_authorization(request.id, answer, replay);
        }
    }

    /// Stores the messages clients sent with `persist`, in one transaction, and answers each
    /// after the commit (before the commit queue is drained, so that a sender left out by
    /// `broadcast.self` is known when its row is delivered).
    fn store_persisted(&mut self, mut requests: Vec<realtime_server::PersistRequest>) {
        requests.retain(|r| self.server.persist_pending(r.id));
        let answers = persist::store_all(&requests, self.is_standby());
        for (request, answer) in requests.iter().zip(answers) {
            self.server.complete_persist(request.id, answer);
        }
    }

    /// Hands committed messages to the server, in order; presence-sync records instead make
    /// the server re-read that topic's SQL presence, once per topic; envelopes relayed by
    /// standbys are applied. With standbys, all of it also goes into the WAL, in this order.
    /// Returns how many broadcasts the server could not take.
    pub fn publish(&mut self, messages: Vec<Committed>) -> u64 {
        let mut dropped = 0u64;
        let mut presence_topics = BTreeSet::new();
        let relaying = match &mut self.role {
            Role::Primary(writer) => writer.relaying(&self.server),
            Role::Standby(_) => false,
        };
        let mut frames = Vec::new();
        let mut relayed = Vec::new();
        let public_replay = gucs::public_replay();
        for m in messages {
            let payload = match m.kind {
                PayloadKind::Json => Payload::Json(Bytes::from(m.payload)),
                PayloadKind::Binary => Payload::Binary(Bytes::from(m.payload)),
                PayloadKind::PresenceSync => {
                    if relaying {
                        frames.push(Frame::SqlPresence {
                            topic: m.topic.clone(),
                            private: m.private,
                        });
                    }
                    presence_topics.insert((m.topic, m.private));
                    continue;
                }
                PayloadKind::Relay => {
                    self.apply_relayed(&m.payload);
                    relayed.push(m.payload);
                    continue;
                }
            };
            // Offsets are read only by resumes, which public channels may not ask for unless
            // `realtime.public_replay` is on: storing them would be an UPDATE per message
            // that nothing reads.
            if matches!(self.role, Role::Primary(_)) && (m.private || public_replay) {
                self.offsets.push(&m.id, m.inserted_at, m.offset);
            }
            let message = DbBroadcast {
                topic: m.topic,
                event: m.event,
                private: m.private,
                id: m.id,
                payload,
                offset: Some(m.offset),
            };
            if relaying {
                frames.push(database_frame(&message));
            }
            dropped += u64::from(!self.server.publish(message));
        }
        presence::sync(&self.server, presence_topics);
        if let Role::Primary(writer) = &mut self.role
            && writer.relaying(&self.server)
        {
            let mut envelopes = Vec::with_capacity(relayed.len() + 1);
            if !frames.is_empty() {
                envelopes.push(
                    Envelope {
                        node: self.server.node_id(),
                        frames,
                    }
                    .encode(),
                );
            }
            envelopes.extend(relayed);
            writer.write(&envelopes);
        }
        dropped
    }

    /// An envelope a standby handed to this primary: that standby is alive (so the bus is
    /// written from now on), and its frames reach this node's sockets.
    fn apply_relayed(&mut self, bytes: &[u8]) {
        let Role::Primary(writer) = &mut self.role else {
            return;
        };
        let envelope = match Envelope::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                log!("pg_realtime: skipping a relayed bus message: {e}");
                return;
            }
        };
        let name = envelope.frames.iter().find_map(|f| match f {
            Frame::Hello { name } | Frame::Heartbeat { name } => Some(name.as_str()),
            _ => None,
        });
        writer.heard_from(&self.server, envelope.node, name);
        let topics: BTreeSet<(String, bool)> =
            self.server.apply_envelope(envelope).into_iter().collect();
        presence::sync(&self.server, topics);
    }

    /// What the socket server holds now.
    pub fn usage(&self) -> realtime_server::Usage {
        self.server.usage()
    }

    /// What `/metrics` shows of the worker.
    pub fn set_worker_stats(&self, stats: realtime_server::WorkerStats) {
        self.server.set_worker_stats(stats);
    }

    /// Applies changed settings (after SIGHUP).
    pub fn reload(&mut self) {
        self.server.reload(gucs::server_config());
    }

    /// How long until delivered messages' offsets must be stored; None when none wait.
    pub fn offsets_due_in(&self) -> Option<Duration> {
        self.offsets.due_in()
    }

    pub fn store_offsets_if_due(&mut self) {
        self.offsets.flush_if_due();
    }

    /// Closes every socket with a close frame, then stops the network threads. On the
    /// primary, the offsets of everything delivered are stored first, and the stop recorded
    /// as clean.
    pub fn shutdown(mut self) {
        if let Role::Primary(writer) = &mut self.role {
            self.offsets.flush();
            offset_writer::mark_stopped();
            writer.record_before_stop();
        }
        self.server.shutdown(SHUTDOWN_GRACE);
        logging::flush();
    }
}

/// A committed database message as the bus carries it.
fn database_frame(m: &DbBroadcast) -> Frame {
    Frame::Database {
        topic: m.topic.clone(),
        private: m.private,
        event: m.event.clone(),
        id: m.id.clone(),
        binary: matches!(m.payload, Payload::Binary(_)),
        payload: m.payload.bytes().to_vec(),
        offset: m.offset,
    }
}

/// Mirrors which topics have subscribers into shared memory, where committing backends read
/// it to decide whether to wake the worker (see `commit_ring::watched`). Called from the
/// network threads: it only touches atomics, never PostgreSQL.
struct WatchedInSharedMemory;

impl realtime_server::TopicWatcher for WatchedInSharedMemory {
    fn watched(&self, private: bool, subtopic: &str, on: bool) {
        crate::queue::shmem::watched_topics().set(private, subtopic, on);
    }
}
