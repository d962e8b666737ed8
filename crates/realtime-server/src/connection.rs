//! One WebSocket: decodes client frames, runs the channel lifecycle (reference section 2) and
//! drains the connection's outbound queue. Everything a client sends is untrusted: bad frames are
//! logged and ignored, never unwrapped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Inner;
use crate::authz::{Ask, PreSubscribe, unauthorized_reason};
use crate::broadcast::{Body, Frame, Outgoing};
use crate::channel::{
    Channel, JoinRequest, MAX_HELD_WRITES, WriteCheck, expiry_instant, held_size, parse_join,
};
use crate::events::{Authorization, AuthorizationPurpose, ReplayParams, Replayed};
use crate::jwt::{Claims, unix_now};
use crate::outbound::ConnHandle;
use crate::presence::{Limits as PresenceLimits, contains_nul, stored_meta};
use crate::protocol::{self, Inbound, InboundPayload, Vsn};
use crate::registry::{Kind, PendingSubscription, Reads, TopicKey};

pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;
pub(crate) const CLOSE_POLICY: u16 = 1008;
const CLOSE_NORMAL: u16 = 1000;
/// Longest topic (without `realtime:`) a join or REST send may name; longer ones are refused
/// before anything copies them. The database keeps topics of up to 246 bytes, so no topic it
/// can store is refused here.
pub(crate) const MAX_SUBTOPIC_BYTES: usize = 255;
const SLOW_CONSUMER: &str = "slow consumer: outbound queue full";
/// The reply to an acked broadcast that found the channel's write-check queue full.
const TOO_MANY_HELD_WRITES: &str = "Too many messages per second";
/// The reply to a private join while this many of the connection's joins already wait for
/// their authorization (`max_pending_joins_per_connection`).
const TOO_MANY_PENDING_JOINS: &str = "ClientJoinRateLimitReached: Too many pending joins";
/// The reply to a join past the connection's join rate (`joins_per_second`, `join_burst`).
const TOO_MANY_JOINS: &str = "ClientJoinRateLimitReached: Too many joins per second";
/// The reply to a track whose meta (or presence key) contains a NUL character.
const PRESENCE_NUL: &str = "Presence meta must not contain the NUL character (\\u0000)";
/// Join error replies one connection may have waiting for `join_error_delay`.
const MAX_DELAYED_JOIN_ERRORS: usize = 16;
/// How long a closing handshake may take before the TCP connection is just dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const SLOW_CLOSE_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// What the upgrade request established.
pub(crate) struct ConnectInfo {
    pub vsn: Vsn,
    pub token: String,
    pub headers_json: Arc<str>,
}

