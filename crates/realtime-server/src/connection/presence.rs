//! `track` / `untrack` on a channel. Any channel may track; diffs go to every subscriber of
//! the topic that may read presence, the tracker included.

use serde_json::Value;

use super::Conn;
use crate::presence::{Limits as PresenceLimits, contains_nul, stored_meta};
use crate::protocol::Inbound;
use crate::refusal::{ChannelClosed, ReplyError};

impl Conn {
    pub(super) fn presence(&mut self, m: Inbound) {
        let cfg = self.inner.config();
        let Some(ch) = self.channel_mut(&m.topic) else {
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
                return self.shutdown_channel(&m.topic, ChannelClosed::PresenceRateLimit);
            }
        }
        let Some(ch) = self.channel(&m.topic) else {
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
        let push: Option<Push<'_>> = m
            .json_payload()
            .and_then(|raw| serde_json::from_str(raw.get()).ok());
        let kind = push
            .as_ref()
            .and_then(|p| p.event.as_deref())
            .map(str::to_ascii_lowercase);
        if ch.may_track() != Some(true) {
            return self.reply_denied(&m);
        }
        match kind.as_deref() {
            Some("track") => {
                let size = m.json_payload().map_or(0, |p| p.get().len());
                if size > cfg.max_payload_bytes {
                    return self.shutdown_channel(&m.topic, ChannelClosed::TrackTooLarge);
                }
                let Some(raw) = push.as_ref().and_then(|p| p.payload) else {
                    return self.reply_error(&m, ReplyError::PresenceNotAMap);
                };
                if raw.get().len() > cfg.max_presence_meta_bytes {
                    let max = cfg.max_presence_meta_bytes;
                    return self.reply_error(&m, ReplyError::PresenceMetaTooLarge { max });
                }
                let meta = match serde_json::from_str::<Value>(raw.get()) {
                    Ok(meta @ Value::Object(_)) => meta,
                    _ => return self.reply_error(&m, ReplyError::PresenceNotAMap),
                };
                // PostgreSQL text and jsonb cannot hold NUL: such a meta would make the worker's
                // SQL mirror of presence fail for everyone's changes in its batch.
                if contains_nul(&meta) || ch.presence_key.contains('\0') {
                    return self.reply_error(&m, ReplyError::PresenceNul);
                }
                let Value::Object(meta) = meta else {
                    return;
                };
                let tracked = self.inner.broker.track(
                    &ch.key,
                    ch.presence_owner,
                    &ch.presence_key,
                    stored_meta(meta),
                    PresenceLimits::of(&cfg),
                );
                match tracked {
                    Ok(()) => self.reply_ok(&m),
                    Err(e) => self.reply_error(&m, e.into()),
                }
            }
            Some("untrack") => {
                self.inner.broker.untrack(&ch.key, ch.presence_owner);
                self.reply_ok(&m);
            }
            _ => self.reply_error(&m, ReplyError::PresenceEvent),
        }
    }
}
