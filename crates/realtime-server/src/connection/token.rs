//! A channel's token: `access_token` refreshes (verified, then the read check again for
//! private channels) and expiry, which closes the channel.

use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::time::Instant;

use super::{Conn, Internal};
use crate::channel::{WriteCheck, expiry_instant};
use crate::events::AuthorizationPurpose;
use crate::jwt::{JwtError, unix_now};
use crate::protocol::Inbound;
use crate::refusal::ChannelClosed;

impl Conn {
    pub(super) fn access_token(&mut self, m: Inbound) {
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
        let Some(ch) = self.channel(&m.topic) else {
            return;
        };
        // Opaque keys, and the token the channel already has, change nothing (as on Supabase).
        if token.is_empty() || token.starts_with("sb_") || token == ch.token {
            return;
        }
        let claims = match self.inner.jwt().verify(&token, unix_now()) {
            Ok(claims) => claims,
            Err(e) => return self.shutdown_channel(&m.topic, ChannelClosed::Token(e)),
        };
        let generation = self.next_id();
        self.usage.set_identity(&claims);
        let Some(ch) = self.channel_mut(&m.topic) else {
            return;
        };
        ch.expires_at = expiry_instant(claims.exp);
        ch.expires.store(claims.exp, Ordering::Relaxed);
        ch.token = token;
        ch.claims = claims.clone();
        if !ch.key.private {
            return;
        }
        // The new token's write rights are checked at the next write (a check still running
        // for the old token is redone: its answer comes with an old generation).
        if matches!(ch.writes, WriteCheck::Known { .. }) {
            ch.writes = WriteCheck::Unchecked;
        }
        ch.persist_right = None;
        ch.generation = generation;
        // The check of an older token is no longer wanted: its request is forgotten now.
        ch.refresh_check = None;
        let (subtopic, presence) = (ch.key.subtopic.clone(), ch.presence_enabled);
        let topic = m.topic;
        let check = self.ask_in_background(
            subtopic,
            claims,
            presence,
            AuthorizationPurpose::TokenRefresh,
            {
                let topic = topic.clone();
                move |answer| Internal::RefreshAuthorized {
                    topic,
                    generation,
                    answer,
                }
            },
        );
        if let Some(ch) = self.channel_mut(&topic) {
            ch.refresh_check = Some(check);
        }
    }

    /// When the first of the channels' tokens expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.channels().map(|(_, c)| c.expires_at).min()
    }

    /// Closes the channels whose token has expired.
    pub(super) fn expire_tokens(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .channels()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        let now_unix = unix_now();
        for topic in expired {
            let Some(ch) = self.channel(&topic) else {
                continue;
            };
            let seconds_ago = (now_unix - ch.claims.exp).max(0);
            let why = ChannelClosed::Token(JwtError::Expired { seconds_ago });
            self.shutdown_channel(&topic, why);
        }
    }
}
