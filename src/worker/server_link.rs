//! The main thread's side of the socket server: committed messages go out to it; its events
//! come in (authorization requests, presence changes, a fatal error) and are answered here.
//! The server's threads never call Postgres; everything that needs SQL happens on this side.

use super::queue_reader::Committed;
use super::{authorization, logging, presence};
use crate::gucs;
use bytes::Bytes;
use commit_ring::PayloadKind;
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::{AuthorizationRequest, DbBroadcast, Event, Payload, Server};
use std::collections::{BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::time::Duration;

/// Authorization requests checked per turn of the main loop at most: the commit queue is
/// delivered between batches, so authorization work can never keep it from draining.
const AUTHORIZATION_BATCH: usize = 256;
/// How long clients get to see their close frames at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub struct ServerLink {
    server: Server,
    /// Authorization requests not checked yet, oldest first.
    authorizations: VecDeque<AuthorizationRequest>,
}

impl ServerLink {
    /// Starts the socket server; exits the worker with code 1 (so the postmaster retries) when
    /// it cannot, e.g. because the port is taken.
    pub fn start(database_name: &str) -> ServerLink {
        logging::install();
        let config = gucs::server_config();
        let where_ = format!("{}:{}", config.listen_addresses, config.port);
        let server = match Server::start(config) {
            Ok(server) => server,
            Err(e) => {
                log!("pg_realtime: cannot start the socket server on {where_}: {e}");
                // SAFETY: the worker's main thread, outside any transaction.
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
        ServerLink {
            server,
            authorizations: VecDeque::new(),
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
        for event in self.server.poll_events() {
            match event {
                Event::Presence(change) => presence_changes.push(change),
                Event::Fatal(reason) => {
                    log!("pg_realtime: the socket server failed: {reason}");
                    // SAFETY: the worker's main thread, outside any transaction.
                    unsafe { pg_sys::proc_exit(1) };
                }
                Event::Authorize(request) => self.authorizations.push_back(request),
            }
        }
        self.answer_authorizations();
        presence::mirror(presence_changes);
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

    /// Hands committed messages to the server, in order; presence-sync records instead make
    /// the server re-read that topic's SQL presence, once per topic. Returns how many
    /// broadcasts the server could not take.
    pub fn publish(&self, messages: Vec<Committed>) -> u64 {
        let mut dropped = 0u64;
        let mut presence_topics = BTreeSet::new();
        for m in messages {
            let payload = match m.kind {
                PayloadKind::Json => Payload::Json(Bytes::from(m.payload)),
                PayloadKind::Binary => Payload::Binary(Bytes::from(m.payload)),
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
        dropped
    }

    /// What the socket server holds now.
    pub fn usage(&self) -> realtime_server::Usage {
        self.server.usage()
    }

    /// Applies changed settings (after SIGHUP).
    pub fn reload(&mut self) {
        self.server.reload(gucs::server_config());
    }

    /// Closes every socket with a close frame, then stops the network threads.
    pub fn shutdown(self) {
        self.server.shutdown(SHUTDOWN_GRACE);
        logging::flush();
    }
}
