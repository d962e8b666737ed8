//! One WebSocket connection. `socket.rs` runs the socket (frames in, the outbound queue out,
//! timers, the close); this module routes what the client sends to the module of its concern:
//!
//! - `join`: `phx_join`, its refusals and the join's authorization answer;
//! - `rights`: authorization answers of joined channels (token refresh, write checks);
//! - `broadcast`: broadcasts from the client;
//! - `presence`: `track` / `untrack`;
//! - `token`: `access_token` refreshes and token expiry;
//! - `reply`: every frame shape the connection answers with.
//!
//! Everything a client sends is untrusted: bad frames are logged and ignored, never unwrapped.

mod broadcast;
mod join;
mod presence;
mod reply;
mod rights;
mod socket;
mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Inner;
use crate::channel::Channel;
use crate::events::Authorization;
use crate::outbound::ConnHandle;
use crate::protocol::{self, Inbound, Vsn};
use crate::refusal::{Refusal, ReplyError};
use crate::registry::PendingSubscription;
use crate::usage::ConnUsage;

pub(crate) use socket::{ConnectInfo, ConnectionSlot, run};

/// What the connection knows of one topic it joined or is joining.
enum TopicState {
    /// A private join waiting for its authorization.
    Joining(PendingJoin),
    /// Boxed: a connection's map holds many, most of them joined.
    Joined(Box<Channel>),
}

struct PendingJoin {
    id: u64,
    /// The task waiting for the worker: aborting it forgets the request, so the worker skips it.
    task: tokio::task::AbortHandle,
}

impl Drop for PendingJoin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers of background tasks, handled on the connection's loop.
enum Internal {
    JoinAuthorized {
        pending_id: u64,
        joining: Box<join::Joining>,
        answer: crate::authz::Answer,
        /// A replaying join that may read was subscribed when answered; dropping this undoes it.
        subscription: Option<PendingSubscription>,
    },
    RefreshAuthorized {
        topic: String,
        generation: u64,
        answer: Result<Authorization, Refusal>,
    },
    WriteRights {
        topic: String,
        generation: u64,
        answer: Result<Authorization, Refusal>,
    },
    /// The worker stored a broadcast sent with `persist`, or says why not.
    Persisted(Box<broadcast::Persisted>),
}

/// Where background tasks send their [`Internal`] answers. Most connections never start one
/// (public channels ask the worker nothing), and a tokio channel allocates a block of 32 slots
/// when made, so it is made at the first task, and its slots hold boxes: 4 KiB per idle
/// connection otherwise.
#[derive(Default)]
struct Answers {
    tx: Option<AnswerTx>,
    rx: Option<mpsc::UnboundedReceiver<Box<Internal>>>,
}

/// A background task's way back to its connection; a connection that is gone drops answers.
#[derive(Clone)]
struct AnswerTx(mpsc::UnboundedSender<Box<Internal>>);

impl AnswerTx {
    fn send(&self, answer: Internal) {
        let _ = self.0.send(Box::new(answer));
    }
}

impl Answers {
    fn sender(&mut self) -> AnswerTx {
        if let Some(tx) = &self.tx {
            return tx.clone();
        }
        // Unbounded, but each answer is for a task the connection started, and those are
        // bounded: pending joins, one refresh and one write check per channel, persists.
        let (tx, rx) = mpsc::unbounded_channel();
        self.rx = Some(rx);
        self.tx.insert(AnswerTx(tx)).clone()
    }

    /// The next answer; pending for as long as no task was started. Never ends otherwise: the
    /// connection keeps a sender.
    async fn recv(&mut self) -> Option<Box<Internal>> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

struct Conn {
    inner: Arc<Inner>,
    vsn: Vsn,
    connect_token: String,
    headers_json: Arc<str>,
    handle: Arc<ConnHandle>,
    /// The counters [`crate::Server::usage`] reads: held write bytes live here.
    usage: Arc<ConnUsage>,
    /// Keyed by the client's topic (`realtime:<subtopic>`).
    topics: HashMap<String, TopicState>,
    /// Ids of pending joins and channel generations: each value is used once per connection,
    /// so a late answer (for a left channel, an older token) never matches.
    next_id: u64,
    answers: Answers,
    /// Join error replies waiting for `join_error_delay`.
    delayed_join_errors: Arc<AtomicUsize>,
    /// Join rate limit (token bucket): joins left, and when it was last refilled.
    join_tokens: f64,
    join_refilled: Instant,
    /// Broadcasts with `persist` waiting for the worker.
    persisting: usize,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for (_, state) in std::mem::take(&mut self.topics) {
            if let TopicState::Joined(ch) = state {
                self.leave_broker(&ch);
            }
        }
    }
}

