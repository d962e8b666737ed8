//! Every text with which the server refuses something, rendered in this one place. They are
//! Supabase Realtime's texts, byte for byte: clients (and realtime-js) match on them.
//!
//! - [`Refusal`]: why a join (or a token refresh's authorization) is refused, the `reason` of
//!   its error reply. It is also the worker's answer type for a failed authorization.
//! - [`ReplyError`]: the `reason` of an error reply to a push on a channel.
//! - [`ChannelClosed`]: the `message` of the `system` error that shuts a channel down.
//! - [`Close`]: the code and reason of a close frame.
//! - [`HttpRefusal`] and [`FieldError`]: HTTP answers (WebSocket upgrade, REST).
//! - [`PersistError`]: why a broadcast with `persist` was not stored (WebSocket error reply
//!   and REST answer).
//! - the texts of [`JwtError`] in each of these places.

use crate::jwt::JwtError;
use crate::topic::MAX_SUBTOPIC_BYTES;

/// Why a join is refused; its [`Display`](std::fmt::Display) is the join reply's `reason`.
/// The worker answers a failed authorization with one ([`crate::Server::complete_authorization`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The read check failed, or private channels are not authorized at all.
    #[error(
        "Unauthorized: You do not have permissions to read from this Channel topic: {subtopic}"
    )]
    ReadDenied { subtopic: String },
    /// The token's role may not be used (it does not exist, is a superuser, is not granted to
    /// the authenticator...); the text says which.
    #[error("Unauthorized: {0}")]
    RoleNotAllowed(String),
    /// A policy or the check's SQL failed; the text is the database's error message.
    #[error("Unauthorized: {0}")]
    Policy(String),
    /// Too many authorization requests wait for the database, over all connections.
    #[error("IncreaseConnectionPool: Too many authorization requests are waiting for the database")]
    TooManyWaiting,
    /// The worker did not answer within `authorization_timeout`.
    #[error("IncreaseConnectionPool: Please increase your connection pool size")]
    AuthorizationTimeout,
    /// Past the connection's join rate (`joins_per_second`, `join_burst`).
    #[error("ClientJoinRateLimitReached: Too many joins per second")]
    TooManyJoins,
    /// A private join while `max_pending_joins_per_connection` joins wait for authorization.
    #[error("ClientJoinRateLimitReached: Too many pending joins")]
    TooManyPendingJoins,
    #[error("TopicNameTooLong: A topic name may have at most {max} bytes", max = MAX_SUBTOPIC_BYTES)]
    TopicTooLong,
    /// PostgreSQL text cannot hold a NUL.
    #[error("InvalidTopicName: A topic name must not contain the NUL character")]
    TopicHasNul,
    #[error("TopicNameRequired: You must provide a topic name")]
    TopicRequired,
    #[error("PrivateOnly: This project only allows private channels")]
    PrivateOnly,
    /// The connection has `max_channels_per_connection` channels (joined or joining).
    #[error("ChannelRateLimitReached: Too many channels")]
    TooManyChannels,
    #[error("UnableToReplayMessages: Replay is not allowed for public channels")]
    ReplayOnPublic,
    #[error("UnableToReplayMessages: Replay params are not valid")]
    ReplayInvalid,
    /// The join's token is not acceptable.
    #[error("{}", .0.join_reason())]
    Token(JwtError),
}

impl Refusal {
    /// A failed check from the ERROR a policy raised: its message, shown after `Unauthorized: `
    /// like any check error. A policy that raises this text itself (`Unauthorized: ...`) is
    /// shown as it raised it, not prefixed twice.
    pub fn raised(message: String) -> Refusal {
        match message.strip_prefix(UNAUTHORIZED) {
            Some(rest) => Refusal::Policy(rest.to_string()),
            None => Refusal::Policy(message),
        }
    }

    /// The kinds of refusal, as the `reason` label of `realtime_joins_total`: a fixed set, so
    /// no client or policy text can add series. Indexed by [`Refusal::kind_index`].
    pub(crate) const KINDS: [&'static str; 15] = [
        "read_denied",
        "role_not_allowed",
        "policy",
        "too_many_waiting",
        "authorization_timeout",
        "too_many_joins",
        "too_many_pending_joins",
        "topic_too_long",
        "topic_has_nul",
        "topic_required",
        "private_only",
        "too_many_channels",
        "replay_on_public",
        "replay_invalid",
        "token",
    ];

