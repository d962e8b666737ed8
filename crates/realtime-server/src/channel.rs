//! Per-joined-channel state and the parsing of `phx_join` payloads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::events::{Authorization, ReplayFrom};
use crate::jwt::Claims;
use crate::protocol::{Inbound, InboundPayload};
use crate::registry::TopicKey;
use crate::usage::ConnUsage;

/// What a `phx_join` payload asked for (its `config` and token). Unknown keys are ignored.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct JoinRequest {
    pub private: bool,
    pub broadcast_self: bool,
    pub broadcast_ack: bool,
    pub presence_enabled: bool,
    pub presence_key: Option<String>,
    /// `config.broadcast.replay`: None when absent, `Err` when its parameters are invalid.
    pub replay: Option<Result<ReplayAsk, ()>>,
    /// Number of postgres_changes bindings requested (not supported by this server).
    pub postgres_changes: usize,
    pub access_token: Option<String>,
}

/// Supabase's FlexibleBoolean: booleans may arrive as "true"/"false" strings.
fn flexible_bool(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// `config.broadcast.replay` as the client asked it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayAsk {
    pub from: ReplayFrom,
    /// None when missing: the join picks the default for `from`.
    pub limit: Option<i64>,
}

/// Supabase's rules for `since`: a required integer (ms since the epoch), and `limit` an
/// integer when present (clamped to the configured maximum later). `offset`, this server's
/// resume, takes the place of `since`: the text of a delivered message's `meta.offset`.
fn parse_replay(v: &Value) -> Result<ReplayAsk, ()> {
    let obj = v.as_object().ok_or(())?;
    let from = match obj.get("offset") {
        None | Some(Value::Null) => {
            ReplayFrom::Since(obj.get("since").and_then(Value::as_i64).ok_or(())?)
        }
        Some(offset) => ReplayFrom::After(offset.as_str().ok_or(())?.parse().map_err(|_| ())?),
    };
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => None,
        Some(l) => Some(l.as_i64().ok_or(())?),
    };
    Ok(ReplayAsk { from, limit })
}

