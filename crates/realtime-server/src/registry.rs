//! Topic → local subscribers, and the fan-out of one message to them (the in-process
//! broker's core, see `broker/memory.rs`). Public and private channels with the same name are
//! separate namespaces, as in Supabase.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::broadcast::Outgoing;
use crate::outbound::{ConnHandle, Outbound};
use crate::protocol::Vsn;

pub(crate) use crate::topic::TopicKey;

/// What a subscriber may read (private channels: its RLS read check; public: everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reads {
    pub broadcast: bool,
    pub presence: bool,
}

impl Reads {
    pub(crate) const ALL: Reads = Reads {
        broadcast: true,
        presence: true,
    };

    /// A private channel's reads: what its read check allowed.
    pub(crate) fn of(a: &crate::events::Authorization) -> Reads {
        Reads {
            broadcast: a.broadcast_read,
            presence: a.presence_read,
        }
    }
}

/// Which read right a message needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Broadcast,
    Presence,
}

/// The ids a subscriber that got `replay` by Broadcast Replay skips when their live copies
/// arrive, so each message arrives once; None when nothing was replayed.
pub(crate) fn replayed_ids(replay: &[crate::events::Replayed]) -> Option<Arc<HashSet<String>>> {
    (!replay.is_empty()).then(|| Arc::new(replay.iter().map(|r| r.id.clone()).collect()))
}

/// When a subscriber's token expires (its `exp`, unix seconds); shared with its channel, which
/// moves it on a token refresh.
pub(crate) type Expiry = Arc<AtomicI64>;

pub(crate) fn expiry(exp: i64) -> Expiry {
    Arc::new(AtomicI64::new(exp))
}

/// One subscription: where its messages go and what it may read.
pub(crate) struct Subscriber {
    pub vsn: Vsn,
    /// Fan-out skips a subscriber whose token has expired, even before its connection gets to
    /// close the channel (it may be busy, or stuck writing).
    pub expires: Expiry,
    pub conn: Arc<ConnHandle>,
    pub reads: Reads,
    /// Ids of database messages this subscriber already got by Broadcast Replay.
    pub replayed: Option<Arc<HashSet<String>>>,
}

/// Told when a topic gets its first subscriber on this node and when it loses its last one,
/// in that order for each topic (the calls are made under the registry's lock). The worker
/// uses it so that committers wake it only for topics somebody has joined.
pub trait TopicWatcher: Send + Sync {
    fn watched(&self, private: bool, subtopic: &str, on: bool);
}

#[derive(Default)]
pub(crate) struct Registry {
    topics: RwLock<HashMap<TopicKey, HashMap<u64, Subscriber>>>,
    next_id: AtomicU64,
    watcher: Option<Arc<dyn TopicWatcher>>,
}

impl Registry {
    pub(crate) fn watched_by(watcher: Option<Arc<dyn TopicWatcher>>) -> Self {
        Registry {
            watcher,
            ..Registry::default()
        }
    }

    fn tell_watcher(&self, key: &TopicKey, on: bool) {
        if let Some(w) = &self.watcher {
            w.watched(key.private, &key.subtopic, on);
        }
    }

    #[cfg(test)]
    pub(crate) fn subscribe(
        &self,
        key: TopicKey,
        vsn: Vsn,
        conn: Arc<ConnHandle>,
        reads: Reads,
    ) -> u64 {
        self.subscribe_skipping(key, vsn, conn, reads, None, expiry(i64::MAX))
    }

    /// Subscribes until the token expires at `expires`; database messages whose id is in
    /// `replayed` are skipped.
    #[cfg(test)]
    pub(crate) fn subscribe_skipping(
        &self,
        key: TopicKey,
        vsn: Vsn,
        conn: Arc<ConnHandle>,
        reads: Reads,
        replayed: Option<Arc<HashSet<String>>>,
        expires: Expiry,
    ) -> u64 {
        self.insert(
            key,
            Subscriber {
                vsn,
                expires,
                conn,
                reads,
                replayed,
            },
        )
    }