    /// This refusal's position in [`Refusal::KINDS`].
    pub(crate) fn kind_index(&self) -> usize {
        match self {
            Refusal::ReadDenied { .. } => 0,
            Refusal::RoleNotAllowed(_) => 1,
            Refusal::Policy(_) => 2,
            Refusal::TooManyWaiting => 3,
            Refusal::AuthorizationTimeout => 4,
            Refusal::TooManyJoins => 5,
            Refusal::TooManyPendingJoins => 6,
            Refusal::TopicTooLong => 7,
            Refusal::TopicHasNul => 8,
            Refusal::TopicRequired => 9,
            Refusal::PrivateOnly => 10,
            Refusal::TooManyChannels => 11,
            Refusal::ReplayOnPublic => 12,
            Refusal::ReplayInvalid => 13,
            Refusal::Token(_) => 14,
        }
    }

    /// The text after `Unauthorized: `, or the whole text for other refusals.
    pub fn policy_text(&self) -> String {
        let text = self.to_string();
        match text.strip_prefix(UNAUTHORIZED) {
            Some(rest) => rest.to_string(),
            None => text,
        }
    }
}

/// What [`Refusal::Policy`] and [`Refusal::RoleNotAllowed`] start with.
const UNAUTHORIZED: &str = "Unauthorized: ";

/// The `reason` of an error reply to a push on a channel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    /// A push on a topic the connection has not joined (or that is not a `realtime:` topic).
    #[error("unmatched topic")]
    UnmatchedTopic,
    #[error("unsupported event \"{0}\"")]
    UnsupportedEvent(String),
    /// An acked broadcast without the write right. Supabase drops these silently.
    #[error("Unauthorized: You do not have permissions to write to this Channel topic: {subtopic}")]
    WriteDenied { subtopic: String },
    /// An acked broadcast that found the channel's write-check queue full.
    #[error("Too many messages per second")]
    TooManyHeldWrites,
    #[error("Presence track payload must be a map")]
    PresenceNotAMap,
    #[error("Presence meta is too large: at most {max} bytes")]
    PresenceMetaTooLarge { max: usize },
    /// A meta (or presence key) with a NUL character, which PostgreSQL cannot store.
    #[error("Presence meta must not contain the NUL character (\\u0000)")]
    PresenceNul,
    #[error("Too many presences for this key")]
    TooManyPresenceMetas,
    #[error("Too many presence keys in this topic")]
    TooManyPresenceKeys,
    #[error("Too much presence data in this topic")]
    PresenceTopicFull,
    #[error("presence event must be \"track\" or \"untrack\"")]
    PresenceEvent,
}

impl From<crate::presence::TrackError> for ReplyError {
    fn from(e: crate::presence::TrackError) -> Self {
        use crate::presence::TrackError;
        match e {
            TrackError::TooManyMetas => ReplyError::TooManyPresenceMetas,
            TrackError::TooManyKeys => ReplyError::TooManyPresenceKeys,
            TrackError::TopicFull => ReplyError::PresenceTopicFull,
        }
    }
}

/// The `response` of the error reply to an acked broadcast larger than the payload limit.
pub(crate) const PAYLOAD_SIZE_EXCEEDED: &str = "payload_size_exceeded";

/// The `message` of the `system` error that closes a channel (followed by `phx_close`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChannelClosed {
    /// Supabase's per-channel limit of presence calls.
    #[error("Client presence rate limit exceeded")]
    PresenceRateLimit,
    #[error("Track message size exceeded")]
    TrackTooLarge,
    /// A refreshed token was refused, or the channel's token expired.
    #[error("{}", .0.system_message())]
    Token(JwtError),
    /// After a token refresh, for a channel that could read before.
    #[error("You no longer have permission to read from this Channel topic: {subtopic}")]
    ReadRevoked { subtopic: String },
    /// After a token refresh, for a channel that could not read before either.
    #[error("You do not have permissions to read from this Channel topic: {subtopic}")]
    ReadDenied { subtopic: String },
    /// An operator closed the connection (`realtime.disconnect`, `realtime.disconnect_user`);
    /// the text is the reason they gave.
    #[error("{0}")]
    Disconnected(String),
}

/// The `reason` of the error reply to a broadcast on a private channel without the write
/// right, for those who explain a refusal outside a connection.
pub fn write_denied(subtopic: &str) -> String {
    ReplyError::WriteDenied {
        subtopic: subtopic.to_string(),
    }
    .to_string()
}

