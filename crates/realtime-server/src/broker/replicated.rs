//! The multi-node [`Broker`]: the [`MemoryBroker`] serves this node's subscribers, and every
//! message and presence change made here also leaves through the [`Outbox`] for the bus (see
//! `bus.rs`); envelopes from other nodes are applied with [`ReplicatedBroker::apply`].
//!
//! Presence of other nodes is kept under local owner ids, one per (node, owner), so their
//! members join, update and leave like local ones; a node that has not been heard from for a
//! lease is taken as gone and its members leave.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use super::memory::MemoryBroker;
use super::{Broker, SubId, Subscriber};
use crate::DbBroadcast;
use crate::broadcast::{Body, Outgoing};
use crate::bus::{BroadcastBody, Envelope, Frame};
use crate::events::EventQueue;
use crate::outbound::{ConnHandle, Outbound};
use crate::presence::{Limits, TrackError};
use crate::protocol::Payload;
use crate::registry::Reads;
use crate::topic::TopicKey;

/// Frames waiting to leave this node, bounded in bytes: while the bus is unreachable (the
/// primary restarts) the oldest are dropped rather than letting memory grow.
pub(crate) struct Outbox {
    frames: Mutex<(VecDeque<Frame>, usize)>,
    max_bytes: usize,
    /// Off on a primary without standbys: nothing is queued, nobody pays for the bus.
    enabled: AtomicBool,
    dropped: AtomicU64,
    /// Wakes the standby's link task.
    pub(crate) ready: Notify,
    /// Wakes the primary's main thread, which writes the frames into the WAL.
    events: Option<Arc<EventQueue>>,
}

