//! Broadcasts from the client: checked against the channel's write right and the payload
//! limit, then published to the topic through the broker. A broadcast with `persist` is handed
//! to the worker instead, which stores it and delivers it once committed (see `persist.rs`).

use bytes::Bytes;

use super::reply::To;
use super::{Conn, Internal};
use crate::broadcast::{Body, Outgoing};
use crate::persist::Ttl;
use crate::protocol::{Inbound, InboundPayload, UserBroadcast};
use crate::refusal::{PersistError, ReplyError};

/// The worker's answer to a stored broadcast, with what the reply needs.
pub(super) struct Persisted {
    topic: String,
    join_ref: Option<String>,
    msg_ref: Option<String>,
    generation: u64,
    /// The persistence right was checked with this request.
    checked: bool,
    ack: bool,
    answer: Result<String, PersistError>,
}

impl Conn {
    pub(super) fn broadcast(&mut self, m: Inbound) {
        let Some(ch) = self.channel(&m.topic) else {
            return;
        };
        let Some(allowed) = ch.may_broadcast() else {
            return self.hold_for_write_check(m);
        };
        if !allowed {
            // Supabase drops these silently and leaves an acking sender to time out; an error
            // reply lets `send()` resolve 'error' at once. Nothing is delivered either way.
            if ch.broadcast_ack {
                let subtopic = ch.key.subtopic.clone();
                self.reply_error(&m, ReplyError::WriteDenied { subtopic });
            }
            return;
        }
        let to = To {
            join_ref: m.join_ref.as_deref(),
            msg_ref: m.msg_ref.as_deref(),
            topic: &m.topic,
        };
        let persist = match &m.payload {
            InboundPayload::User(u) => {
                let max_ttl = self.inner.config().max_persist_ttl.as_secs();
                crate::persist::from_metadata(u.metadata.as_deref(), max_ttl)
            }
            InboundPayload::Json(_) => Ok(None),
        };
        let ttl = match persist {
            Ok(None) => None,
            Ok(Some(ttl)) => Some(ttl),
            // A malformed value is answered, ack or not: it is not what the sender meant.
            Err(e) => return self.reply_persist_error(to, &e),
        };
        if let (Some(ttl), InboundPayload::User(u)) = (ttl, &m.payload) {
            let u = u.clone();
            return self.persist(&m, u, ttl);
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
        if size > self.inner.config().max_payload_bytes {
            if ch.broadcast_ack {
                self.reply_payload_too_large(to);
            }
            return;
        }
        let exclude = if ch.broadcast_self { None } else { ch.sub_id };
        let msg = Outgoing::new(m.topic.clone(), body);
        self.inner.broker.publish(&ch.key, &msg, exclude);
        self.usage
            .broadcasts_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ch.broadcast_ack {
            self.reply_ok(to);
        }
    }
}

impl Conn {
    /// A broadcast with `persist` on a channel that may broadcast: refused here when it cannot
    /// be stored, else handed to the worker; delivered once its row committed.
    fn persist(&mut self, m: &Inbound, u: UserBroadcast, ttl: Ttl) {
        let cfg = self.inner.config();
        let to = To::from(m);
        let Some(ch) = self.channel(&m.topic) else {
            return;
        };
        let ack = ch.broadcast_ack;
        let refused = if !ch.key.private {
            Some(PersistError::PublicChannel)
        } else if ch.persist_right == Some(false) {
            Some(PersistError::Denied {
                subtopic: ch.key.subtopic.clone(),
            })
        } else if self.persisting >= cfg.max_persist_per_connection.max(1) {
            Some(PersistError::TooManyWaiting)
        } else {
            None
        };
        if u.payload.len() > cfg.max_payload_bytes {
            if ack {
                self.reply_payload_too_large(to);
            }
            return;
        }
        if let Some(e) = refused {
            if ack {
                self.reply_persist_error(to, &e);
            }
            return;
        }
        self.usage
            .broadcasts_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let check = ch.persist_right.is_none();
        let subtopic = ch.key.subtopic.clone();
        let claims = ch.claims.clone();
        let exclude = if ch.broadcast_self { None } else { ch.sub_id };
        let generation = ch.generation;
        let reply = Persisted {
            topic: m.topic.clone(),
            join_ref: m.join_ref.clone(),
            msg_ref: m.msg_ref.clone(),
            generation,
            checked: check,
            ack,
            answer: Err(PersistError::Unavailable),
        };
        self.persisting += 1;
        let inner = self.inner.clone();
        let tx = self.answers.sender();
        let headers = self.headers_json.clone();
        tokio::spawn(async move {
            let answer = inner
                .persist(crate::persist::Ask {
                    subtopic: &subtopic,
                    claims: &claims,
                    headers_json: &headers,
                    check,
                    event: u.event,
                    payload: u.payload,
                    ttl,
                    exclude,
                })
                .await;
            tx.send(Internal::Persisted(Box::new(Persisted { answer, ..reply })));
        });
    }

    /// The worker's answer: the channel learns its persistence right, an acking sender gets
    /// `{"id": ..}` or why not.
    pub(super) fn persisted(&mut self, p: Persisted) {
        self.persisting = self.persisting.saturating_sub(1);
        if let Some(ch) = self.channel_mut(&p.topic)
            && p.checked
            && ch.generation == p.generation
        {
            match &p.answer {
                Ok(_) => ch.persist_right = Some(true),
                Err(PersistError::Denied { .. }) => ch.persist_right = Some(false),
                Err(_) => {}
            }
        }
        if !p.ack {
            return;
        }
        let to = To {
            join_ref: p.join_ref.as_deref(),
            msg_ref: p.msg_ref.as_deref(),
            topic: &p.topic,
        };
        match &p.answer {
            Ok(id) => self.reply_stored(to, id),
            Err(e) => self.reply_persist_error(to, e),
        }
    }
}