/// Why a broadcast with `persist` was not stored (and so not delivered). Its text is the
/// `reason` (and `error`, which realtime-js hands back from `send()`) of the error reply to an
/// acked broadcast, and the `message` of a REST refusal. The worker answers a failed store
/// with one ([`crate::Server::complete_persist`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("persist is only available on private channels")]
    PublicChannel,
    /// The INSERT policies refused the probe row with `extension = 'persistence'`.
    #[error(
        "Unauthorized: You do not have permissions to store messages on this Channel topic: {subtopic}"
    )]
    Denied { subtopic: String },
    /// A role that may not be used, or a policy that raised: the text says which.
    #[error("Unauthorized: {0}")]
    Policy(String),
    #[error("persist must be true or an object such as {{\"ttl\": 3600}}")]
    Malformed,
    #[error("persist ttl must be a whole number of seconds from 1 to {max} (realtime.retention)")]
    BadTtl { max: u64 },
    /// Past the connection's or the server's bound of messages waiting to be stored.
    #[error("Too many messages are waiting to be stored")]
    TooManyWaiting,
    /// Standbys are read-only.
    #[error("persist is served by the primary node: connect to the primary to store messages")]
    Standby,
    /// The insert failed (a trigger or constraint raised, the commit failed...).
    #[error("The message could not be stored: {0}")]
    StoreFailed(String),
    /// The worker did not answer within `authorization_timeout`; the message may still be
    /// stored (and then delivered).
    #[error("The database did not confirm the message in time; it may still be stored")]
    Timeout,
    /// The server does not store messages (no worker answers).
    #[error("persist is not available on this server")]
    Unavailable,
}

/// The `message` of the `system` error a join that asks for postgres_changes gets after its ok
/// reply: realtime-js then reports CHANNEL_ERROR and leaves by itself.
pub(crate) const POSTGRES_CHANGES_UNSUPPORTED: &str = "postgres_changes is not supported by pg_realtime: use broadcast from the database (realtime.broadcast_changes / realtime.send) instead";

/// The `message` of the `system` error a resuming join gets after its ok reply when it cannot
/// be given every message after its offset. It starts with `Replay gap:` so a client can tell
/// it from other system messages.
pub(crate) fn replay_gap_message(gap: crate::events::ReplayGap) -> String {
    match gap {
        crate::events::ReplayGap::Limit { limit } => format!(
            "Replay gap: more than {limit} messages were stored after this offset; only the newest {limit} were replayed"
        ),
        crate::events::ReplayGap::NotKept => "Replay gap: messages after this offset may be missing (removed by retention, or left without an offset by a crash of the server); those stored with an offset were replayed".to_string(),
        crate::events::ReplayGap::UnknownOffset => "Replay gap: the message at this offset is not stored (lost in a crash before it reached the disk, or deleted), so messages after it may be missing; those stored after it were replayed".to_string(),
    }
}

/// Why the server closes a WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    Shutdown,
    SlowConsumer,
    Idle,
    /// An operator disconnected it (the reason went out in `system` messages before).
    Disconnected,
}

impl Close {
    pub(crate) fn code(self) -> u16 {
        match self {
            Close::Shutdown => 1001,
            Close::SlowConsumer => 1008,
            Close::Idle | Close::Disconnected => 1000,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Close::Shutdown => "server shutting down",
            Close::SlowConsumer => "slow consumer: outbound queue full",
            Close::Idle => "idle timeout",
            Close::Disconnected => "disconnected by the server",
        }
    }
}

/// The message of a refused HTTP request (WebSocket upgrade or REST).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HttpRefusal {
    /// REST without a valid token (401), or a private send without the write right (403).
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Too many concurrent requests")]
    TooManyConcurrentRequests,
    #[error("The request body did not arrive in time")]
    BodyTimeout,
    #[error("Unsupported Media Type. Use application/json or application/octet-stream")]
    UnsupportedMediaType,
    #[error("Unsupported serializer version: use vsn=1.0.0 or vsn=2.0.0")]
    UnsupportedSerializer,
    #[error("Too many connected users")]
    TooManyConnections,
    /// A WebSocket upgrade with an unacceptable token.
    #[error("{}", .0.connect_message())]
    Token(JwtError),
}