impl Outbox {
    fn new(max_bytes: usize, enabled: bool, events: Option<Arc<EventQueue>>) -> Outbox {
        Outbox {
            frames: Mutex::new((VecDeque::new(), 0)),
            max_bytes,
            enabled: AtomicBool::new(enabled),
            dropped: AtomicU64::new(0),
            ready: Notify::new(),
            events,
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn push(&self, frame: Frame) {
        if !self.is_enabled() {
            return;
        }
        let size = frame_bytes(&frame);
        {
            let mut q = self.frames.lock().unwrap_or_else(|p| p.into_inner());
            while q.1 + size > self.max_bytes && !q.0.is_empty() {
                if let Some(old) = q.0.pop_front() {
                    q.1 -= frame_bytes(&old);
                }
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!(
                        "realtime: the bus is not taking this node's messages; dropping the \
                         oldest until it does"
                    );
                }
            }
            q.1 += size;
            q.0.push_back(frame);
        }
        self.ready.notify_one();
        if let Some(events) = &self.events {
            events.nudge();
        }
    }

    /// Takes queued frames, up to about `max_bytes` of them (at least one).
    pub(crate) fn take(&self, max_bytes: usize) -> Vec<Frame> {
        let mut q = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut taken = 0;
        while let Some(f) = q.0.front() {
            let size = frame_bytes(f);
            if !out.is_empty() && taken + size > max_bytes {
                break;
            }
            taken += size;
            q.1 -= size;
            out.extend(q.0.pop_front());
        }
        if q.0.is_empty() {
            self.dropped.store(0, Ordering::Relaxed);
        }
        out
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.frames.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// About how many bytes a frame holds (for the outbox bound).
fn frame_bytes(f: &Frame) -> usize {
    64 + match f {
        Frame::Database {
            topic,
            event,
            id,
            payload,
            ..
        } => topic.len() + event.len() + id.len() + payload.len(),
        Frame::Broadcast { topic, body, .. } => {
            topic.len()
                + match body {
                    BroadcastBody::JsonObject(b) => b.len(),
                    BroadcastBody::User {
                        event,
                        payload,
                        meta,
                        ..
                    } => event.len() + payload.len() + meta.as_ref().map_or(0, Vec::len),
                }
        }
        Frame::Track {
            topic, key, meta, ..
        } => topic.len() + key.len() + meta.len(),
        Frame::Untrack { topic, .. } | Frame::SqlPresence { topic, .. } => topic.len(),
        Frame::Hello { name } | Frame::Heartbeat { name } => name.len(),
    }
}

/// A member tracked on this node, kept to send again when another node says hello.
struct LocalMember {
    topic: TopicKey,
    key: String,
    meta: Box<str>,
}

/// What is known of another node.
struct RemoteNode {
    name: String,
    last_seen: Instant,
    /// Its owner id → (topic, the local owner id its member is kept under).
    members: HashMap<u64, (TopicKey, u64)>,
}

pub(crate) struct ReplicatedBroker {
    memory: Arc<MemoryBroker>,
    node: u64,
    name: String,
    lease: Duration,
    pub(crate) outbox: Outbox,
    local: Mutex<HashMap<u64, LocalMember>>,
    remote: Mutex<HashMap<u64, RemoteNode>>,
}

/// Members of other nodes were admitted by their own node's limits.
const REMOTE_LIMITS: Limits = Limits {
    metas_per_key: usize::MAX,
    keys_per_topic: usize::MAX,
    bytes_per_topic: usize::MAX,
};

impl ReplicatedBroker {
    /// `relaying` says whether frames leave at once (a standby) or only once the primary's
    /// worker knows of a standby ([`ReplicatedBroker::set_relaying`]).
    pub(crate) fn new(
        memory: Arc<MemoryBroker>,
        node: crate::NodeConfig,
        relaying: bool,
        events: Option<Arc<EventQueue>>,
    ) -> Self {
        // Hello is said when frames start to leave: at the standby's link connect, or when the
        // primary starts relaying.
        ReplicatedBroker {
            memory,
            node: node.id,
            name: node.name,
            lease: node.lease,
            outbox: Outbox::new(node.outbox_bytes, relaying, events),
            local: Mutex::new(HashMap::new()),
            remote: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn node(&self) -> u64 {
        self.node
    }

    /// Starts or stops sending frames to the bus. Starting says hello, so that the other
    /// nodes send their members, and sends this node's own.
    pub(crate) fn set_relaying(&self, on: bool) {
        if self.outbox.enabled.swap(on, Ordering::Relaxed) != on && on {
            self.hello();
        }
    }

    /// Announces this node and sends its members again: after a start or a reconnect.
    pub(crate) fn hello(&self) {
        self.outbox.push(Frame::Hello {
            name: self.name.clone(),
        });
        self.send_members();
    }

    fn send_members(&self) {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        for (owner, m) in local.iter() {
            self.outbox.push(Frame::Track {
                topic: m.topic.subtopic.clone(),
                private: m.topic.private,
                owner: *owner,
                key: m.key.clone(),
                meta: m.meta.to_string(),
            });
        }
    }

    /// This node's frames waiting for the bus, as one envelope (the primary's main thread
    /// writes it into the WAL).
    pub(crate) fn take_envelope(&self, max_bytes: usize) -> Option<Envelope> {
        let frames = self.outbox.take(max_bytes);
        (!frames.is_empty()).then_some(Envelope {
            node: self.node,
            frames,
        })
    }

    pub(crate) fn heartbeat(&self) {
        self.outbox.push(Frame::Heartbeat {
            name: self.name.clone(),
        });
    }

    /// Applies another node's envelope: its broadcasts reach this node's subscribers, its
    /// database messages go through `publish_db` (in order), its presence joins this node's.
    /// Returns the topics whose SQL presence must be re-read. This node's own envelopes come
    /// back through the bus too; they were delivered when they were made and are skipped.
    pub(crate) fn apply(
        &self,
        envelope: Envelope,
        mut publish_db: impl FnMut(DbBroadcast),
    ) -> Vec<(String, bool)> {
        let mut sql_presence = Vec::new();
        if envelope.node == self.node {
            return sql_presence;
        }
        let from = envelope.node;
        self.touch(from, None);
        for frame in envelope.frames {
            match frame {
                Frame::Database {
                    topic,
                    private,
                    event,
                    id,
                    binary,
                    payload,
                    offset,
                } => publish_db(DbBroadcast {
                    topic,
                    event,
                    private,
                    id,
                    payload: payload_of(binary, payload),
                    offset,
                }),
                Frame::Broadcast {
                    topic,
                    private,
                    body,
                } => {
                    let key = TopicKey {
                        private,
                        subtopic: topic,
                    };
                    let body = match body {
                        BroadcastBody::JsonObject(b) => Body::JsonObject(Bytes::from(b)),
                        BroadcastBody::User {
                            event,
                            binary,
                            payload,
                            meta,
                        } => Body::User {
                            event,
                            payload: payload_of(binary, payload),
                            meta: meta.map(Bytes::from),
                        },
                    };
                    let out = Outgoing::new(key.full_topic(), body);
                    self.memory.publish(&key, &out, None);
                }
                Frame::Track {
                    topic,
                    private,
                    owner,
                    key,
                    meta,
                } => {
                    let topic = TopicKey {
                        private,
                        subtopic: topic,
                    };
                    let local_owner = self.remote_owner(from, owner, &topic);
                    if let Err(e) = self.memory.track(
                        &topic,
                        local_owner,
                        &key,
                        meta.into_boxed_str(),
                        REMOTE_LIMITS,
                    ) {
                        log::debug!("realtime: a member of another node was not tracked: {e:?}");
                    }
                }
                Frame::Untrack {
                    topic: _,
                    private: _,
                    owner,
                } => {
                    let gone = self
                        .remote
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&from)
                        .and_then(|n| n.members.remove(&owner));
                    if let Some((topic, local_owner)) = gone {
                        self.memory.untrack(&topic, local_owner);
                    }
                }
                Frame::Hello { name } => {
                    self.touch(from, Some(name.clone()));
                    log::info!("realtime: node \"{name}\" joined the bus");
                    // The newcomer learns this node's members, and that it is alive.
                    self.heartbeat();
                    self.send_members();
                }
                Frame::Heartbeat { name } => self.touch(from, Some(name)),
                Frame::SqlPresence { topic, private } => sql_presence.push((topic, private)),
            }
        }
        sql_presence
    }

    fn touch(&self, node: u64, name: Option<String>) {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let n = remote.entry(node).or_insert_with(|| RemoteNode {
            name: String::new(),
            last_seen: Instant::now(),
            members: HashMap::new(),
        });
        n.last_seen = Instant::now();
        if let Some(name) = name {
            n.name = name;
        }
    }

    /// The local owner id a member of `node` is kept under.
    fn remote_owner(&self, node: u64, owner: u64, topic: &TopicKey) -> u64 {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = remote.get_mut(&node) else {
            return self.memory.new_presence_owner();
        };
        if let Some((_, local)) = n.members.get(&owner) {
            return *local;
        }
        let local = self.memory.new_presence_owner();
        n.members.insert(owner, (topic.clone(), local));
        local
    }

    /// Nodes silent for longer than the lease are gone: their members leave.
    pub(crate) fn expire_silent_nodes(&self) {
        let gone: Vec<RemoteNode> = {
            let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
            let silent: Vec<u64> = remote
                .iter()
                .filter(|(_, n)| n.last_seen.elapsed() > self.lease)
                .map(|(id, _)| *id)
                .collect();
            silent.iter().filter_map(|id| remote.remove(id)).collect()
        };
        for node in gone {
            if !node.members.is_empty() || !node.name.is_empty() {
                log::info!(
                    "realtime: node \"{}\" was not heard from for {:?}; its {} presence members left",
                    node.name,
                    self.lease,
                    node.members.len()
                );
            }
            for (topic, local_owner) in node.members.into_values() {
                self.memory.untrack(&topic, local_owner);
            }
        }
    }

    /// Heartbeats and lease expiry, until shutdown.
    pub(crate) async fn keep_alive(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let beat = (self.lease / 4).max(Duration::from_millis(250));
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.heartbeat();
            self.expire_silent_nodes();
        }
    }

    /// Other nodes heard from within the lease: (name, members here).
    pub(crate) fn peers(&self) -> Vec<(String, usize)> {
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote
            .values()
            .map(|n| (n.name.clone(), n.members.len()))
            .collect()
    }
}

fn payload_of(binary: bool, payload: Vec<u8>) -> Payload {
    if binary {
        Payload::Binary(Bytes::from(payload))
    } else {
        Payload::Json(Bytes::from(payload))
    }
}

fn bus_body(body: &Body) -> Option<BroadcastBody> {
    match body {
        Body::JsonObject(b) => Some(BroadcastBody::JsonObject(b.to_vec())),
        Body::User {
            event,
            payload,
            meta,
        } => Some(BroadcastBody::User {
            event: event.clone(),
            binary: matches!(payload, Payload::Binary(_)),
            payload: payload.bytes().to_vec(),
            meta: meta.as_ref().map(|m| m.to_vec()),
        }),
        Body::Event { .. } => None,
    }
}

impl Broker for ReplicatedBroker {
    fn publish(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize {
        let n = self.memory.publish(key, msg, exclude);
        if self.outbox.is_enabled()
            && let Some(body) = bus_body(msg.body())
        {
            self.outbox.push(Frame::Broadcast {
                topic: key.subtopic.clone(),
                private: key.private,
                body,
            });
        }
        n
    }

    fn deliver(&self, key: &TopicKey, msg: &Outgoing, exclude: Option<SubId>) -> usize {
        self.memory.deliver(key, msg, exclude)
    }

    fn subscribe(&self, key: TopicKey, sub: Subscriber) -> SubId {
        self.memory.subscribe(key, sub)
    }

    fn hand_over(&self, key: &TopicKey, id: SubId, staged: Outbound, conn: Arc<ConnHandle>) {
        self.memory.hand_over(key, id, staged, conn);
    }

    fn set_reads(&self, key: &TopicKey, id: SubId, reads: Reads) {
        self.memory.set_reads(key, id, reads);
    }

    fn unsubscribe(&self, key: &TopicKey, id: SubId) {
        self.memory.unsubscribe(key, id);
    }

    fn new_presence_owner(&self) -> u64 {
        self.memory.new_presence_owner()
    }

    fn generate_presence_key(&self) -> String {
        self.memory.generate_presence_key()
    }

    fn track(
        &self,
        key: &TopicKey,
        owner: u64,
        presence_key: &str,
        meta: Box<str>,
        limits: Limits,
    ) -> Result<(), TrackError> {
        self.memory
            .track(key, owner, presence_key, meta.clone(), limits)?;
        self.outbox.push(Frame::Track {
            topic: key.subtopic.clone(),
            private: key.private,
            owner,
            key: presence_key.to_string(),
            meta: meta.to_string(),
        });
        self.local.lock().unwrap_or_else(|p| p.into_inner()).insert(
            owner,
            LocalMember {
                topic: key.clone(),
                key: presence_key.to_string(),
                meta,
            },
        );
        Ok(())
    }

    fn untrack(&self, key: &TopicKey, owner: u64) {
        self.memory.untrack(key, owner);
        let was_tracked = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&owner)
            .is_some();
        if was_tracked {
            self.outbox.push(Frame::Untrack {
                topic: key.subtopic.clone(),
                private: key.private,
                owner,
            });
        }
    }

    fn sync_sql_presence(&self, key: &TopicKey, members: HashMap<String, Box<str>>) {
        self.memory.sync_sql_presence(key, members);
    }

    fn presence_state(&self, key: &TopicKey) -> Arc<str> {
        self.memory.presence_state(key)
    }

    fn usage(&self, usage: &mut crate::Usage) {
        self.memory.usage(usage);
        usage.bus_queued_bytes = self.outbox.queued_bytes() as u64;
    }
}
