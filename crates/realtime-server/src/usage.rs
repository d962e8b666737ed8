//! What the server holds, summed on demand for [`crate::Server::usage`]: nothing on the
//! fan-out path is counted for it. Each connection registers the counters it already keeps
//! (its outbound queue's bytes, its held writes) in a table walked once per call; the registry,
//! the presence store and the authorization bounds report their own sizes.
//!
//! The same table answers the operator's questions ([`crate::Server::connections`],
//! [`crate::Server::disconnect`]): who each connection is, what it joined, what it sent and
//! received. Those counters belong to one connection and are only written by its own task
//! (once per frame it reads or writes), never by the fan-out of other connections' messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::jwt::Claims;
use crate::outbound::ConnHandle;
use crate::topic::TopicKey;

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

/// One connection's counters, as read by [`crate::Server::usage`] and
/// [`crate::Server::connections`].
pub(crate) struct ConnUsage {
    pub handle: Arc<ConnHandle>,
    /// Bytes of client messages held for write checks, over all the connection's channels.
    pub held_write_bytes: AtomicUsize,
    /// The peer's address, when the listener knew it.
    pub remote: Option<SocketAddr>,
    /// `1.0.0` or `2.0.0`.
    pub vsn: &'static str,
    pub connected_at: SystemTime,
    /// The role and `sub` of the newest token the connection used (at connect, in a join, in
    /// an `access_token` refresh): supabase-js connects with the project's key and sends the
    /// user's token with each join.
    identity: Mutex<(String, Option<String>)>,
    /// Joined channels (changed at join and leave only). A list: most connections join one or
    /// two, and a tree's first node is 368 bytes.
    channels: Mutex<Vec<(String, bool)>>,
    /// Client broadcasts this connection published (`realtime_messages_in_total`).
    pub broadcasts_in: AtomicU64,
    /// Data frames (and their bytes) read from and written to the socket.
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Set by [`ConnTable::disconnect`]: the reason, and the connection's task is woken.
    kick: Mutex<Option<String>>,
    kicked: Notify,
}

impl ConnUsage {
    pub(crate) fn new(
        handle: Arc<ConnHandle>,
        remote: Option<SocketAddr>,
        vsn: &'static str,
        claims: Option<&Claims>,
    ) -> ConnUsage {
        ConnUsage {
            handle,
            held_write_bytes: AtomicUsize::new(0),
            remote,
            vsn,
            connected_at: SystemTime::now(),
            identity: Mutex::new(
                claims
                    .map(|c| (c.role.clone(), c.sub.clone()))
                    .unwrap_or_default(),
            ),
            channels: Mutex::new(Vec::new()),
            broadcasts_in: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            kick: Mutex::new(None),
            kicked: Notify::new(),
        }
    }

    /// The connection used a new token.
    pub(crate) fn set_identity(&self, claims: &Claims) {
        let mut identity = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        if identity.0 != claims.role || identity.1 != claims.sub {
            *identity = (claims.role.clone(), claims.sub.clone());
        }
    }

    pub(crate) fn joined(&self, key: &TopicKey) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if !channels.iter().any(|c| is(c, key)) {
            channels.push((key.subtopic.clone(), key.private));
        }
    }

    pub(crate) fn left(&self, key: &TopicKey) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|c| !is(c, key));
        if channels.is_empty() {
            *channels = Vec::new();
        }
    }

    /// Counts one frame read from the socket.
    pub(crate) fn count_in(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts frames written to the socket (once per write, not per frame).
    pub(crate) fn count_out(&self, frames: u64, bytes: u64) {
        self.messages_out.fetch_add(frames, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Resolves once the connection was asked to go ([`ConnTable::disconnect`]); the reason.
    pub(crate) async fn kicked(&self) -> String {
        loop {
            if let Some(reason) = self.kick.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return reason;
            }
            self.kicked.notified().await;
        }
    }

    fn kick(&self, reason: &str) {
        *self.kick.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        // A stored permit: the task sees it even when it is busy right now.
        self.kicked.notify_one();
    }

    fn info(&self, id: u64) -> ConnectionInfo {
        let (role, sub) = self
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        channels.sort();
        let channels = channels.into_iter().map(|(topic, _)| topic).collect();
        ConnectionInfo {
            id,
            remote: self.remote,
            role,
            sub,
            vsn: self.vsn,
            connected_at: self.connected_at,
            channels,
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            queued_bytes: self.handle.queued_bytes() as u64,
        }
    }
}

fn is((subtopic, private): &(String, bool), key: &TopicKey) -> bool {
    *subtopic == key.subtopic && *private == key.private
}

/// One connection as [`crate::Server::connections`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Unique per worker run; what [`crate::Server::disconnect`] takes.
    pub id: u64,
    pub remote: Option<SocketAddr>,
    /// Role and `sub` of the newest token the connection used.
    pub role: String,
    pub sub: Option<String>,
    pub vsn: &'static str,
    pub connected_at: SystemTime,
    /// Subtopics of the joined channels.
    pub channels: Vec<String>,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    /// Bytes waiting in its outbound queue.
    pub queued_bytes: u64,
}

/// One topic as [`crate::Server::channels`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub topic: String,
    pub private: bool,
    /// This node's connections that joined it.
    pub subscribers: u64,
    /// Presence keys (of every node, and tracked from SQL).
    pub presence_keys: u64,
}

