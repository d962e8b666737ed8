//! Messages from the network threads to the Postgres main thread. They are queued here and the
//! eventfd makes the main thread's WaitLatchOrSocket return.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::jwt::Claims;
use crate::wake::WakeFd;

#[derive(Debug)]
pub enum Event {
    /// The server cannot continue; the worker should exit(1) and be restarted by the postmaster.
    Fatal(String),
    /// Run the RLS checks for a private channel and answer with
    /// [`crate::Server::complete_authorization`] (only produced when
    /// [`crate::Config::authorize_private`] is true).
    Authorize(AuthorizationRequest),
    /// A socket's presence changed; the worker mirrors it so SQL can read it.
    Presence(PresenceChange),
    /// Store a client broadcast sent with `persist` in `realtime.messages` (after checking the
    /// persistence right when `check` is set) and answer with
    /// [`crate::Server::complete_persist`]. The committed row is delivered like any database
    /// message.
    Persist(PersistRequest),
}

/// A client broadcast to store. `claims`, `headers_json` and `subtopic` are set for the
/// persistence check as for a write check ([`AuthorizationRequest`]).
#[derive(Clone, Debug)]
pub struct PersistRequest {
    pub id: u64,
    pub subtopic: String,
    pub claims: Claims,
    pub headers_json: String,
    /// The persistence right is not known yet: probe the INSERT policies with
    /// `extension = 'persistence'` first (the broadcast write right was checked already).
    pub check: bool,
    pub event: String,
    pub payload: crate::protocol::Payload,
    /// Seconds the message is kept (`expires_at`), at most `realtime.retention`.
    pub ttl_seconds: Option<u64>,
}

impl PersistRequest {
    /// What the request holds, as counted against the queue's byte bound.
    pub(crate) fn size(&self) -> usize {
        self.subtopic.len()
            + self.claims.json.len()
            + self.headers_json.len()
            + self.event.len()
            + self.payload.len()
    }
}

/// One change of socket presence. `owner` identifies the joined channel that tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceChange {
    Tracked {
        /// The owner had a meta already, which this one replaces (a presence update).
        updated: bool,
        topic: String,
        private: bool,
        key: String,
        owner: u64,
        phx_ref: String,
        meta_json: String,
    },
    Untracked {
        topic: String,
        private: bool,
        key: String,
        owner: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationPurpose {
    /// `phx_join` on a private channel: the read checks (SELECT policies).
    Join,
    /// A new `access_token` on a joined private channel: read checks again.
    TokenRefresh,
    /// The first broadcast or presence message on a private channel, or a private REST
    /// broadcast: the write checks (INSERT policies), of presence too when `presence` is set.
    Write,
}

/// What the worker must check. `claims.json` goes to `request.jwt.claims`, `claims.role` to
/// `role`, `claims.sub` to `request.jwt.claim.sub`, `subtopic` to `realtime.topic`.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest {
    pub id: u64,
    pub subtopic: String,
    pub claims: Claims,
    /// JSON object of request headers (WebSocket: only `x-*` headers, as Supabase does).
    pub headers_json: String,
    /// Presence is enabled on the join, so the presence extension should be probed too.
    pub presence: bool,
    pub purpose: AuthorizationPurpose,
    /// Broadcast Replay asked by the join (Supabase's `config.broadcast.replay`); the worker answers with the stored
    /// messages when the read check passes. `limit` is already clamped to the setting.
    pub replay: Option<ReplayParams>,
    /// A private channel: its RLS policies decide. Only a public join that asked for replay
    /// (with `realtime.public_replay` on) reaches the worker without it, and may read.
    pub private: bool,
}

/// `config.broadcast.replay` of a join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayParams {
    pub from: ReplayFrom,
    pub limit: i64,
}

/// Where a replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Supabase's `since`: the newest messages stored since this many milliseconds since the
    /// epoch.
    Since(i64),
    /// `offset`: every message stored after this one (resume).
    After(crate::offset::Offset),
}

/// The stored messages a join gets before live ones, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    pub messages: Vec<Replayed>,
    /// Messages after the asked offset that the replay could not give; told to the client.
    pub gap: Option<ReplayGap>,
}