/// One field's error in a REST 422 answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FieldError {
    #[error("can't be blank")]
    Blank,
    #[error("is invalid")]
    Invalid,
    #[error("should be at most {max} byte(s)", max = MAX_SUBTOPIC_BYTES)]
    TopicTooLong,
    #[error("should have at most {0} item(s)")]
    TooManyItems(usize),
    #[error("Payload size exceeds tenant limit")]
    PayloadTooLarge,
}

impl JwtError {
    /// The `error` text of the HTTP 401 that refuses a WebSocket upgrade.
    pub fn connect_message(&self) -> &'static str {
        match self {
            JwtError::Missing => "API key is missing",
            JwtError::Expired { .. } => "Token has expired",
            JwtError::MissingClaims => "Fields `role` and `exp` are required in JWT",
            JwtError::RoleNotAllowed => "The `role` claim of the JWT is not allowed",
            JwtError::Malformed => "The token provided is not a valid JWT",
            JwtError::BadSignature => "Failed to validate JWT signature",
            JwtError::Signer => {
                "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
            }
        }
    }

    /// The `reason` of a refused `phx_join`.
    pub fn join_reason(&self) -> String {
        match self {
            JwtError::Missing | JwtError::Malformed => {
                "MalformedJWT: The token provided is not a valid JWT".to_string()
            }
            JwtError::Expired { seconds_ago } => {
                format!("InvalidJWTToken: Token has expired {seconds_ago} seconds ago")
            }
            JwtError::MissingClaims => {
                "InvalidJWTToken: Fields `role` and `exp` are required in JWT".to_string()
            }
            JwtError::RoleNotAllowed => {
                "InvalidJWTToken: The `role` claim of the JWT is not allowed".to_string()
            }
            JwtError::BadSignature => {
                "JwtSignatureError: Failed to validate JWT signature".to_string()
            }
            JwtError::Signer => "JwtSignerError: Failed to generate JWT signer, check your JWT \
                                 secret or JWKS configuration"
                .to_string(),
        }
    }

    /// The message of the `system` error that shuts a channel down after a bad token refresh
    /// or when its token expires.
    pub fn system_message(&self) -> String {
        match self {
            JwtError::Expired { seconds_ago } => {
                format!("Token has expired {seconds_ago} seconds ago")
            }
            other => other.connect_message().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_kinds_are_distinct_metric_labels() {
        let kinds: std::collections::HashSet<_> = Refusal::KINDS.iter().collect();
        assert_eq!(kinds.len(), Refusal::KINDS.len());
        assert!(
            Refusal::KINDS
                .iter()
                .all(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        assert_eq!(
            Refusal::KINDS[Refusal::TooManyJoins.kind_index()],
            "too_many_joins"
        );
        assert_eq!(
            Refusal::KINDS[Refusal::Token(JwtError::Missing).kind_index()],
            "token"
        );
    }

    #[test]
    fn texts_are_supabases() {
        assert_eq!(
            Refusal::ReadDenied {
                subtopic: "t".into()
            }
            .to_string(),
            "Unauthorized: You do not have permissions to read from this Channel topic: t"
        );
        assert_eq!(
            Refusal::Policy("boom".into()).to_string(),
            "Unauthorized: boom"
        );
        assert_eq!(
            Refusal::raised("boom".into()).to_string(),
            "Unauthorized: boom"
        );
        assert_eq!(
            Refusal::raised("Unauthorized: no".into()).to_string(),
            "Unauthorized: no"
        );
        assert_eq!(
            Refusal::TopicTooLong.to_string(),
            "TopicNameTooLong: A topic name may have at most 255 bytes"
        );
        assert_eq!(
            Refusal::Token(JwtError::Expired { seconds_ago: 3 }).to_string(),
            "InvalidJWTToken: Token has expired 3 seconds ago"
        );
        assert_eq!(
            ReplyError::PresenceNul.to_string(),
            "Presence meta must not contain the NUL character (\\u0000)"
        );
        assert_eq!(
            ReplyError::UnsupportedEvent("x".into()).to_string(),
            "unsupported event \"x\""
        );
        assert_eq!(
            ChannelClosed::Token(JwtError::Expired { seconds_ago: 0 }).to_string(),
            "Token has expired 0 seconds ago"
        );
        assert_eq!(
            FieldError::TopicTooLong.to_string(),
            "should be at most 255 byte(s)"
        );
        assert_eq!(
            FieldError::TooManyItems(2).to_string(),
            "should have at most 2 item(s)"
        );
    }
}
