//! `phx_join`: the checks that may refuse it, the authorization of private joins, and the
//! joined channel's start (reply, presence state, replayed messages, subscription).

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::{Conn, Internal, PendingJoin, TopicState};
use crate::authz::{Answer, Ask, PreSubscribe};
use crate::broadcast::{Body, Outgoing};
use crate::broker::Subscriber;
use crate::channel::{Channel, JoinRequest, WriteCheck, expiry_instant, parse_join};
use crate::events::{Authorization, AuthorizationPurpose, Replay, ReplayFrom, ReplayParams};
use crate::jwt::{Claims, unix_now};
use crate::protocol::Inbound;
use crate::refusal::{POSTGRES_CHANGES_UNSUPPORTED, Refusal, ReplyError, replay_gap_message};
use crate::registry::{Expiry, PendingSubscription, replayed_ids};
use crate::topic::{self, MAX_SUBTOPIC_BYTES, TopicKey};

/// Supabase's `config.broadcast.replay.limit` when a `since` replay gives none.
const SUPABASE_REPLAY_LIMIT: i64 = 25;

/// A join that passed the connection's checks.
pub(super) struct Joining {
    topic: String,
    subtopic: String,
    join_ref: Option<String>,
    msg_ref: Option<String>,
    req: JoinRequest,
    token: String,
    claims: Claims,
    expires: Expiry,
}

impl Conn {
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

    pub(super) fn join(&mut self, m: Inbound) {
        let join_ref = m.join_ref.clone().or_else(|| m.msg_ref.clone());
        let refuse = |conn: &Conn, refusal: Refusal| {
            conn.refuse_join(join_ref.as_deref(), m.msg_ref.as_deref(), &m.topic, refusal)
        };
        // Every join costs: a presence_state, an authorization on the worker's only Postgres
        // thread, and for a duplicate the close of the one it replaces.
        if !self.take_join_token() {
            return refuse(self, Refusal::TooManyJoins);
        }
        let Some(subtopic) = topic::subtopic(&m.topic) else {
            return self.reply_error(&m, ReplyError::UnmatchedTopic);
        };
        // Checked before anything copies the topic: it becomes a map key, an authorization
        // request and a SQL parameter, and PostgreSQL text cannot hold a NUL.
        if subtopic.len() > MAX_SUBTOPIC_BYTES {
            return refuse(self, Refusal::TopicTooLong);
        }
        if subtopic.contains('\0') {
            return refuse(self, Refusal::TopicHasNul);
        }
        let subtopic = subtopic.to_string();
        // A second join on the same topic replaces the first (Phoenix duplicate-join rule); a
        // pending one is forgotten.
        if let Some(TopicState::Joined(old)) = self.topics.remove(&m.topic) {
            self.close_channel(&m.topic, *old);
        }
        if subtopic.is_empty() {
            return refuse(self, Refusal::TopicRequired);
        }
        let req = match m.json_payload() {
            Some(p) => parse_join(p),
            None => JoinRequest::default(),
        };
        let cfg = self.inner.config();
        if cfg.private_only && !req.private {
            return refuse(self, Refusal::PrivateOnly);
        }
        if self.topics.len() >= cfg.max_channels_per_connection {
            return refuse(self, Refusal::TooManyChannels);
        }
        let token = req
            .access_token
            .clone()
            .unwrap_or_else(|| self.connect_token.clone());
        let claims = match self.inner.jwt().verify(&token, unix_now()) {
            Ok(c) => c,
            Err(e) => return refuse(self, Refusal::Token(e)),
        };
        let replay = match req.replay {
            None => None,
            Some(_) if !req.private && !cfg.public_replay => {
                return refuse(self, Refusal::ReplayOnPublic);
            }
            Some(Err(())) => return refuse(self, Refusal::ReplayInvalid),
            Some(Ok(ask)) => {
                let max = cfg.max_replay_limit.max(1) as i64;
                // `since` keeps Supabase's default of 25; a resume wants all it missed.
                let default = match ask.from {
                    ReplayFrom::Since(_) => SUPABASE_REPLAY_LIMIT,
                    ReplayFrom::After(_) => max,
                };
                Some(ReplayParams {
                    from: ask.from,
                    limit: ask.limit.unwrap_or(default).clamp(1, max),
                })
            }
        };
        if req.private {
            let pending = self
                .topics
                .values()
                .filter(|s| matches!(s, TopicState::Joining(_)))
                .count();
            if pending >= cfg.max_pending_joins_per_connection.max(1) {
                return refuse(self, Refusal::TooManyPendingJoins);
            }
        }
        let joining = Joining {
            topic: m.topic.clone(),
            subtopic,
            join_ref,
            msg_ref: m.msg_ref,
            req,
            token,
            expires: crate::registry::expiry(claims.exp),
            claims,
        };
        if joining.req.private || replay.is_some() {
            self.authorize_join(joining, replay);
        } else {
            self.start_channel(joining, None, Replay::default(), None);
        }
    }

