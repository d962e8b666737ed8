//! The seam between the code that produces messages and presence (connections, REST, the
//! worker's committed messages) and the code that delivers them to subscribers.
//!
//! [`memory::MemoryBroker`] is the in-process implementation: one server, every subscriber in
//! its own registry. A multi-node implementation (messages arriving from PostgreSQL
//! replication on a hot standby, presence of other nodes) implements the same trait, and
//! nothing that calls it changes.
//!
//! The broker is called once per message, never per subscriber: fan-out to the subscriber
//! queues is the implementation's loop.

pub(crate) mod memory;
pub(crate) mod replicated;

use std::collections::HashMap;
use std::sync::Arc;

use crate::broadcast::Outgoing;
use crate::outbound::{ConnHandle, Outbound};
use crate::presence::{Limits, TrackError};
use crate::registry::Reads;
pub(crate) use crate::registry::Subscriber;
use crate::topic::TopicKey;

/// Identifies one subscription of one topic.
pub(crate) type SubId = u64;

/// Publish, subscribe, and presence, per topic ([`TopicKey`]).
pub(crate) trait Broker: Send + Sync {
    /// Delivers a broadcast to every subscriber of `key` that may read broadcasts, except
    /// `exclude` (a sender without `broadcast.self`). Returns how many queued it.
    fn publish(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize;

    /// Delivers to this node's subscribers only: database messages, which every node receives
    /// from the bus in commit order by itself.
    /// `exclude` is the sender of a stored client broadcast without `broadcast.self`.
    fn deliver(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize;

    /// Subscribes `sub` to `key` (broadcasts and presence diffs, as its reads allow).
    fn subscribe(&self, key: TopicKey, sub: Subscriber) -> SubId;

    /// Moves a subscription to `conn`, after what waited in its staging queue `staged`; nothing
    /// published meanwhile may overtake those.
    fn hand_over(&self, key: &TopicKey, id: SubId, staged: Outbound, conn: Arc<ConnHandle>);

    /// New read rights after a token refresh.
    fn set_reads(&self, key: &TopicKey, id: SubId, reads: Reads);

    fn unsubscribe(&self, key: &TopicKey, id: SubId);

    /// Identifies one joined channel as the owner of at most one presence meta.
    fn new_presence_owner(&self) -> u64;

    /// A presence key for a join that did not choose one.
    fn generate_presence_key(&self) -> String;

    /// Tracks or updates `owner`'s meta under `presence_key` and sends the `presence_diff` to
    /// the topic's subscribers; Err when a presence limit refuses it.
    fn track(
        &self,
        key: &TopicKey,
        owner: u64,
        presence_key: &str,
        meta: Box<str>,
        limits: Limits,
    ) -> Result<(), TrackError>;

    /// Removes `owner`'s meta, if any, and sends the leave diff.
    fn untrack(&self, key: &TopicKey, owner: u64);

    /// Makes the members tracked from SQL on `key` exactly `members` (key → stored meta), and
    /// sends the diff.
    fn sync_sql_presence(&self, key: &TopicKey, members: HashMap<String, Box<str>>);

    /// The `presence_state` payload of `key`.
    fn presence_state(&self, key: &TopicKey) -> Arc<str>;

    /// Fills in the broker's share of [`crate::Usage`]: channels, topics, presence. Called
    /// about once a second; walks its maps, so it may take a few milliseconds with many topics.
    fn usage(&self, usage: &mut crate::Usage);
}