/// Which connections [`crate::Server::disconnect`] closes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectTarget {
    Connection(u64),
    /// Every connection whose newest token has this `sub`.
    Sub(String),
}

/// What went through connections, as counters that only grow (`realtime_*_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TrafficTotals {
    /// Client broadcasts published.
    pub messages_in: u64,
    /// Frames written to sockets, and their bytes.
    pub frames_out: u64,
    pub bytes_out: u64,
}

impl std::ops::AddAssign for TrafficTotals {
    fn add_assign(&mut self, o: TrafficTotals) {
        self.messages_in += o.messages_in;
        self.frames_out += o.frames_out;
        self.bytes_out += o.bytes_out;
    }
}

impl ConnUsage {
    fn traffic(&self) -> TrafficTotals {
        TrafficTotals {
            messages_in: self.broadcasts_in.load(Ordering::Relaxed),
            frames_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
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
            *self.table.closed.lock().unwrap_or_else(|p| p.into_inner()) += gone.traffic();
        }
    }
}

impl ConnTable {
    /// Every live connection, in id order.
    pub(crate) fn snapshot(&self) -> Vec<ConnectionInfo> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ConnectionInfo> = conns.iter().map(|(id, c)| c.info(*id)).collect();
        drop(conns);
        out.sort_by_key(|c| c.id);
        out
    }

    /// (subtopic, private) → joined connections.
    pub(crate) fn channel_counts(&self) -> HashMap<(String, bool), u64> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = HashMap::new();
        for c in conns.values() {
            for channel in c.channels.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                *counts.entry(channel.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Asks the matching connections to close with `reason`; returns how many.
    pub(crate) fn disconnect(&self, target: &DisconnectTarget, reason: &str) -> u64 {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (id, c) in conns.iter() {
            let matches = match target {
                DisconnectTarget::Connection(wanted) => id == wanted,
                DisconnectTarget::Sub(sub) => {
                    let identity = c.identity.lock().unwrap_or_else(|p| p.into_inner());
                    identity.1.as_deref() == Some(sub.as_str())
                }
            };
            if matches {
                c.kick(reason);
                n += 1;
            }
        }
        n
    }

    pub(crate) fn register(&self, usage: Arc<ConnUsage>) -> Registered<'_> {
        // From 1: operators type these ids.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, usage);
        Registered { table: self, id }
    }

    /// (queued bytes, held write bytes) over every connection.
    /// Traffic over every connection since the server started, ended ones included.
    pub(crate) fn traffic(&self) -> TrafficTotals {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = *self.closed.lock().unwrap_or_else(|p| p.into_inner());
        for c in conns.values() {
            total += c.traffic();
        }
        total
    }

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

    fn conn(table: &ConnTable, sub: &str) -> (Arc<ConnUsage>, u64) {
        let (handle, _rx) = ConnHandle::new(8, 1024);
        let claims = Claims {
            role: "anon".into(),
            sub: Some(sub.into()),
            exp: 0,
            json: Arc::from("{}"),
        };
        let usage = Arc::new(ConnUsage::new(
            Arc::new(handle),
            None,
            "2.0.0",
            Some(&claims),
        ));
        let registered = table.register(usage.clone());
        let id = registered.id;
        std::mem::forget(registered);
        (usage, id)
    }

    #[tokio::test]
    async fn the_table_lists_connections_and_closes_a_users() {
        let table = ConnTable::default();
        let (alice, alice_id) = conn(&table, "alice");
        let (bob, _) = conn(&table, "bob");
        let room = TopicKey {
            private: false,
            subtopic: "room".into(),
        };
        alice.joined(&room);
        bob.joined(&room);
        bob.left(&room);
        alice.count_in(10);
        alice.count_out(3, 300);
        let rows = table.snapshot();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, alice_id);
        assert_eq!(rows[0].channels, ["room"]);
        assert_eq!(
            (
                rows[0].messages_in,
                rows[0].bytes_in,
                rows[0].messages_out,
                rows[0].bytes_out
            ),
            (1, 10, 3, 300)
        );
        assert!(rows[1].channels.is_empty());
        assert_eq!(
            table.channel_counts().get(&("room".into(), false)),
            Some(&1)
        );

        assert_eq!(
            table.disconnect(&DisconnectTarget::Sub("alice".into()), "bye"),
            1
        );
        assert_eq!(alice.kicked().await, "bye");
        assert_eq!(table.disconnect(&DisconnectTarget::Connection(999), "x"), 0);
        // A later token changes whom the connection counts as.
        bob.set_identity(&Claims {
            role: "authenticated".into(),
            sub: Some("carol".into()),
            exp: 0,
            json: Arc::from("{}"),
        });
        assert_eq!(
            table.disconnect(&DisconnectTarget::Sub("bob".into()), "x"),
            0
        );
        assert_eq!(
            table.disconnect(&DisconnectTarget::Sub("carol".into()), "x"),
            1
        );
    }

    #[test]
    fn traffic_totals_keep_ended_connections() {
        let table = ConnTable::default();
        let (handle, _rx) = ConnHandle::new(1, 1);
        let a = Arc::new(ConnUsage::new(Arc::new(handle), None, "2.0.0", None));
        let registered = table.register(a.clone());
        a.count_out(3, 30);
        a.broadcasts_in.fetch_add(1, Ordering::Relaxed);
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
