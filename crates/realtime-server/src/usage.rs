//! What the server holds, summed on demand for [`crate::Server::usage`]: nothing on the
//! fan-out path is counted for it. Each connection registers the counters it already keeps
//! (its outbound queue's bytes, its held writes) in a table walked once per call; the registry,
//! the presence store and the authorization bounds report their own sizes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::outbound::ConnHandle;

/// A snapshot of what the server holds and for whom; see [`crate::Server::usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Open WebSocket connections (including upgrades in progress).
    pub connections: u64,
    /// Joined channels (subscriptions), over all connections.
    pub channels: u64,
    /// Distinct topics with at least one subscription.
    pub topics: u64,
    /// Bytes waiting in the sockets' outbound queues.
    pub queued_bytes: u64,
    /// Authorization requests waiting for the worker, including the ones it has taken but not
    /// answered yet.
    pub pending_authorizations: u64,
    /// Events queued for the worker and not taken yet (authorizations, presence changes).
    pub queued_events: u64,
    /// Presence keys over all topics (sockets and SQL).
    pub presence_keys: u64,
    /// Presence key and meta bytes over all topics.
    pub presence_bytes: u64,
    /// Bytes of client messages held while their channel's write check runs.
    pub held_write_bytes: u64,
    /// Payload bytes of database messages waiting for the dispatch task.
    pub publish_queue_bytes: u64,
    /// Bytes of REST bodies being read and answered (by their declared length).
    pub rest_body_bytes: u64,
    /// Bytes of this node's frames waiting for the bus to other nodes.
    pub bus_queued_bytes: u64,
}

/// One connection's counters, as read by [`crate::Server::usage`].
pub(crate) struct ConnUsage {
    pub handle: Arc<ConnHandle>,
    /// Bytes of client messages held for write checks, over all the connection's channels.
    pub held_write_bytes: AtomicUsize,
}

/// The live connections' counters.
#[derive(Default)]
pub(crate) struct ConnTable {
    conns: Mutex<HashMap<u64, Arc<ConnUsage>>>,
    next_id: AtomicU64,
}

/// Removes a connection from the table when it ends (however it ends).
pub(crate) struct Registered<'a> {
    table: &'a ConnTable,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.table
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl ConnTable {
    pub(crate) fn register(&self, usage: Arc<ConnUsage>) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, usage);
        Registered { table: self, id }
    }

    /// (queued bytes, held write bytes) over every connection.
    pub(crate) fn sum(&self) -> (u64, u64) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.values().fold((0, 0), |(queued, held), c| {
            (
                queued + c.handle.queued_bytes() as u64,
                held + c.held_write_bytes.load(Ordering::Relaxed) as u64,
            )
        })
    }
}