    /// Adds a subscriber of `key`; returns its id.
    pub(crate) fn insert(&self, key: TopicKey, sub: Subscriber) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if !topics.contains_key(&key) {
            self.tell_watcher(&key, true);
        }
        topics.entry(key).or_default().insert(id, sub);
        id
    }

    /// Subscribes a channel whose connection has not taken it over yet: messages wait in a
    /// queue of their own (bounded like the connection's) until [`Registry::activate`].
    #[cfg(test)]
    pub(crate) fn subscribe_buffered(
        &self,
        key: TopicKey,
        vsn: Vsn,
        reads: Reads,
        replayed: Option<Arc<HashSet<String>>>,
        expires: Expiry,
        (queue_frames, queue_bytes): (usize, usize),
    ) -> (u64, Outbound) {
        let (staging, rx) = ConnHandle::new(queue_frames, queue_bytes);
        let id = self.subscribe_skipping(key, vsn, Arc::new(staging), reads, replayed, expires);
        (id, rx)
    }

    /// Hands a buffered subscription over to its connection: what waited goes first, in order,
    /// and nothing published meanwhile can overtake it (fan-out holds the read lock).
    pub(crate) fn activate(
        &self,
        key: &TopicKey,
        id: u64,
        mut staged: Outbound,
        conn: Arc<ConnHandle>,
    ) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Some(sub) = topics.get_mut(key).and_then(|subs| subs.get_mut(&id)) else {
            return;
        };
        while let Some(frame) = staged.try_recv() {
            conn.push(frame);
        }
        if sub.conn.is_slow() {
            // Messages were lost while waiting: the client cannot see a complete stream.
            conn.mark_slow();
        }
        sub.conn = conn;
    }

    /// New read rights after a token refresh.
    pub(crate) fn set_reads(&self, key: &TopicKey, id: u64, reads: Reads) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(sub) = topics.get_mut(key).and_then(|subs| subs.get_mut(&id)) {
            sub.reads = reads;
        }
    }

    pub(crate) fn unsubscribe(&self, key: &TopicKey, id: u64) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = topics.get_mut(key) {
            subs.remove(&id);
            if subs.is_empty() {
                topics.remove(key);
                self.tell_watcher(key, false);
            }
        }
    }

    /// Queues `msg` for every subscriber of `key` that may read `kind`, except `exclude`;
    /// returns how many accepted it.
    pub(crate) fn fanout(
        &self,
        key: &TopicKey,
        msg: &Outgoing,
        exclude: Option<u64>,
        kind: Kind,
    ) -> usize {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = topics.get(key) else {
            return 0;
        };
        let mut delivered = 0;
        let now = crate::jwt::unix_now();
        for (id, sub) in subs {
            if sub.expires.load(Ordering::Relaxed) <= now {
                continue;
            }
            let may_read = match kind {
                Kind::Broadcast => sub.reads.broadcast,
                Kind::Presence => sub.reads.presence,
            };
            if Some(*id) == exclude || !may_read {
                continue;
            }
            if let (Some(seen), Some(origin)) = (&sub.replayed, msg.origin_id())
                && seen.contains(origin)
            {
                continue;
            }
            if let Some(frame) = msg.frame(sub.vsn)
                && sub.conn.push(frame)
            {
                delivered += 1;
            }
        }
        delivered
    }

    /// Topics, and subscriptions over all of them.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        (topics.len(), topics.values().map(HashMap::len).sum())
    }

    #[cfg(test)]
    pub(crate) fn subscriber_count(&self, key: &TopicKey) -> usize {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics.get(key).map_or(0, HashMap::len)
    }
}

/// A buffered subscription made for a join before its connection has seen the answer;
/// unsubscribed when dropped unless [`PendingSubscription::activate`]d.
pub(crate) struct PendingSubscription {
    inner: Arc<crate::Inner>,
    key: TopicKey,
    id: u64,
    staged: Option<Outbound>,
}

impl PendingSubscription {
    pub(crate) fn new(inner: Arc<crate::Inner>, key: TopicKey, id: u64, staged: Outbound) -> Self {
        PendingSubscription {
            inner,
            key,
            id,
            staged: Some(staged),
        }
    }

    /// Delivers to `conn` from now on; returns the subscription id.
    pub(crate) fn activate(mut self, conn: Arc<ConnHandle>) -> u64 {
        if let Some(staged) = self.staged.take() {
            self.inner
                .broker
                .hand_over(&self.key, self.id, staged, conn);
        }
        self.id
    }
}