pub(crate) fn parse_join(payload: &RawValue) -> JoinRequest {
    let Ok(Value::Object(p)) = serde_json::from_str::<Value>(payload.get()) else {
        return JoinRequest::default();
    };
    let config = p.get("config").and_then(Value::as_object);
    let get = |section: &str, key: &str| {
        config
            .and_then(|c| c.get(section))
            .and_then(Value::as_object)
            .and_then(|s| s.get(key))
    };
    let access_token = p
        .get("access_token")
        .or_else(|| p.get("user_token"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with("sb_"))
        .map(str::to_string);
    JoinRequest {
        private: flexible_bool(config.and_then(|c| c.get("private"))),
        broadcast_self: flexible_bool(get("broadcast", "self")),
        broadcast_ack: flexible_bool(get("broadcast", "ack")),
        presence_enabled: flexible_bool(get("presence", "enabled")),
        presence_key: get("presence", "key").and_then(|k| match k {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }),
        replay: get("broadcast", "replay")
            .filter(|r| !r.is_null())
            .map(parse_replay),
        postgres_changes: config
            .and_then(|c| c.get("postgres_changes"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
        access_token,
    }
}

/// A joined channel on one connection.
pub(crate) struct Channel {
    pub join_ref: Option<String>,
    pub key: TopicKey,
    /// Registry subscription; None when the token may not read broadcasts.
    pub sub_id: Option<u64>,
    pub broadcast_self: bool,
    pub broadcast_ack: bool,
    pub token: String,
    pub claims: Claims,
    /// Read rights; None for public channels.
    pub authorization: Option<Authorization>,
    /// Write rights, checked at the first broadcast or presence message as Supabase does
    /// (joins check reads only): most subscribers never write.
    pub writes: WriteCheck,
    pub expires_at: Instant,
    /// The token's `exp`, shared with the channel's subscription.
    pub expires: crate::registry::Expiry,
    pub presence_enabled: bool,
    pub presence_key: String,
    pub presence_owner: u64,
    /// Presence calls in the current rate-limit window, and when that window began.
    pub presence_calls: (Instant, u32),
    /// Changes with each token the channel gets, so late authorization answers for an older
    /// token (or an earlier join of the topic) are recognised.
    pub generation: u64,
    /// The read check of the latest token refresh, if it runs: a newer refresh replaces it
    /// (its answer would be for an older token), so a flood of tokens keeps one request
    /// waiting per channel, not one per token.
    pub refresh_check: Option<Check>,
    /// The write check, if it runs.
    pub write_check: Option<Check>,
    /// Whether the INSERT policies let this token store messages (`extension =
    /// 'persistence'`): None until a store asked, forgotten with each new token.
    pub persist_right: Option<bool>,
}

/// A task waiting for the worker on a channel's behalf; dropping it (with its channel, or
/// when a newer check replaces it) aborts the task, which forgets its request, so the worker
/// skips it.
pub(crate) struct Check(pub tokio::task::AbortHandle);

impl Drop for Check {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Messages held while a write check runs, per channel; beyond this they are dropped.
pub(crate) const MAX_HELD_WRITES: usize = 256;

/// Messages one channel holds while its write check runs, in order. Their bytes count in the
/// connection's total (`max_held_write_bytes` bounds it over all the connection's channels, so
/// joining more channels does not hold more) until they are taken or dropped.
pub(crate) struct HeldWrites {
    messages: Vec<Inbound>,
    bytes: usize,
    conn: Arc<ConnUsage>,
}

impl HeldWrites {
    pub(crate) fn new(conn: Arc<ConnUsage>) -> HeldWrites {
        HeldWrites {
            messages: Vec::new(),
            bytes: 0,
            conn,
        }
    }

    /// Holds `m` if the channel holds fewer than [`MAX_HELD_WRITES`] and the connection's held
    /// bytes stay within `max_bytes` (a message still fits when the connection holds nothing
    /// else); gives it back otherwise.
    pub(crate) fn hold(&mut self, m: Inbound, max_bytes: usize) -> Option<Inbound> {
        let size = held_size(&m);
        let total = self.conn.held_write_bytes.load(Ordering::Relaxed);
        if self.messages.len() >= MAX_HELD_WRITES
            || (total > 0 && total.saturating_add(size) > max_bytes)
        {
            return Some(m);
        }
        self.conn
            .held_write_bytes
            .fetch_add(size, Ordering::Relaxed);
        self.bytes += size;
        self.messages.push(m);
        None
    }

    /// The held messages, in order; their bytes no longer count.
    pub(crate) fn take(mut self) -> Vec<Inbound> {
        std::mem::take(&mut self.messages)
    }
}

impl Drop for HeldWrites {
    fn drop(&mut self) {
        self.conn
            .held_write_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where a channel's write check stands.
pub(crate) enum WriteCheck {
    /// Private channel, nothing written yet.
    Unchecked,
    /// The worker is checking; the messages wait here.
    Running(HeldWrites),
    Known {
        broadcast: bool,
        presence: bool,
    },
}

impl WriteCheck {
    /// What a new channel starts with: public channels may write.
    pub(crate) fn for_channel(private: bool) -> WriteCheck {
        if private {
            WriteCheck::Unchecked
        } else {
            WriteCheck::Known {
                broadcast: true,
                presence: true,
            }
        }
    }
}

impl Channel {
    /// None: not known yet, the message must wait for a write check.
    pub(crate) fn may_broadcast(&self) -> Option<bool> {
        match self.writes {
            WriteCheck::Known { broadcast, .. } => Some(broadcast),
            _ => None,
        }
    }

    pub(crate) fn may_track(&self) -> Option<bool> {
        match self.writes {
            WriteCheck::Known { presence, .. } => Some(presence),
            _ => None,
        }
    }
}

/// What a held message costs: the bytes a client chose (payload, event, metadata, refs).
pub(crate) fn held_size(m: &Inbound) -> usize {
    let payload = match &m.payload {
        InboundPayload::Json(raw) => raw.get().len(),
        InboundPayload::User(u) => {
            u.event.len() + u.payload.len() + u.metadata.as_ref().map_or(0, |b| b.len())
        }
    };
    payload
        + m.topic.len()
        + m.event.len()
        + m.join_ref.as_ref().map_or(0, String::len)
        + m.msg_ref.as_ref().map_or(0, String::len)
}

/// When a token with `exp` (unix seconds) expires, as a tokio instant.
pub(crate) fn expiry_instant(exp: i64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let left_ms = exp.saturating_mul(1000).saturating_sub(now_ms).max(0) as u64;
    Instant::now() + std::time::Duration::from_millis(left_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> JoinRequest {
        parse_join(&RawValue::from_string(s.to_string()).unwrap())
    }

    #[test]
    fn realtime_js_join() {
        let r = parse(
            r#"{"config":{"broadcast":{"ack":false,"self":true},"presence":{"key":"","enabled":false},
                "postgres_changes":[],"private":true},"access_token":" tok ","version":"realtime-js/2.119.1"}"#,
        );
        assert_eq!(
            r,
            JoinRequest {
                private: true,
                broadcast_self: true,
                broadcast_ack: false,
                presence_enabled: false,
                presence_key: None,
                replay: None,
                postgres_changes: 0,
                access_token: Some("tok".into()),
            }
        );
    }

    #[test]
    fn flexible_booleans_and_defaults() {
        let r = parse(
            r#"{"config":{"broadcast":{"ack":"true"},"private":"TRUE","presence":{"key":"k"}}}"#,
        );
        assert!(r.broadcast_ack && r.private && !r.broadcast_self);
        assert_eq!(r.presence_key.as_deref(), Some("k"));
        let r = parse(r#"{"config":{"private":"nope","broadcast":{"self":1}}}"#);
        assert!(!r.private && !r.broadcast_self);
        assert_eq!(parse("[]"), JoinRequest::default());
        assert_eq!(parse("{}"), JoinRequest::default());
    }

    #[test]
    fn tokens_sb_keys_and_legacy_user_token() {
        assert_eq!(
            parse(r#"{"access_token":"sb_publishable_x"}"#).access_token,
            None
        );
        assert_eq!(parse(r#"{"access_token":null}"#).access_token, None);
        assert_eq!(
            parse(r#"{"user_token":"legacy"}"#).access_token.as_deref(),
            Some("legacy")
        );
    }

    #[test]
    fn postgres_changes_and_replay() {
        let r = parse(
            r#"{"config":{"postgres_changes":[{"event":"*","schema":"public"}],"broadcast":{"replay":{"since":1}}}}"#,
        );
        assert_eq!(r.postgres_changes, 1);
        assert_eq!(
            r.replay,
            Some(Ok(ReplayAsk {
                from: ReplayFrom::Since(1),
                limit: None
            }))
        );
        let bad = parse(r#"{"config":{"broadcast":{"replay":{"since":"x"}}}}"#);
        assert_eq!(bad.replay, Some(Err(())));
    }

    #[test]
    fn replay_may_resume_after_an_offset_instead_of_since() {
        let r = parse(
            r#"{"config":{"broadcast":{"replay":{"offset":"0000000001A2B3C4-00000001","limit":5}}}}"#,
        );
        assert_eq!(
            r.replay,
            Some(Ok(ReplayAsk {
                from: ReplayFrom::After(crate::offset::Offset::new(0x1A2B3C4, 1)),
                limit: Some(5)
            }))
        );
        // The offset wins over since; a malformed offset or limit is invalid, never ignored.
        let both = parse(
            r#"{"config":{"broadcast":{"replay":{"since":1,"offset":"0000000001A2B3C4-00000001"}}}}"#,
        );
        assert!(matches!(
            both.replay,
            Some(Ok(ReplayAsk {
                from: ReplayFrom::After(_),
                ..
            }))
        ));
        for bad in [
            r#"{"offset":"1/2"}"#,
            r#"{"offset":7}"#,
            r#"{"offset":"0000000001A2B3C4-00000001","limit":"all"}"#,
        ] {
            let r = parse(&format!(
                r#"{{"config":{{"broadcast":{{"replay":{bad}}}}}}}"#
            ));
            assert_eq!(r.replay, Some(Err(())), "{bad}");
        }
    }
}