/// Decrements the live-connection count however the connection ends (even by panic).
pub(crate) struct ConnectionSlot(pub Arc<Inner>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Internal {
    JoinAuthorized {
        pending_id: u64,
        joining: Box<Joining>,
        answer: crate::authz::Answer,
        /// A replaying join that may read was subscribed when answered; dropping this undoes it.
        subscription: Option<PendingSubscription>,
    },
    RefreshAuthorized {
        topic: String,
        generation: u64,
        answer: Result<Authorization, String>,
    },
    WriteRights {
        topic: String,
        generation: u64,
        answer: Result<Authorization, String>,
    },
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

struct Conn {
    inner: Arc<Inner>,
    vsn: Vsn,
    connect_token: String,
    headers_json: Arc<str>,
    handle: Arc<ConnHandle>,
    channels: HashMap<String, Channel>,
    /// Token generation per channel, so late authorization answers for an old token are dropped.
    generations: HashMap<String, u64>,
    pending: HashMap<String, PendingJoin>,
    next_id: u64,
    internal_tx: mpsc::UnboundedSender<Internal>,
    /// Join error replies waiting for `join_error_delay`.
    delayed_join_errors: Arc<AtomicUsize>,
    /// Join rate limit (token bucket): joins left, and when it was last refilled.
    join_tokens: f64,
    join_refilled: Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for (topic, ch) in std::mem::take(&mut self.channels) {
            if let Some(id) = ch.sub_id {
                self.inner.registry.unsubscribe(&ch.key, id);
            }
            untrack(&self.inner, &topic, &ch);
        }
    }
}

/// Removes the channel's presence (if any) and tells the topic's subscribers.
fn untrack(inner: &Inner, topic: &str, ch: &Channel) {
    if let Some(diff) = inner.presence.untrack(&ch.key, ch.presence_owner) {
        fan_presence_diff(inner, topic, &ch.key, diff);
    }
}

fn fan_presence_diff(inner: &Inner, topic: &str, key: &TopicKey, diff: Value) {
    inner.presence_diffs.add(topic, key, &diff);
}

enum Exit {
    Shutdown,
    SlowConsumer,
    Idle,
    Gone,
}

pub(crate) async fn run(socket: WebSocket, info: ConnectInfo, inner: Arc<Inner>) {
    let cfg = inner.config();
    let (handle, mut rx) = ConnHandle::new(cfg.outbound_queue, cfg.outbound_queue_bytes);
    let handle = Arc::new(handle);
    let (internal_tx, mut internal_rx) = mpsc::unbounded_channel();
    let mut conn = Conn {
        inner: inner.clone(),
        vsn: info.vsn,
        connect_token: info.token,
        headers_json: info.headers_json,
        handle: handle.clone(),
        channels: HashMap::new(),
        generations: HashMap::new(),
        pending: HashMap::new(),
        next_id: 0,
        internal_tx,
        delayed_join_errors: Arc::new(AtomicUsize::new(0)),
        join_tokens: f64::from(cfg.join_burst.max(1)),
        join_refilled: Instant::now(),
    };
    let (mut sink, mut stream) = socket.split();
    let mut shutdown = inner.shutdown.clone();
    let mut last_inbound = Instant::now();
    // The loop runs once per delivered frame, so it sets nothing up per turn: these futures
    // live as long as the connection. One timer serves the idle timeout and the channels' token
    // expiry; traffic only moves `last_inbound`, and the timer is re-armed when it fires or when
    // a token expires sooner (a reloaded idle timeout applies from the next firing).
    let timer = tokio::time::sleep_until(last_inbound + cfg.idle_timeout);
    tokio::pin!(timer);
    let overflowed = handle.overflowed();
    tokio::pin!(overflowed);
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);

    let exit = 'conn: loop {
        if let Some(expiry) = conn.next_expiry()
            && expiry < timer.deadline()
        {
            timer.as_mut().reset(expiry);
        }
        tokio::select! {
            biased;
            _ = &mut stop => break Exit::Shutdown,
            _ = &mut overflowed => break Exit::SlowConsumer,
            // Before traffic: a client that keeps the loop busy must not delay its idle close
            // or its channels' token expiry.
            _ = &mut timer => {
                if let Some(exit) = on_timer(&mut conn, timer.as_mut(), last_inbound, &inner) {
                    break exit;
                }
            }
            Some(frame) = rx.recv() => {
                // Whatever else is already queued goes out with it in one write (one system
                // call instead of one per frame).
                let write = async {
                    sink.feed(ws_message(frame)).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Some(frame) => sink.feed(ws_message(frame)).await?,
                            None => break,
                        }
                    }
                    sink.flush().await
                };
                tokio::pin!(write);
                // A stuck write must not hide a shutdown, an overflow or an expired token.
                loop {
                    tokio::select! {
                        biased;
                        sent = &mut write => {
                            if sent.is_err() {
                                break 'conn Exit::Gone;
                            }
                            break;
                        }
                        _ = &mut overflowed => break 'conn Exit::SlowConsumer,
                        _ = &mut stop => break 'conn Exit::Shutdown,
                        _ = &mut timer => {
                            if let Some(exit) =
                                on_timer(&mut conn, timer.as_mut(), last_inbound, &inner)
                            {
                                break 'conn exit;
                            }
                        }
                    }
                }
            }
            Some(internal) = internal_rx.recv() => conn.on_internal(internal),
            incoming = stream.next() => {
                last_inbound = Instant::now();
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Exit::Gone,
                    Some(Ok(Message::Text(t))) => conn.on_text(t.as_str()),
                    Some(Ok(Message::Binary(b))) => conn.on_binary(b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
        }
    };
    let close = match exit {
        Exit::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down")),
        Exit::SlowConsumer => {
            log::info!("closing a realtime connection: {SLOW_CONSUMER}");
            Some((CLOSE_POLICY, SLOW_CONSUMER))
        }
        Exit::Idle => Some((CLOSE_NORMAL, "idle timeout")),
        Exit::Gone => None,
    };
    drop(conn);
    // A slow consumer is not reading: its close frame probably cannot even be written, so it
    // gets a short try and no wait for the client's half of the handshake.
    let write_timeout = match exit {
        Exit::SlowConsumer => SLOW_CLOSE_WRITE_TIMEOUT,
        _ => CLOSE_WRITE_TIMEOUT,
    };
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let written = tokio::time::timeout(write_timeout, async {
            sink.send(frame).await?;
            sink.flush().await
        })
        .await;
        if matches!(written, Ok(Ok(()))) && !matches!(exit, Exit::SlowConsumer) {
            // Give the client a moment to answer the close handshake.
            let _ =
                tokio::time::timeout(CLOSE_WRITE_TIMEOUT, drain_until_closed(&mut stream)).await;
        }
    }
    let _ = tokio::time::timeout(write_timeout, sink.close()).await;
}