impl Drop for PendingSubscription {
    fn drop(&mut self) {
        if self.staged.is_some() {
            self.inner.broker.unsubscribe(&self.key, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcast::{Body, Frame};
    use crate::protocol::Payload;
    use bytes::Bytes;

    fn key(private: bool, t: &str) -> TopicKey {
        TopicKey {
            private,
            subtopic: t.into(),
        }
    }

    fn msg(payload: Payload) -> Outgoing {
        Outgoing::new(
            "realtime:room".into(),
            Body::User {
                event: "e".into(),
                payload,
                meta: None,
            },
        )
    }

    #[tokio::test]
    async fn fanout_respects_namespace_exclusion_and_format() {
        let r = Registry::default();
        let (a, mut ra) = ConnHandle::new(8, 1 << 20);
        let (b, mut rb) = ConnHandle::new(8, 1 << 20);
        let (c, mut rc) = ConnHandle::new(8, 1 << 20);
        let (a, b, c) = (Arc::new(a), Arc::new(b), Arc::new(c));
        let ida = r.subscribe(key(false, "room"), Vsn::V2, a, Reads::ALL);
        let _idb = r.subscribe(key(false, "room"), Vsn::V1, b, Reads::ALL);
        let _idc = r.subscribe(key(true, "room"), Vsn::V2, c, Reads::ALL);

        let json = msg(Payload::Json(Bytes::from_static(b"{}")));
        assert_eq!(
            r.fanout(&key(false, "room"), &json, Some(ida), Kind::Broadcast),
            1
        );
        assert!(ra.try_recv().is_none(), "sender excluded");
        assert!(matches!(rb.try_recv(), Some(Frame::Text(_))));
        assert!(rc.try_recv().is_none(), "private namespace untouched");

        let bin = msg(Payload::Binary(Bytes::from_static(b"\x01")));
        assert_eq!(
            r.fanout(&key(false, "room"), &bin, None, Kind::Broadcast),
            1
        );
        assert!(matches!(ra.try_recv(), Some(Frame::Binary(_))));
        assert!(rb.try_recv().is_none(), "V1 never receives binary");
    }

    #[tokio::test]
    async fn fanout_respects_read_rights() {
        let r = Registry::default();
        let (p, mut rp) = ConnHandle::new(8, 1 << 20);
        let (b, mut rb) = ConnHandle::new(8, 1 << 20);
        let presence_only = Reads {
            broadcast: false,
            presence: true,
        };
        let idp = r.subscribe(key(true, "room"), Vsn::V2, Arc::new(p), presence_only);
        r.subscribe(key(true, "room"), Vsn::V2, Arc::new(b), Reads::ALL);
        let m = msg(Payload::Json(Bytes::from_static(b"{}")));
        assert_eq!(r.fanout(&key(true, "room"), &m, None, Kind::Broadcast), 1);
        assert!(rp.try_recv().is_none(), "no broadcast read");
        assert!(rb.try_recv().is_some());
        assert_eq!(r.fanout(&key(true, "room"), &m, None, Kind::Presence), 2);
        r.set_reads(&key(true, "room"), idp, Reads::ALL);
        assert_eq!(r.fanout(&key(true, "room"), &m, None, Kind::Broadcast), 2);
    }

    #[test]
    fn the_watcher_hears_a_topics_first_subscriber_and_its_last_unsubscribe() {
        #[derive(Default)]
        struct Heard(std::sync::Mutex<Vec<(bool, String, bool)>>);
        impl TopicWatcher for Heard {
            fn watched(&self, private: bool, subtopic: &str, on: bool) {
                self.0.lock().unwrap().push((private, subtopic.into(), on));
            }
        }
        let heard = Arc::new(Heard::default());
        let r = Registry::watched_by(Some(heard.clone()));
        let (a, _ra) = ConnHandle::new(8, 1 << 20);
        let a = Arc::new(a);
        let first = r.subscribe(key(false, "room"), Vsn::V2, a.clone(), Reads::ALL);
        let second = r.subscribe(key(false, "room"), Vsn::V2, a.clone(), Reads::ALL);
        let private = r.subscribe(key(true, "room"), Vsn::V2, a.clone(), Reads::ALL);
        r.unsubscribe(&key(false, "room"), first);
        assert_eq!(
            *heard.0.lock().unwrap(),
            [(false, "room".into(), true), (true, "room".into(), true)],
            "one call per topic, not per subscriber"
        );
        r.unsubscribe(&key(false, "room"), second);
        r.unsubscribe(&key(true, "room"), private);
        r.unsubscribe(&key(true, "room"), private);
        assert_eq!(
            heard.0.lock().unwrap()[2..],
            [(false, "room".into(), false), (true, "room".into(), false)]
        );
    }

    #[tokio::test]
    async fn buffered_subscriptions_keep_order_when_activated() {
        let r = Registry::default();
        let (id, staged) = r.subscribe_buffered(
            key(false, "b"),
            Vsn::V2,
            Reads::ALL,
            None,
            expiry(i64::MAX),
            (8, 1 << 20),
        );
        let m = msg(Payload::Json("1".into()));
        assert_eq!(r.fanout(&key(false, "b"), &m, None, Kind::Broadcast), 1);
        let (conn, mut rx) = ConnHandle::new(8, 1 << 20);
        let conn = Arc::new(conn);
        assert!(conn.push(Frame::Text("reply".into())));
        r.activate(&key(false, "b"), id, staged, conn);
        assert_eq!(r.fanout(&key(false, "b"), &m, None, Kind::Broadcast), 1);
        assert!(matches!(rx.try_recv(), Some(Frame::Text(t)) if t.as_str() == "reply"));
        assert!(matches!(rx.try_recv(), Some(Frame::Binary(_))));
        assert!(matches!(rx.try_recv(), Some(Frame::Binary(_))));
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn fanout_skips_expired_subscribers() {
        let r = Registry::default();
        let (a, mut ra) = ConnHandle::new(8, 1 << 20);
        let exp = expiry(crate::jwt::unix_now() + 100);
        r.subscribe_skipping(
            key(false, "e"),
            Vsn::V2,
            Arc::new(a),
            Reads::ALL,
            None,
            exp.clone(),
        );
        let m = msg(Payload::Json("1".into()));
        assert_eq!(r.fanout(&key(false, "e"), &m, None, Kind::Broadcast), 1);
        exp.store(crate::jwt::unix_now(), Ordering::Relaxed);
        assert_eq!(r.fanout(&key(false, "e"), &m, None, Kind::Broadcast), 0);
        assert!(ra.try_recv().is_some() && ra.try_recv().is_none());
    }

    #[test]
    fn unsubscribe_removes_empty_topics() {
        let r = Registry::default();
        let (a, _ra) = ConnHandle::new(1, 1 << 20);
        let id = r.subscribe(key(false, "x"), Vsn::V1, Arc::new(a), Reads::ALL);
        assert_eq!(r.subscriber_count(&key(false, "x")), 1);
        r.unsubscribe(&key(false, "x"), id);
        assert_eq!(r.subscriber_count(&key(false, "x")), 0);
        assert!(r.topics.read().unwrap().is_empty());
        assert_eq!(
            r.fanout(
                &key(false, "x"),
                &msg(Payload::Json("1".into())),
                None,
                Kind::Broadcast
            ),
            0
        );
    }

    #[tokio::test]
    async fn full_queue_marks_slow_consumer_without_blocking_others() {
        let r = Registry::default();
        let (slow, _rs) = ConnHandle::new(1, 1 << 20);
        let (fast, mut rf) = ConnHandle::new(8, 1 << 20);
        let slow = Arc::new(slow);
        r.subscribe(key(false, "x"), Vsn::V2, slow.clone(), Reads::ALL);
        r.subscribe(key(false, "x"), Vsn::V2, Arc::new(fast), Reads::ALL);
        let m = msg(Payload::Json("1".into()));
        assert_eq!(r.fanout(&key(false, "x"), &m, None, Kind::Broadcast), 2);
        assert_eq!(r.fanout(&key(false, "x"), &m, None, Kind::Broadcast), 1);
        slow.overflowed().await;
        assert!(rf.try_recv().is_some() && rf.try_recv().is_some());
    }
}