impl Conn {
    fn new(inner: Arc<Inner>, info: ConnectInfo, usage: Arc<ConnUsage>) -> Conn {
        let join_tokens = f64::from(inner.config().join_burst.max(1));
        Conn {
            inner,
            vsn: info.vsn,
            connect_token: info.token,
            headers_json: info.headers_json,
            handle: usage.handle.clone(),
            usage,
            topics: HashMap::new(),
            next_id: 0,
            answers: Answers::default(),
            delayed_join_errors: Arc::new(AtomicUsize::new(0)),
            join_tokens,
            join_refilled: Instant::now(),
            persisting: 0,
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn channel(&self, topic: &str) -> Option<&Channel> {
        match self.topics.get(topic) {
            Some(TopicState::Joined(ch)) => Some(ch),
            _ => None,
        }
    }

    fn channel_mut(&mut self, topic: &str) -> Option<&mut Channel> {
        match self.topics.get_mut(topic) {
            Some(TopicState::Joined(ch)) => Some(ch),
            _ => None,
        }
    }

    fn channels(&self) -> impl Iterator<Item = (&String, &Channel)> {
        self.topics.iter().filter_map(|(topic, state)| match state {
            TopicState::Joined(ch) => Some((topic, &**ch)),
            TopicState::Joining(_) => None,
        })
    }

    /// Removes a joined channel (not a pending join) from the connection.
    fn take_channel(&mut self, topic: &str) -> Option<Channel> {
        self.channel(topic)?;
        match self.topics.remove(topic) {
            Some(TopicState::Joined(ch)) => Some(*ch),
            _ => None,
        }
    }

    fn on_text(&mut self, text: &str) {
        match protocol::decode_text(self.vsn, text) {
            Ok(m) => self.dispatch(m),
            Err(e) => {
                log::debug!("ignoring realtime text frame: {e}");
            }
        }
    }

    fn on_binary(&mut self, frame: Bytes) {
        match protocol::decode_binary(self.vsn, &frame) {
            Ok(m) => self.dispatch(m),
            Err(e) => log::debug!(
                "ignoring realtime binary frame ({} bytes): {e}",
                frame.len()
            ),
        }
    }

    fn dispatch(&mut self, m: Inbound) {
        if m.topic == "phoenix" {
            if m.event == "heartbeat" {
                self.reply_heartbeat(&m);
            } else {
                log::debug!(
                    "ignoring event {:?} on the phoenix topic",
                    crate::log_excerpt(&m.event)
                );
            }
            return;
        }
        if m.event == "phx_join" {
            return self.join(m);
        }
        match self.topics.get(&m.topic) {
            Some(TopicState::Joined(_)) => {}
            Some(TopicState::Joining(_)) if m.event == "phx_leave" => {
                self.topics.remove(&m.topic);
                return self.reply_ok(&m);
            }
            _ => return self.reply_error(&m, ReplyError::UnmatchedTopic),
        }
        match m.event.as_str() {
            "phx_leave" => {
                self.reply_ok(&m);
                if let Some(ch) = self.take_channel(&m.topic) {
                    self.close_channel(&m.topic, ch);
                }
            }
            "broadcast" => self.broadcast(m),
            "access_token" => self.access_token(m),
            "presence" => self.presence(m),
            other => {
                let e = ReplyError::UnsupportedEvent(other.to_string());
                self.reply_error(&m, e);
            }
        }
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::JoinAuthorized {
                pending_id,
                joining,
                answer,
                subscription,
            } => self.join_authorized(pending_id, *joining, answer, subscription),
            Internal::WriteRights {
                topic,
                generation,
                answer,
            } => self.writes_authorized(topic, generation, answer),
            Internal::RefreshAuthorized {
                topic,
                generation,
                answer,
            } => self.refresh_authorized(&topic, generation, answer),
            Internal::Persisted(p) => self.persisted(*p),
        }
    }

    /// The channel's subscription and presence go away (its leave diff goes out).
    fn leave_broker(&self, ch: &Channel) {
        self.usage.left(&ch.key);
        if let Some(id) = ch.sub_id {
            self.inner.broker.unsubscribe(&ch.key, id);
        }
        self.inner.broker.untrack(&ch.key, ch.presence_owner);
    }

    /// Leaves the broker and tells the client with `phx_close`.
    fn close_channel(&self, topic: &str, ch: Channel) {
        self.leave_broker(&ch);
        self.push_close(topic, ch.join_ref.as_deref());
    }

    /// An operator closes the connection: every channel gets a `system` error with `reason`
    /// and `phx_close`; a connection without channels gets the `system` message on the
    /// `phoenix` topic. The socket task closes the socket after writing them.
    pub(crate) fn disconnected(&mut self, reason: &str) {
        let topics: Vec<String> = self.channels().map(|(t, _)| t.clone()).collect();
        if topics.is_empty() {
            self.push_system_error(None, "phoenix", "system", reason, "");
        }
        for topic in topics {
            self.shutdown_channel(
                &topic,
                crate::refusal::ChannelClosed::Disconnected(reason.to_string()),
            );
        }
    }

    /// `system` error followed by `phx_close`, as Supabase's channel shutdown does.
    fn shutdown_channel(&mut self, topic: &str, why: crate::refusal::ChannelClosed) {
        let Some(ch) = self.take_channel(topic) else {
            return;
        };
        self.push_system_error(
            ch.join_ref.as_deref(),
            topic,
            "system",
            &why.to_string(),
            &ch.key.subtopic,
        );
        self.close_channel(topic, ch);
    }
}
