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

/// One connection's counters, as read by [`crate::Server::usage`] and the metrics scrape.
/// Only the connection's own task writes them, so they cost no contention on the fan-out path.
pub(crate) struct ConnUsage {
    pub handle: Arc<ConnHandle>,
    /// Bytes of client messages held for write checks, over all the connection's channels.
    pub held_write_bytes: AtomicUsize,
    pub traffic: Traffic,
}

impl ConnUsage {
    pub(crate) fn new(handle: Arc<ConnHandle>) -> ConnUsage {
        ConnUsage {
            handle,
            held_write_bytes: AtomicUsize::new(0),
            traffic: Traffic::default(),
        }
    }
}

/// What went through connections: counters that only grow (`realtime_*_total`).
#[derive(Default)]
pub(crate) struct Traffic {
    /// Client broadcasts published.
    pub messages_in: AtomicU64,
    /// Frames written to the socket, and their bytes; added once per write batch.
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// [`Traffic`] as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TrafficTotals {
    pub messages_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
}

impl Traffic {
    fn totals(&self) -> TrafficTotals {
        TrafficTotals {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::AddAssign for TrafficTotals {
    fn add_assign(&mut self, o: TrafficTotals) {
        self.messages_in += o.messages_in;
        self.frames_out += o.frames_out;
        self.bytes_out += o.bytes_out;
    }
}

/// The live connections' counters.
#[derive(Default)]
pub(crate) struct ConnTable {
    conns: Mutex<HashMap<u64, Arc<ConnUsage>>>,
    next_id: AtomicU64,
    /// The traffic of connections that have ended, so that totals never go down. Only
    /// changed under the `conns` lock, together with the removal.
    closed: Mutex<TrafficTotals>,
}

/// Removes a connection from the table when it ends (however it ends).
pub(crate) struct Registered<'a> {
    table: &'a ConnTable,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut conns = self.table.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = conns.remove(&self.id) {
            // Folded in while the table is locked: a scrape sees the connection either live or
            // closed, never neither.
            *self.table.closed.lock().unwrap_or_else(|p| p.into_inner()) += gone.traffic.totals();
        }
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

    /// Traffic over every connection since the server started, ended ones included.
    pub(crate) fn traffic(&self) -> TrafficTotals {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = *self.closed.lock().unwrap_or_else(|p| p.into_inner());
        for c in conns.values() {
            total += c.traffic.totals();
        }
        total
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_totals_keep_ended_connections() {
        let table = ConnTable::default();
        let (handle, _rx) = ConnHandle::new(1, 1);
        let a = Arc::new(ConnUsage::new(Arc::new(handle)));
        let registered = table.register(a.clone());
        a.traffic.frames_out.fetch_add(3, Ordering::Relaxed);
        a.traffic.bytes_out.fetch_add(30, Ordering::Relaxed);
        a.traffic.messages_in.fetch_add(1, Ordering::Relaxed);
        let live = table.traffic();
        drop(registered);
        assert_eq!(table.traffic(), live);
        assert_eq!(
            live,
            TrafficTotals {
                messages_in: 1,
                frames_out: 3,
                bytes_out: 30
            }
        );
    }
}