/// The idle timeout or a channel's token expiry is due: closes what expired and re-arms the
/// timer, or says the connection is idle.
fn on_timer(
    conn: &mut Conn,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    last_inbound: Instant,
    inner: &Inner,
) -> Option<Exit> {
    let idle_deadline = last_inbound + inner.config().idle_timeout;
    if idle_deadline <= Instant::now() {
        return Some(Exit::Idle);
    }
    conn.expire_tokens();
    let next = conn
        .next_expiry()
        .map_or(idle_deadline, |e| e.min(idle_deadline));
    timer.reset(next);
    None
}

/// Frames written per flush at most, so one busy connection cannot hog its thread.
const WRITE_BATCH: usize = 64;

fn ws_message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t),
        Frame::Binary(b) => Message::Binary(b),
    }
}

/// Resolves once the server shuts down (immediately if it already has).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn drain_until_closed(stream: &mut SplitStream<WebSocket>) {
    while let Some(Ok(m)) = stream.next().await {
        if matches!(m, Message::Close(_)) {
            break;
        }
    }
}

fn subtopic_of(topic: &str) -> Option<&str> {
    topic.strip_prefix("realtime:")
}

impl Conn {
    fn push(&self, frame: Frame) {
        self.handle.push(frame);
    }

    fn text(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> Frame {
        Frame::Text(Utf8Bytes::from(protocol::encode_text(
            self.vsn, join_ref, msg_ref, topic, event, payload,
        )))
    }

    fn reply(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        status: &str,
        response: Value,
    ) {
        let payload = json!({"status": status, "response": response}).to_string();
        self.push(self.text(join_ref, msg_ref, topic, "phx_reply", &payload));
    }

    fn reply_error(&self, m: &Inbound, reason: &str) {
        self.reply(
            m.join_ref.as_deref(),
            m.msg_ref.as_deref(),
            &m.topic,
            "error",
            json!({"reason": reason}),
        );
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
                self.reply(None, m.msg_ref.as_deref(), "phoenix", "ok", json!({}));
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
        if !self.channels.contains_key(&m.topic) {
            if m.event == "phx_leave" && self.pending.remove(&m.topic).is_some() {
                self.reply(
                    m.join_ref.as_deref(),
                    m.msg_ref.as_deref(),
                    &m.topic,
                    "ok",
                    json!({}),
                );
                return;
            }
            self.reply_error(&m, "unmatched topic");
            return;
        }
        match m.event.as_str() {
            "phx_leave" => {
                self.reply(
                    m.join_ref.as_deref(),
                    m.msg_ref.as_deref(),
                    &m.topic,
                    "ok",
                    json!({}),
                );
                if let Some(ch) = self.channels.remove(&m.topic) {
                    self.close_channel(&m.topic, ch);
                }
            }
            "broadcast" => self.broadcast(m),
            "access_token" => self.access_token(m),
            "presence" => self.presence(m),
            other => {
                let reason = format!("unsupported event \"{other}\"");
                self.reply_error(&m, &reason);
            }
        }
    }

    /// Unsubscribes and tells the client with `phx_close` (ref = join_ref).
    fn close_channel(&self, topic: &str, ch: Channel) {
        if let Some(id) = ch.sub_id {
            self.inner.registry.unsubscribe(&ch.key, id);
        }
        untrack(&self.inner, topic, &ch);
        let jr = ch.join_ref.as_deref();
        self.push(self.text(jr, jr, topic, "phx_close", "{}"));
    }

    /// `system` error followed by `phx_close`, as Supabase's channel shutdown does.
    fn shutdown_channel(&mut self, topic: &str, message: &str) {
        let Some(ch) = self.channels.remove(topic) else {
            return;
        };
        let payload = json!({
            "extension": "system",
            "status": "error",
            "message": message,
            "channel": ch.key.subtopic,
        })
        .to_string();
        self.push(self.text(ch.join_ref.as_deref(), None, topic, "system", &payload));
        self.close_channel(topic, ch);
    }

    /// Failed joins are answered after `join_error_delay`, like Supabase, to slow down
    /// phoenix.js's endless rejoin loop.
    fn join_error(
        &self,
        join_ref: Option<String>,
        msg_ref: Option<String>,
        topic: &str,
        reason: String,
    ) {
        log::debug!(
            "refusing join of {}: {}",
            crate::log_excerpt(topic),
            crate::log_excerpt(&reason)
        );
        let payload = json!({"status": "error", "response": {"reason": reason}}).to_string();
        let frame = self.text(
            join_ref.as_deref(),
            msg_ref.as_deref(),
            topic,
            "phx_reply",
            &payload,
        );
        let delay = self.inner.config().join_error_delay;
        // Each delayed reply holds its frame (which echoes the topic) until it is sent: past a
        // few, a client that floods refused joins gets its replies at once, into its bounded
        // queue, instead of making the server hold them.
        let delayed = self.delayed_join_errors.clone();
        if delay.is_zero() || delayed.load(Ordering::Acquire) >= MAX_DELAYED_JOIN_ERRORS {
            self.push(frame);
        } else {
            delayed.fetch_add(1, Ordering::AcqRel);
            let handle = self.handle.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                handle.push(frame);
                delayed.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// Takes one join from the connection's token bucket; false when it is empty.
    fn take_join_token(&mut self) -> bool {
        let cfg = self.inner.config();
        if cfg.joins_per_second <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.join_refilled).as_secs_f64() * cfg.joins_per_second;
        self.join_tokens = (self.join_tokens + refill).min(f64::from(cfg.join_burst.max(1)));
        self.join_refilled = now;
        if self.join_tokens < 1.0 {
            return false;
        }
        self.join_tokens -= 1.0;
        true
    }

    fn join(&mut self, m: Inbound) {
        let join_ref = m.join_ref.clone().or_else(|| m.msg_ref.clone());
        // Every join costs: a presence_state, an authorization on the worker's only Postgres
        // thread, and for a duplicate the close of the one it replaces.
        if !self.take_join_token() {
            return self.join_error(join_ref, m.msg_ref.clone(), &m.topic, TOO_MANY_JOINS.into());
        }
        let Some(subtopic) = subtopic_of(&m.topic) else {
            self.reply_error(&m, "unmatched topic");
            return;
        };
        // Checked before anything copies the topic: it becomes a map key, an authorization
        // request and a SQL parameter, and PostgreSQL text cannot hold a NUL.
        if subtopic.len() > MAX_SUBTOPIC_BYTES {
            return self.join_error(
                join_ref,
                m.msg_ref.clone(),
                &m.topic,
                format!(
                    "TopicNameTooLong: A topic name may have at most {MAX_SUBTOPIC_BYTES} bytes"
                ),
            );
        }
        if subtopic.contains('\0') {
            return self.join_error(
                join_ref,
                m.msg_ref.clone(),
                &m.topic,
                "InvalidTopicName: A topic name must not contain the NUL character".into(),
            );
        }
        let subtopic = subtopic.to_string();
        // A second join on the same topic replaces the first (Phoenix duplicate-join rule).
        if let Some(old) = self.channels.remove(&m.topic) {
            self.close_channel(&m.topic, old);
        }
        self.pending.remove(&m.topic);
        if subtopic.is_empty() {
            return self.join_error(
                join_ref,
                m.msg_ref,
                &m.topic,
                "TopicNameRequired: You must provide a topic name".into(),
            );
        }
        let req = match m.json_payload() {
            Some(p) => parse_join(p),
            None => JoinRequest::default(),
        };
        let cfg = self.inner.config();
        if cfg.private_only && !req.private {
            return self.join_error(
                join_ref,
                m.msg_ref,
                &m.topic,
                "PrivateOnly: This project only allows private channels".into(),
            );
        }
        if self.channels.len() + self.pending.len() >= cfg.max_channels_per_connection {
            return self.join_error(
                join_ref,
                m.msg_ref,
                &m.topic,
                "ChannelRateLimitReached: Too many channels".into(),
            );
        }
        let token = req
            .access_token
            .clone()
            .unwrap_or_else(|| self.connect_token.clone());
        let claims = match self.inner.jwt().verify(&token, unix_now()) {
            Ok(c) => c,
            Err(e) => return self.join_error(join_ref, m.msg_ref, &m.topic, e.join_reason()),
        };
        let replay = match req.replay {
            None => None,
            Some(_) if !req.private => {
                return self.join_error(
                    join_ref,
                    m.msg_ref,
                    &m.topic,
                    "UnableToReplayMessages: Replay is not allowed for public channels".into(),
                );
            }
            Some(Err(())) => {
                return self.join_error(
                    join_ref,
                    m.msg_ref,
                    &m.topic,
                    "UnableToReplayMessages: Replay params are not valid".into(),
                );
            }
            Some(Ok(p)) => Some(ReplayParams {
                limit: p
                    .limit
                    .clamp(1, self.inner.config().max_replay_limit.max(1) as i64),
                ..p
            }),
        };
        let joining = Joining {
            topic: m.topic.clone(),
            subtopic,
            join_ref,
            msg_ref: m.msg_ref.clone(),
            req,
            token,
            expires: crate::registry::expiry(claims.exp),
            claims,
        };
        if !joining.req.private {
            return self.finish_join(joining, None, Vec::new(), None);
        }
        if self.pending.len() >= cfg.max_pending_joins_per_connection.max(1) {
            return self.join_error(
                joining.join_ref,
                joining.msg_ref,
                &joining.topic,
                TOO_MANY_PENDING_JOINS.into(),
            );
        }
        self.next_id += 1;
        let pending_id = self.next_id;
        // A replaying join is subscribed by the worker's answer itself (see
        // `Server::complete_authorization`), so nothing committed after its snapshot is missed.
        let subscribe = replay.map(|_| PreSubscribe {
            key: TopicKey {
                private: true,
                subtopic: joining.subtopic.clone(),
            },
            vsn: self.vsn,
            expires: joining.expires.clone(),
            queue_frames: cfg.outbound_queue,
            queue_bytes: cfg.outbound_queue_bytes,
        });
        let inner = self.inner.clone();
        let tx = self.internal_tx.clone();
        let headers = self.headers_json.clone();
        let task = tokio::spawn(async move {
            let (answer, subscription) = inner
                .authorize(Ask {
                    subtopic: &joining.subtopic,
                    claims: &joining.claims,
                    headers_json: &headers,
                    presence: joining.req.presence_enabled,
                    purpose: AuthorizationPurpose::Join,
                    replay,
                    subscribe,
                })
                .await;
            let _ = tx.send(Internal::JoinAuthorized {
                pending_id,
                joining: Box::new(joining),
                answer,
                subscription,
            });
        });
        self.pending.insert(
            m.topic,
            PendingJoin {
                id: pending_id,
                task: task.abort_handle(),
            },
        );
    }

    fn finish_join(
        &mut self,
        j: Joining,
        authorization: Option<Authorization>,
        replay: Vec<Replayed>,
        subscription: Option<PendingSubscription>,
    ) {
        let key = TopicKey {
            private: j.req.private,
            subtopic: j.subtopic.clone(),
        };
        let reads = reads_of(authorization);
        // Live copies of replayed messages are skipped, so each arrives once.
        let replayed_ids: Option<Arc<HashSet<String>>> =
            (!replay.is_empty()).then(|| Arc::new(replay.iter().map(|r| r.id.clone()).collect()));
        let subscribe_now = subscription.is_none() && (reads.broadcast || reads.presence);
        let mut sub_id = subscribe_now.then(|| {
            self.inner.registry.subscribe_skipping(
                key.clone(),
                self.vsn,
                self.handle.clone(),
                reads,
                replayed_ids,
                j.expires.clone(),
            )
        });
        self.reply(
            j.join_ref.as_deref(),
            j.msg_ref.as_deref(),
            &j.topic,
            "ok",
            json!({"postgres_changes": []}),
        );
        if j.req.postgres_changes > 0 {
            // realtime-js reports CHANNEL_ERROR ("mismatch between server and client bindings")
            // and leaves on its own; this message tells the developer why.
            let payload = json!({
                "extension": "postgres_changes",
                "status": "error",
                "message": "postgres_changes is not supported by pg_realtime: use broadcast from the database (realtime.broadcast_changes / realtime.send) instead",
                "channel": j.subtopic,
            })
            .to_string();
            self.push(self.text(j.join_ref.as_deref(), None, &j.topic, "system", &payload));
        }
        self.bump_generation(&j.topic);
        let presence_key = j
            .req
            .presence_key
            .clone()
            .unwrap_or_else(|| self.inner.presence.generate_key());
        if j.req.presence_enabled && reads.presence {
            let state = self.inner.presence.state(&key);
            self.push(self.text(
                j.join_ref.as_deref(),
                None,
                &j.topic,
                "presence_state",
                &state,
            ));
        }
        for r in replay {
            let meta = json!({"replayed": true, "id": r.id}).to_string();
            let out = Outgoing::new(
                j.topic.clone(),
                Body::User {
                    event: r.event,
                    payload: r.payload,
                    meta: Some(Bytes::from(meta)),
                },
            );
            if let Some(frame) = out.frame(self.vsn) {
                self.push(frame);
            }
        }
        // Live messages that waited for this channel go out after the replayed ones.
        if let Some(subscription) = subscription {
            sub_id = Some(subscription.activate(self.handle.clone()));
        }
        let private = key.private;
        self.channels.insert(
            j.topic,
            Channel {
                presence_key,
                presence_owner: self.inner.presence.new_owner(),
                join_ref: j.join_ref,
                key,
                sub_id,
                broadcast_self: j.req.broadcast_self,
                broadcast_ack: j.req.broadcast_ack,
                expires_at: expiry_instant(j.claims.exp),
                expires: j.expires,
                token: j.token,
                claims: j.claims,
                authorization,
                presence_enabled: j.req.presence_enabled,
                presence_calls: (tokio::time::Instant::now(), 0),
                writes: WriteCheck::for_channel(private),
            },
        );
    }

    fn bump_generation(&mut self, topic: &str) -> u64 {
        let g = self.generations.entry(topic.to_string()).or_insert(0);
        *g += 1;
        *g
    }

    fn generation(&self, topic: &str) -> u64 {
        self.generations.get(topic).copied().unwrap_or(0)
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::JoinAuthorized {
                pending_id,
                joining,
                answer,
                subscription,
            } => {
                // A leave or a newer join may have superseded this one meanwhile (then the
                // subscription, if any, is dropped, which unsubscribes it).
                if self.pending.get(&joining.topic).map(|p| p.id) != Some(pending_id) {
                    return;
                }
                self.pending.remove(&joining.topic);
                match answer {
                    Ok((a, replay)) if a.broadcast_read || a.presence_read => {
                        self.finish_join(*joining, Some(a), replay, subscription)
                    }
                    Ok(_) => {
                        let reason = unauthorized_reason(&joining.subtopic);
                        self.join_error(joining.join_ref, joining.msg_ref, &joining.topic, reason)
                    }
                    Err(reason) => {
                        self.join_error(joining.join_ref, joining.msg_ref, &joining.topic, reason)
                    }
                }
            }
            Internal::WriteRights {
                topic,
                generation,
                answer,
            } => self.writes_authorized(topic, generation, answer),
            Internal::RefreshAuthorized {
                topic,
                generation,
                answer,
            } => {
                if self.generation(&topic) != generation {
                    return;
                }
                let Some(ch) = self.channels.get_mut(&topic) else {
                    return;
                };
                let subtopic = ch.key.subtopic.clone();
                let could_read = ch
                    .authorization
                    .is_some_and(|a| a.broadcast_read || a.presence_read);
                match answer {
                    Ok(a) if a.broadcast_read || a.presence_read => {
                        ch.authorization = Some(a);
                        let reads = reads_of(Some(a));
                        match ch.sub_id {
                            Some(id) => self.inner.registry.set_reads(&ch.key, id, reads),
                            None => {
                                ch.sub_id = Some(self.inner.registry.subscribe_skipping(
                                    ch.key.clone(),
                                    self.vsn,
                                    self.handle.clone(),
                                    reads,
                                    None,
                                    ch.expires.clone(),
                                ))
                            }
                        }
                    }
                    _ => {
                        let message = if could_read {
                            format!(
                                "You no longer have permission to read from this Channel topic: {subtopic}"
                            )
                        } else {
                            format!(
                                "You do not have permissions to read from this Channel topic: {subtopic}"
                            )
                        };
                        self.shutdown_channel(&topic, &message);
                    }
                }
            }
        }
    }

    /// Keeps a write on a private channel whose write rights are not known yet, and asks the
    /// worker for them once; the messages go on, in order, when the answer comes.
    fn hold_for_write_check(&mut self, m: Inbound) {
        let generation = self.generation(&m.topic);
        let max_bytes = self.inner.config().max_held_write_bytes;
        let Some(ch) = self.channels.get_mut(&m.topic) else {
            return;
        };
        match &mut ch.writes {
            WriteCheck::Running(held, bytes)
                if held.len() < MAX_HELD_WRITES && *bytes + held_size(&m) <= max_bytes =>
            {
                *bytes += held_size(&m);
                held.push(m);
            }
            WriteCheck::Running(..) => {
                // Not kept, so not silently: an acking sender learns at once, and the log says
                // which channel is writing faster than its database can authorize.
                log::info!(
                    "dropping a write on {}: {MAX_HELD_WRITES} messages or {max_bytes} bytes already wait for the channel's write check",
                    crate::log_excerpt(&m.topic)
                );
                if ch.broadcast_ack && m.event == "broadcast" {
                    self.reply_error(&m, TOO_MANY_HELD_WRITES);
                }
            }
            WriteCheck::Unchecked => {
                let topic = m.topic.clone();
                let size = held_size(&m);
                ch.writes = WriteCheck::Running(vec![m], size);
                let (subtopic, claims) = (ch.key.subtopic.clone(), ch.claims.clone());
                self.ask_writes(topic, subtopic, claims, generation);
            }
            // Not reached: callers hold only while the rights are unknown.
            WriteCheck::Known { .. } => {}
        }
    }

    fn ask_writes(&self, topic: String, subtopic: String, claims: Claims, generation: u64) {
        let presence = self
            .channels
            .get(&topic)
            .is_some_and(|ch| ch.presence_enabled);
        self.ask_in_background(
            subtopic,
            claims,
            presence,
            AuthorizationPurpose::Write,
            move |answer| Internal::WriteRights {
                topic,
                generation,
                answer,
            },
        );
    }

    /// Asks the worker for a joined channel's rights without blocking this connection; the
    /// answer comes back through `reply` to the connection's loop.
    fn ask_in_background(
        &self,
        subtopic: String,
        claims: Claims,
        presence: bool,
        purpose: AuthorizationPurpose,
        reply: impl FnOnce(Result<Authorization, String>) -> Internal + Send + 'static,
    ) {
        let inner = self.inner.clone();
        let tx = self.internal_tx.clone();
        let headers = self.headers_json.clone();
        tokio::spawn(async move {
            let answer = inner
                .authorize(Ask {
                    subtopic: &subtopic,
                    claims: &claims,
                    headers_json: &headers,
                    presence,
                    purpose,
                    replay: None,
                    subscribe: None,
                })
                .await
                .0
                .map(|(a, _)| a);
            let _ = tx.send(reply(answer));
        });
    }

    fn writes_authorized(
        &mut self,
        topic: String,
        generation: u64,
        answer: Result<Authorization, String>,
    ) {
        let current = self.generation(&topic);
        let Some(ch) = self.channels.get_mut(&topic) else {
            return;
        };
        if !matches!(ch.writes, WriteCheck::Running(..)) {
            return;
        }
        if current != generation {
            // Checked with an older token (or for an earlier join): ask again with this one.
            let (subtopic, claims) = (ch.key.subtopic.clone(), ch.claims.clone());
            return self.ask_writes(topic, subtopic, claims, current);
        }
        let a = answer.unwrap_or_default();
        let known = WriteCheck::Known {
            broadcast: a.broadcast_write,
            presence: a.presence_write,
        };
        let WriteCheck::Running(held, _) = std::mem::replace(&mut ch.writes, known) else {
            return;
        };
        for m in held {
            match m.event.as_str() {
                "broadcast" => self.broadcast(m),
                _ => self.presence(m),
            }
        }
    }

    fn broadcast(&mut self, m: Inbound) {
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        let Some(allowed) = ch.may_broadcast() else {
            return self.hold_for_write_check(m);
        };
        if !allowed {
            // Supabase drops these silently and leaves an acking sender to time out; an error
            // reply lets `send()` resolve 'error' at once. Nothing is delivered either way.
            if ch.broadcast_ack {
                let reason = format!(
                    "Unauthorized: You do not have permissions to write to this Channel topic: {}",
                    ch.key.subtopic
                );
                self.reply_error(&m, &reason);
            }
            return;
        }
        let (body, size) = match m.payload {
            InboundPayload::Json(raw) => {
                if !raw.get().trim_start().starts_with('{') {
                    log::debug!("ignoring a broadcast whose payload is not a JSON object");
                    return;
                }
                let size = raw.get().len();
                let text: Box<str> = raw.into();
                (Body::JsonObject(Bytes::from(String::from(text))), size)
            }
            InboundPayload::User(u) => {
                let size = u.payload.len();
                (
                    Body::User {
                        event: u.event,
                        payload: u.payload,
                        meta: None,
                    },
                    size,
                )
            }
        };
        let cfg = self.inner.config();
        if size > cfg.max_payload_bytes {
            if ch.broadcast_ack {
                let payload =
                    json!({"status": "error", "response": "payload_size_exceeded"}).to_string();
                self.push(self.text(
                    m.join_ref.as_deref(),
                    m.msg_ref.as_deref(),
                    &m.topic,
                    "phx_reply",
                    &payload,
                ));
            }
            return;
        }
        let exclude = if ch.broadcast_self { None } else { ch.sub_id };
        let msg = Outgoing::new(m.topic.clone(), body);
        self.inner
            .registry
            .fanout(&ch.key, &msg, exclude, Kind::Broadcast);
        if ch.broadcast_ack {
            self.reply(
                m.join_ref.as_deref(),
                m.msg_ref.as_deref(),
                &m.topic,
                "ok",
                json!({}),
            );
        }
    }

    fn access_token(&mut self, m: Inbound) {
        let Some(raw) = m.json_payload() else {
            return;
        };
        let token = match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(o)) => match o.get("access_token") {
                Some(Value::String(t)) => t.trim().to_string(),
                _ => return,
            },
            _ => return,
        };
        let Some(ch) = self.channels.get_mut(&m.topic) else {
            return;
        };
        // Opaque keys, and the token the channel already has, change nothing (reference 2.4).
        if token.is_empty() || token.starts_with("sb_") || token == ch.token {
            return;
        }
        match self.inner.jwt().verify(&token, unix_now()) {
            Err(e) => self.shutdown_channel(&m.topic, &e.system_message()),
            Ok(claims) => {
                ch.expires_at = expiry_instant(claims.exp);
                ch.expires.store(claims.exp, Ordering::Relaxed);
                ch.token = token;
                ch.claims = claims.clone();
                // The new token's write rights are checked at the next write (a check still
                // running for the old token is redone: its answer comes with an old generation).
                if ch.key.private && matches!(ch.writes, WriteCheck::Known { .. }) {
                    ch.writes = WriteCheck::Unchecked;
                }
                let private = ch.key.private;
                let subtopic = ch.key.subtopic.clone();
                let presence = ch.presence_enabled;
                if private {
                    let generation = self.bump_generation(&m.topic);
                    let topic = m.topic.clone();
                    self.ask_in_background(
                        subtopic,
                        claims,
                        presence,
                        AuthorizationPurpose::TokenRefresh,
                        move |answer| Internal::RefreshAuthorized {
                            topic,
                            generation,
                            answer,
                        },
                    );
                }
            }
        }
    }

    /// `track`/`untrack` (reference 4.1). Any channel may track; diffs go to every subscriber
    /// of the topic, the tracker included.
    fn presence(&mut self, m: Inbound) {
        let cfg = self.inner.config();
        let Some(ch) = self.channels.get_mut(&m.topic) else {
            return;
        };
        if ch.may_track().is_none() {
            return self.hold_for_write_check(m);
        }
        // Supabase's per-channel limit: a fixed window of presence calls.
        if cfg.presence_calls_limit > 0 {
            let (start, calls) = &mut ch.presence_calls;
            if start.elapsed() >= cfg.presence_calls_window {
                *start = tokio::time::Instant::now();
                *calls = 0;
            }
            *calls += 1;
            if *calls > cfg.presence_calls_limit {
                return self.shutdown_channel(&m.topic, "Client presence rate limit exceeded");
            }
        }
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        // Typed, with the meta kept raw: its size is checked before anything is built from it.
        #[derive(serde::Deserialize)]
        struct Push<'a> {
            #[serde(default)]
            event: Option<String>,
            #[serde(borrow, default)]
            payload: Option<&'a serde_json::value::RawValue>,
        }
        let push: Option<Push> = m
            .json_payload()
            .and_then(|raw| serde_json::from_str(raw.get()).ok());
        let kind = push
            .as_ref()
            .and_then(|p| p.event.as_deref())
            .map(str::to_ascii_lowercase);
        if ch.may_track() != Some(true) {
            self.reply(
                m.join_ref.as_deref(),
                m.msg_ref.as_deref(),
                &m.topic,
                "error",
                json!({}),
            );
            return;
        }
        match kind.as_deref() {
            Some("track") => {
                let size = m.json_payload().map_or(0, |p| p.get().len());
                if size > cfg.max_payload_bytes {
                    return self.shutdown_channel(&m.topic, "Track message size exceeded");
                }
                let Some(raw) = push.as_ref().and_then(|p| p.payload) else {
                    return self.reply_error(&m, "Presence track payload must be a map");
                };
                if raw.get().len() > cfg.max_presence_meta_bytes {
                    let reason = format!(
                        "Presence meta is too large: at most {} bytes",
                        cfg.max_presence_meta_bytes
                    );
                    return self.reply_error(&m, &reason);
                }
                let meta = match serde_json::from_str::<Value>(raw.get()) {
                    Ok(meta @ Value::Object(_)) => meta,
                    _ => return self.reply_error(&m, "Presence track payload must be a map"),
                };
                // PostgreSQL text and jsonb cannot hold NUL: such a meta would make the worker's
                // SQL mirror of presence fail for everyone's changes in its batch.
                if contains_nul(&meta) || ch.presence_key.contains('\0') {
                    return self.reply_error(&m, PRESENCE_NUL);
                }
                let Value::Object(meta) = meta else {
                    return;
                };
                let tracked = self.inner.presence.track(
                    &ch.key,
                    ch.presence_owner,
                    &ch.presence_key,
                    stored_meta(meta),
                    PresenceLimits::of(&cfg),
                );
                match tracked {
                    Ok(Some(diff)) => fan_presence_diff(&self.inner, &m.topic, &ch.key, diff),
                    Ok(None) => {}
                    Err(e) => return self.reply_error(&m, e.reason()),
                }
                self.reply(
                    m.join_ref.as_deref(),
                    m.msg_ref.as_deref(),
                    &m.topic,
                    "ok",
                    json!({}),
                );
            }
            Some("untrack") => {
                untrack(&self.inner, &m.topic, ch);
                self.reply(
                    m.join_ref.as_deref(),
                    m.msg_ref.as_deref(),
                    &m.topic,
                    "ok",
                    json!({}),
                );
            }
            _ => self.reply_error(&m, "presence event must be \"track\" or \"untrack\""),
        }
    }

    /// When the first of the channels' tokens expires.
    fn next_expiry(&self) -> Option<Instant> {
        self.channels.values().map(|c| c.expires_at).min()
    }

    fn expire_tokens(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        let now_unix = unix_now();
        for topic in expired {
            let Some(ch) = self.channels.get(&topic) else {
                continue;
            };
            let ago = (now_unix - ch.claims.exp).max(0);
            self.shutdown_channel(&topic, &format!("Token has expired {ago} seconds ago"));
        }
    }
}

/// Public channels (no authorization) read everything.
fn reads_of(authorization: Option<Authorization>) -> Reads {
    authorization.map_or(Reads::ALL, |a| Reads {
        broadcast: a.broadcast_read,
        presence: a.presence_read,
    })
}

struct Joining {
    topic: String,
    subtopic: String,
    join_ref: Option<String>,
    msg_ref: Option<String>,
    req: JoinRequest,
    token: String,
    claims: Claims,
    expires: crate::registry::Expiry,
}
