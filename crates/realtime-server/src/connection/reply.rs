//! Every frame shape the connection itself sends (broadcasts and presence diffs are the
//! broker's): one helper per shape.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tungstenite::Utf8Bytes;

use super::Conn;
use crate::broadcast::Frame;
use crate::protocol::{self, Inbound};
use crate::refusal::{PAYLOAD_SIZE_EXCEEDED, PersistError, Refusal, ReplyError};

/// Join error replies one connection may have waiting for `join_error_delay`.
const MAX_DELAYED_JOIN_ERRORS: usize = 16;

/// What a reply echoes of the message it answers: its refs and topic. Built from the message's
/// fields, so a handler may move the message's payload and still reply.
#[derive(Clone, Copy)]
pub(super) struct To<'a> {
    pub join_ref: Option<&'a str>,
    pub msg_ref: Option<&'a str>,
    pub topic: &'a str,
}

impl<'a> From<&'a Inbound> for To<'a> {
    fn from(m: &'a Inbound) -> Self {
        To {
            join_ref: m.join_ref.as_deref(),
            msg_ref: m.msg_ref.as_deref(),
            topic: &m.topic,
        }
    }
}

impl Conn {
    pub(super) fn push(&self, frame: Frame) {
        self.handle.push(frame);
    }

    fn frame(
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

    /// `phx_reply` with `{"status": .., "response": ..}`, the shape of every reply.
    fn reply_frame(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        status: &str,
        response: Value,
    ) -> Frame {
        let payload = json!({"status": status, "response": response}).to_string();
        self.frame(join_ref, msg_ref, topic, "phx_reply", &payload)
    }

    fn reply(&self, to: To<'_>, status: &str, response: Value) {
        let frame = self.reply_frame(to.join_ref, to.msg_ref, to.topic, status, response);
        self.push(frame);
    }

    /// `ok` with an empty response.
    pub(super) fn reply_ok<'a>(&self, to: impl Into<To<'a>>) {
        self.reply(to.into(), "ok", json!({}));
    }

    /// `ok` to a heartbeat (only the message ref is echoed).
    pub(super) fn reply_heartbeat(&self, m: &Inbound) {
        let frame = self.reply_frame(None, m.msg_ref.as_deref(), "phoenix", "ok", json!({}));
        self.push(frame);
    }

    /// `error` with `{"reason": ..}`.
    pub(super) fn reply_error<'a>(&self, to: impl Into<To<'a>>, e: ReplyError) {
        self.reply(to.into(), "error", json!({"reason": e.to_string()}));
    }

    /// `ok` to an acked broadcast that was stored: `{"id": <the row's id>}`.
    pub(super) fn reply_stored<'a>(&self, to: impl Into<To<'a>>, id: &str) {
        self.reply(to.into(), "ok", json!({ "id": id }));
    }

    /// `error` to a broadcast with `persist` that was not stored. The text is both `reason`
    /// (as every error reply) and `error`, which realtime-js's `send()` resolves with.
    pub(super) fn reply_persist_error<'a>(&self, to: impl Into<To<'a>>, e: &PersistError) {
        let text = e.to_string();
        self.reply(to.into(), "error", json!({"reason": text, "error": text}));
    }

    /// `error` with an empty response (a presence message without the write right).
    pub(super) fn reply_denied<'a>(&self, to: impl Into<To<'a>>) {
        self.reply(to.into(), "error", json!({}));
    }

    /// `error` with the bare `payload_size_exceeded` response Supabase gives.
    pub(super) fn reply_payload_too_large<'a>(&self, to: impl Into<To<'a>>) {
        self.reply(to.into(), "error", json!(PAYLOAD_SIZE_EXCEEDED));
    }

    /// The `ok` reply of a successful join.
    pub(super) fn reply_joined(&self, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str) {
        let frame = self.reply_frame(
            join_ref,
            msg_ref,
            topic,
            "ok",
            json!({"postgres_changes": []}),
        );
        self.inner.metrics.join_ok();
        self.push(frame);
    }

    /// A join's error reply. It is sent after `join_error_delay`, like Supabase, to slow down
    /// phoenix.js's endless rejoin loop.
    pub(super) fn refuse_join(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        refusal: Refusal,
    ) {
        self.inner.metrics.join_refused(&refusal);
        let reason = refusal.to_string();
        log::debug!(
            "refusing join of {}: {}",
            crate::log_excerpt(topic),
            crate::log_excerpt(&reason)
        );
        let frame = self.reply_frame(join_ref, msg_ref, topic, "error", json!({"reason": reason}));
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

    /// A `system` message with status `error` for the channel `subtopic`.
    pub(super) fn push_system_error(
        &self,
        join_ref: Option<&str>,
        topic: &str,
        extension: &str,
        message: &str,
        subtopic: &str,
    ) {
        let payload = json!({
            "extension": extension,
            "status": "error",
            "message": message,
            "channel": subtopic,
        })
        .to_string();
        self.push(self.frame(join_ref, None, topic, "system", &payload));
    }

    /// `phx_close` (its ref is the join ref).
    pub(super) fn push_close(&self, topic: &str, join_ref: Option<&str>) {
        self.push(self.frame(join_ref, join_ref, topic, "phx_close", "{}"));
    }

    /// `presence_state` after a join.
    pub(super) fn push_presence_state(&self, join_ref: Option<&str>, topic: &str, state: &str) {
        self.push(self.frame(join_ref, None, topic, "presence_state", state));
    }
}