/// Why a resume could not give every message after its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayGap {
    /// More messages followed than the limit allowed: only the newest were replayed.
    Limit { limit: i64 },
    /// Messages after the offset may have been removed (retention) or never stored with an
    /// offset (a crash of the server right after they were delivered).
    NotKept,
    /// The message at the offset itself is not stored: the offset came from a message a crash
    /// took back (a transaction committed without waiting for the disk) or that was deleted,
    /// so what followed it cannot be told apart from what came after the restart.
    UnknownOffset,
}

/// A stored broadcast message sent to a joining client with `meta.replayed`.
#[derive(Clone, Debug)]
pub struct Replayed {
    pub id: String,
    pub event: String,
    pub payload: crate::protocol::Payload,
    /// Its offset; None for a message stored before offsets were kept.
    pub offset: Option<crate::offset::Offset>,
}

/// The worker's answer: which extensions the token may read/write on that topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Authorization {
    pub broadcast_read: bool,
    pub broadcast_write: bool,
    pub presence_read: bool,
    pub presence_write: bool,
}

struct Queued {
    events: VecDeque<Event>,
    /// How many of `events` are [`Event::Authorize`].
    authorizations: usize,
    /// How many of `events` are [`Event::Persist`], and their bytes.
    persists: usize,
    persist_bytes: usize,
}

pub(crate) struct EventQueue {
    queue: Mutex<Queued>,
    wake: WakeFd,
}

impl EventQueue {
    pub(crate) fn new(wake: WakeFd) -> Self {
        EventQueue {
            queue: Mutex::new(Queued {
                events: VecDeque::new(),
                authorizations: 0,
                persists: 0,
                persist_bytes: 0,
            }),
            wake,
        }
    }

    pub(crate) fn push(&self, event: Event) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(event, Event::Authorize(_)) {
            q.authorizations += 1;
        }
        q.events.push_back(event);
        drop(q);
        self.wake.signal();
    }

    /// Queues an authorization request unless `limit` live ones are queued already. Requests
    /// nobody waits for any more (`live` says no) are dropped from the queue when it holds twice
    /// `limit` of them, so joins that are left at once cannot grow it while the worker is busy.
    pub(crate) fn push_authorize(
        &self,
        request: AuthorizationRequest,
        limit: usize,
        live: impl Fn(u64) -> bool,
    ) -> bool {
        let limit = limit.max(1);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.authorizations >= limit.saturating_mul(2) {
            q.events.retain(|e| match e {
                Event::Authorize(r) => live(r.id),
                _ => true,
            });
            q.authorizations = q
                .events
                .iter()
                .filter(|e| matches!(e, Event::Authorize(_)))
                .count();
            if q.authorizations >= limit {
                return false;
            }
        }
        q.authorizations += 1;
        q.events.push_back(Event::Authorize(request));
        drop(q);
        self.wake.signal();
        true
    }

    /// Queues a request to store a message unless `max` requests or `max_bytes` bytes of them
    /// wait already (one request still fits an empty queue).
    pub(crate) fn push_persist(
        &self,
        request: PersistRequest,
        max: usize,
        max_bytes: usize,
    ) -> bool {
        let size = request.size();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.persists >= max.max(1)
            || (q.persists > 0 && q.persist_bytes.saturating_add(size) > max_bytes)
        {
            return false;
        }
        q.persists += 1;
        q.persist_bytes += size;
        q.events.push_back(Event::Persist(request));
        drop(q);
        self.wake.signal();
        true
    }

    /// Wakes the main thread without an event (it has something else to look at).
    pub(crate) fn nudge(&self) {
        self.wake.signal();
    }

    /// Resets the eventfd before draining, so an event pushed concurrently either is drained
    /// now or leaves the fd readable for the next wait.
    pub(crate) fn drain(&self) -> Vec<Event> {
        self.wake.reset();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.authorizations = 0;
        q.persists = 0;
        q.persist_bytes = 0;
        q.events.drain(..).collect()
    }

    /// Events not drained yet.
    pub(crate) fn len(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .len()
    }

    pub(crate) fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake::is_readable;

    #[test]
    fn push_wakes_and_drain_resets() {
        let q = EventQueue::new(WakeFd::new().unwrap());
        assert!(!is_readable(q.wake_fd()));
        q.push(Event::Fatal("a".into()));
        q.push(Event::Fatal("b".into()));
        assert!(is_readable(q.wake_fd()));
        let got = q.drain();
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Event::Fatal(m) if m == "a"));
        assert!(!is_readable(q.wake_fd()));
        assert!(q.drain().is_empty());
    }
}
