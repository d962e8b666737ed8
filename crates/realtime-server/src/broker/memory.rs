//! The in-process [`Broker`]: the registry's fan-out for messages, the presence store for
//! presence, and presence diffs merged per topic over a short window before they fan out.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::{Broker, SubId, Subscriber};
use crate::broadcast::{Body, Outgoing};
use crate::events::EventQueue;
use crate::outbound::{ConnHandle, Outbound};
use crate::presence::{Limits, Presence, TrackError};
use crate::presence_diffs::{PresenceDiffs, WINDOW};
use crate::registry::{Kind, Reads, Registry, TopicWatcher};
use crate::topic::TopicKey;

pub(crate) struct MemoryBroker {
    registry: Registry,
    presence: Presence,
    diffs: PresenceDiffs,
}

impl MemoryBroker {
    /// Socket presence changes are reported to `events`, so the worker can mirror them for SQL.
    /// `watcher` hears which topics have subscribers (see [`TopicWatcher`]).
    pub(crate) fn new(events: Arc<EventQueue>, watcher: Option<Arc<dyn TopicWatcher>>) -> Self {
        MemoryBroker {
            registry: Registry::watched_by(watcher),
            presence: Presence::mirrored(events),
            diffs: PresenceDiffs::default(),
        }
    }

    /// Presence keys per topic (of every node, and tracked from SQL).
    pub(crate) fn presence_keys_by_topic(&self) -> Vec<(TopicKey, usize)> {
        self.presence.keys_by_topic()
    }

    /// Sends the merged presence diffs once per window while there are any, until shutdown.
    pub(crate) async fn flush_presence_diffs(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.diffs.ready() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            tokio::time::sleep(WINDOW).await;
            for (key, p) in self.diffs.take() {
                let payload = serde_json::json!({"joins": p.joins, "leaves": p.leaves});
                let out = Outgoing::new(
                    p.topic,
                    Body::Event {
                        event: "presence_diff",
                        payload: Bytes::from(payload.to_string()),
                    },
                );
                self.registry.fanout(&key, &out, None, Kind::Presence);
            }
        }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize {
        self.registry.fanout(key, msg, exclude, Kind::Broadcast)
    }

    fn deliver(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize {
        self.registry.fanout(key, msg, exclude, Kind::Broadcast)
    }

    fn subscribe(&self, key: TopicKey, sub: Subscriber) -> SubId {
        self.registry.insert(key, sub)
    }

    fn hand_over(&self, key: &TopicKey, id: SubId, staged: Outbound, conn: Arc<ConnHandle>) {
        self.registry.activate(key, id, staged, conn);
    }

    fn set_reads(&self, key: &TopicKey, id: SubId, reads: Reads) {
        self.registry.set_reads(key, id, reads);
    }

    fn unsubscribe(&self, key: &TopicKey, id: SubId) {
        self.registry.unsubscribe(key, id);
    }

    fn new_presence_owner(&self) -> u64 {
        self.presence.new_owner()
    }

    fn generate_presence_key(&self) -> String {
        self.presence.generate_key()
    }

    fn track(
        &self,
        key: &TopicKey,
        owner: u64,
        presence_key: &str,
        meta: Box<str>,
        limits: Limits,
    ) -> Result<(), TrackError> {
        if let Some(diff) = self
            .presence
            .track(key, owner, presence_key, meta, limits)?
        {
            self.diffs.add(key, &diff);
        }
        Ok(())
    }

    fn untrack(&self, key: &TopicKey, owner: u64) {
        if let Some(diff) = self.presence.untrack(key, owner) {
            self.diffs.add(key, &diff);
        }
    }

    fn sync_sql_presence(&self, key: &TopicKey, members: HashMap<String, Box<str>>) {
        if let Some(diff) = self.presence.sync_sql(key, members) {
            self.diffs.add(key, &diff);
        }
    }

    fn presence_state(&self, key: &TopicKey) -> Arc<str> {
        self.presence.state(key)
    }

    fn usage(&self, usage: &mut crate::Usage) {
        let (topics, channels) = self.registry.counts();
        let (keys, bytes) = self.presence.totals();
        usage.topics = topics as u64;
        usage.channels = channels as u64;
        usage.presence_keys = keys as u64;
        usage.presence_bytes = bytes as u64;
    }
}
