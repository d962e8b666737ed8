//! The rights of joined private channels: answers to token-refresh read checks, and the write
//! check asked at a channel's first write, with the writes held until it is answered.

use super::{Conn, Internal};
use crate::broker::Subscriber;
use crate::channel::{Check, HeldWrites, MAX_HELD_WRITES, WriteCheck};
use crate::events::{Authorization, AuthorizationPurpose};
use crate::jwt::Claims;
use crate::protocol::Inbound;
use crate::refusal::{ChannelClosed, Refusal, ReplyError};
use crate::registry::Reads;

/// Public channels (no authorization) read everything.
pub(super) fn reads_of(authorization: Option<Authorization>) -> Reads {
    authorization.map_or(Reads::ALL, |a| Reads::of(&a))
}

impl Conn {
    /// Asks the worker for a joined channel's rights without blocking this connection; the
    /// answer comes back through `reply` to the connection's loop.
    pub(super) fn ask_in_background(
        &mut self,
        subtopic: String,
        claims: Claims,
        presence: bool,
        purpose: AuthorizationPurpose,
        reply: impl FnOnce(Result<Authorization, Refusal>) -> Internal + Send + 'static,
    ) -> Check {
        let inner = self.inner.clone();
        let tx = self.answers.sender();
        let headers = self.headers_json.clone();
        let task = tokio::spawn(async move {
            let answer = inner
                .authorize(crate::authz::Ask {
                    subtopic: &subtopic,
                    claims: &claims,
                    headers_json: &headers,
                    presence,
                    purpose,
                    replay: None,
                    private: true,
                    subscribe: None,
                })
                .await
                .0
                .map(|(a, _)| a);
            tx.send(reply(answer));
        });
        Check(task.abort_handle())
    }

    /// The read check after a token refresh: new read rights, or the channel is closed.
    pub(super) fn refresh_authorized(
        &mut self,
        topic: &str,
        generation: u64,
        answer: Result<Authorization, Refusal>,
    ) {
        let inner = self.inner.clone();
        let (vsn, handle) = (self.vsn, self.handle.clone());
        let Some(ch) = self.channel_mut(topic) else {
            return;
        };
        if ch.generation != generation {
            return;
        }
        let could_read = ch
            .authorization
            .is_some_and(|a| a.broadcast_read || a.presence_read);
        match answer {
            Ok(a) if a.broadcast_read || a.presence_read => {
                ch.authorization = Some(a);
                let reads = reads_of(Some(a));
                match ch.sub_id {
                    Some(id) => inner.broker.set_reads(&ch.key, id, reads),
                    None => {
                        ch.sub_id = Some(inner.broker.subscribe(
                            ch.key.clone(),
                            Subscriber {
                                vsn,
                                expires: ch.expires.clone(),
                                conn: handle,
                                reads,
                                replayed: None,
                            },
                        ))
                    }
                }
            }
            _ => {
                let subtopic = ch.key.subtopic.clone();
                let why = if could_read {
                    ChannelClosed::ReadRevoked { subtopic }
                } else {
                    ChannelClosed::ReadDenied { subtopic }
                };
                self.shutdown_channel(topic, why);
            }
        }
    }

    /// Keeps a write on a private channel whose write rights are not known yet, and asks the
    /// worker for them once; the messages go on, in order, when the answer comes.
    pub(super) fn hold_for_write_check(&mut self, m: Inbound) {
        let max_bytes = self.inner.config().max_held_write_bytes;
        let usage = self.usage.clone();
        let Some(ch) = self.channel_mut(&m.topic) else {
            return;
        };
        let refused = match &mut ch.writes {
            WriteCheck::Running(held) => held.hold(m, max_bytes),
            WriteCheck::Unchecked => {
                let topic = m.topic.clone();
                let mut held = HeldWrites::new(usage);
                match held.hold(m, max_bytes) {
                    None => {
                        ch.writes = WriteCheck::Running(held);
                        self.ask_writes(topic);
                        None
                    }
                    // Nothing held, so nothing asked: the next write asks.
                    Some(m) => Some(m),
                }
            }
            // Not reached: callers hold only while the rights are unknown.
            WriteCheck::Known { .. } => None,
        };
        let Some(m) = refused else {
            return;
        };
        // Not kept, so not silently: an acking sender learns at once, and the log says which
        // channel is writing faster than its database can authorize.
        log::info!(
            "dropping a write on {}: {MAX_HELD_WRITES} messages on the channel or {max_bytes} bytes on the connection already wait for write checks",
            crate::log_excerpt(&m.topic)
        );
        let ack = self.channel(&m.topic).is_some_and(|ch| ch.broadcast_ack);
        if ack && m.event == "broadcast" {
            self.reply_error(&m, ReplyError::TooManyHeldWrites);
        }
    }

    /// Asks for the write rights of the channel's current token.
    fn ask_writes(&mut self, topic: String) {
        let Some(ch) = self.channel(&topic) else {
            return;
        };
        let generation = ch.generation;
        let check = self.ask_in_background(
            ch.key.subtopic.clone(),
            ch.claims.clone(),
            ch.presence_enabled,
            AuthorizationPurpose::Write,
            {
                let topic = topic.clone();
                move |answer| Internal::WriteRights {
                    topic,
                    generation,
                    answer,
                }
            },
        );
        if let Some(ch) = self.channel_mut(&topic) {
            ch.write_check = Some(check);
        }
    }

    pub(super) fn writes_authorized(
        &mut self,
        topic: String,
        generation: u64,
        answer: Result<Authorization, Refusal>,
    ) {
        let Some(ch) = self.channel_mut(&topic) else {
            return;
        };
        if !matches!(ch.writes, WriteCheck::Running(..)) {
            return;
        }
        if ch.generation != generation {
            // Checked with an older token (or for an earlier join): ask again with this one.
            return self.ask_writes(topic);
        }
        let a = answer.unwrap_or_default();
        let known = WriteCheck::Known {
            broadcast: a.broadcast_write,
            presence: a.presence_write,
        };
        let WriteCheck::Running(held) = std::mem::replace(&mut ch.writes, known) else {
            return;
        };
        for m in held.take() {
            match m.event.as_str() {
                "broadcast" => self.broadcast(m),
                _ => self.presence(m),
            }
        }
    }
}