    /// Asks the worker for a private join's read rights; the answer comes back as
    /// [`Internal::JoinAuthorized`].
    fn authorize_join(&mut self, joining: Joining, replay: Option<ReplayParams>) {
        let cfg = self.inner.config();
        let pending_id = self.next_id();
        // A replaying join is subscribed by the worker's answer itself (see
        // `Server::complete_authorization`), so nothing committed after its snapshot is missed.
        let subscribe = replay.map(|_| PreSubscribe {
            key: TopicKey {
                private: joining.req.private,
                subtopic: joining.subtopic.clone(),
            },
            vsn: self.vsn,
            expires: joining.expires.clone(),
            queue_frames: cfg.outbound_queue,
            queue_bytes: cfg.outbound_queue_bytes,
        });
        let topic = joining.topic.clone();
        let inner = self.inner.clone();
        let tx = self.answers.sender();
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
                    private: joining.req.private,
                    subscribe,
                })
                .await;
            tx.send(Internal::JoinAuthorized {
                pending_id,
                joining: Box::new(joining),
                answer,
                subscription,
            });
        });
        self.topics.insert(
            topic,
            TopicState::Joining(PendingJoin {
                id: pending_id,
                task: task.abort_handle(),
            }),
        );
    }

    pub(super) fn join_authorized(
        &mut self,
        pending_id: u64,
        joining: Joining,
        answer: Answer,
        subscription: Option<PendingSubscription>,
    ) {
        // A leave or a newer join may have superseded this one meanwhile (then the
        // subscription, if any, is dropped, which unsubscribes it).
        match self.topics.get(&joining.topic) {
            Some(TopicState::Joining(p)) if p.id == pending_id => {}
            _ => return,
        }
        self.topics.remove(&joining.topic);
        let refusal = match answer {
            Ok((a, replay)) if a.broadcast_read || a.presence_read => {
                // A public channel came here only to replay; RLS rights are for private ones.
                let authorization = joining.req.private.then_some(a);
                return self.start_channel(joining, authorization, replay, subscription);
            }
            Ok(_) => Refusal::ReadDenied {
                subtopic: joining.subtopic,
            },
            Err(refusal) => refusal,
        };
        self.refuse_join(
            joining.join_ref.as_deref(),
            joining.msg_ref.as_deref(),
            &joining.topic,
            refusal,
        );
    }

    /// The join is accepted: reply, presence state, replayed messages, then live messages.
    fn start_channel(
        &mut self,
        j: Joining,
        authorization: Option<Authorization>,
        replay: Replay,
        subscription: Option<PendingSubscription>,
    ) {
        let key = TopicKey {
            private: j.req.private,
            subtopic: j.subtopic,
        };
        let reads = super::rights::reads_of(authorization);
        let replayed = replayed_ids(&replay.messages);
        let subscribe_now = subscription.is_none() && (reads.broadcast || reads.presence);
        let mut sub_id = subscribe_now.then(|| {
            self.inner.broker.subscribe(
                key.clone(),
                Subscriber {
                    vsn: self.vsn,
                    expires: j.expires.clone(),
                    conn: self.handle.clone(),
                    reads,
                    replayed,
                },
            )
        });
        let join_ref = j.join_ref.as_deref();
        self.reply_joined(join_ref, j.msg_ref.as_deref(), &j.topic);
        if j.req.postgres_changes > 0 {
            // realtime-js reports CHANNEL_ERROR ("mismatch between server and client bindings")
            // and leaves on its own; this message tells the developer why.
            self.push_system_error(
                join_ref,
                &j.topic,
                "postgres_changes",
                POSTGRES_CHANGES_UNSUPPORTED,
                &key.subtopic,
            );
        }
        let presence_key = j
            .req
            .presence_key
            .clone()
            .unwrap_or_else(|| self.inner.broker.generate_presence_key());
        if j.req.presence_enabled && reads.presence {
            let state = self.inner.broker.presence_state(&key);
            self.push_presence_state(join_ref, &j.topic, &state);
        }
        if let Some(gap) = replay.gap {
            self.push_system_error(
                join_ref,
                &j.topic,
                "broadcast",
                &replay_gap_message(gap),
                &key.subtopic,
            );
        }
        self.inner
            .metrics
            .messages_in(crate::metrics::Source::Replay, replay.messages.len() as u64);
        for r in replay.messages {
            let mut meta = json!({"replayed": true, "id": r.id});
            if let Some(offset) = r.offset {
                meta["offset"] = json!(offset.to_string());
            }
            let meta = meta.to_string();
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
        self.usage.joined(&key);
        self.usage.set_identity(&j.claims);
        let channel = Channel {
            presence_key,
            presence_owner: self.inner.broker.new_presence_owner(),
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
            presence_calls: (Instant::now(), 0),
            writes: WriteCheck::for_channel(private),
            generation: self.next_id(),
            refresh_check: None,
            write_check: None,
            persist_right: None,
        };
        self.topics
            .insert(j.topic, TopicState::Joined(Box::new(channel)));
    }
}
