//! Broadcasts from the client: checked against the channel's write right and the payload
//! limit, then published to the topic through the broker.

use bytes::Bytes;

use super::Conn;
use super::reply::To;
use crate::broadcast::{Body, Outgoing};
use crate::protocol::{Inbound, InboundPayload};
use crate::refusal::ReplyError;

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
