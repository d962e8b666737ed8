//! Errors raised to SQL callers, each with an explicit SQLSTATE.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// The longest topic `realtime.send` and the trigger accept.
pub const MAX_TOPIC_BYTES: usize = realtime_server::MAX_STORED_TOPIC_BYTES;
/// The longest event name, for the same reason.
pub const MAX_EVENT_BYTES: usize = 255;

#[derive(thiserror::Error, Debug)]
pub enum RealtimeError {
    #[error("pg_realtime must be loaded via shared_preload_libraries")]
    NotPreloaded,
    #[error("realtime.send payload must not be NULL")]
    SendNullPayload,
    #[error("realtime.send payload must be a JSON object, not {0}")]
    SendPayloadNotObject(String),
    #[error("realtime.send_binary payload must not be NULL")]
    SendBinaryNullPayload,
    #[error("realtime message {0} must not be NULL")]
    SendNullArgument(&'static str),
    #[error("realtime message {0} must not be empty")]
    SendEmptyArgument(&'static str),
    #[error("realtime message has an empty topic")]
    EmptyTopic,
    #[error("realtime topic is {0} bytes long; the limit is {MAX_TOPIC_BYTES}")]
    TopicTooLong(usize),
    #[error("realtime event is {0} bytes long; the limit is {MAX_EVENT_BYTES}")]
    EventTooLong(usize),
    #[error(
        "realtime payload is {size} bytes; the limit is {limit} bytes (realtime.max_payload_size)"
    )]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("realtime message has both payload and binary_payload")]
    TwoPayloads,
    #[error("the realtime commit queue is full: {needed} bytes needed, {free} free")]
    QueueFull { needed: u64, free: u64 },
    #[error("cannot PREPARE a transaction that has sent realtime messages")]
    PrepareAfterSend,
    #[error("trigger function {function} fires only on realtime.{table}, not on \"{relation}\"")]
    WrongTriggerTable {
        function: &'static str,
        table: String,
        relation: String,
    },
    #[error(
        "realtime message topic \"{topic}\" is not the topic the row-level security policies checked (realtime.topic() = \"{checked}\")"
    )]
    TopicNotChecked { topic: String, checked: String },
    #[error("invalid request from another pg_realtime node: {0}")]
    InvalidNodeRequest(String),
    #[error("the realtime worker did not answer within {0} s")]
    WorkerDidNotAnswer(u64),
    #[error("the realtime worker refused the request: {0}")]
    WorkerRefused(String),
    #[error("realtime.explain_join: {0}")]
    ExplainArgument(&'static str),
    #[error("pg_realtime internal error: {0}")]
    Internal(String),
}

impl RealtimeError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RealtimeError::NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            RealtimeError::SendNullPayload
            | RealtimeError::SendBinaryNullPayload
            | RealtimeError::SendNullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            RealtimeError::EmptyTopic
            | RealtimeError::TopicTooLong(_)
            | RealtimeError::EventTooLong(_)
            | RealtimeError::TwoPayloads
            | RealtimeError::SendPayloadNotObject(_)
            | RealtimeError::SendEmptyArgument(_)
            | RealtimeError::InvalidNodeRequest(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            RealtimeError::PayloadTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            RealtimeError::QueueFull { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            RealtimeError::PrepareAfterSend => ERRCODE_FEATURE_NOT_SUPPORTED,
            RealtimeError::WrongTriggerTable { .. } => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            RealtimeError::TopicNotChecked { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            RealtimeError::WorkerDidNotAnswer(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            RealtimeError::WorkerRefused(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            RealtimeError::ExplainArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            RealtimeError::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            RealtimeError::NotPreloaded => Some(
                "Add shared_preload_libraries = 'pg_realtime' to postgresql.conf (append it if the \
                 list is not empty) and restart PostgreSQL.",
            ),
            RealtimeError::QueueFull { .. } => Some(
                "The realtime background worker drains the queue; check that it is running, \
                 or raise realtime.queue_size.",
            ),
            RealtimeError::PayloadTooLarge { .. } => Some("Raise realtime.max_payload_size."),
            RealtimeError::WorkerDidNotAnswer(_) => Some(
                "The background worker answers on its main loop; check that it runs (it serves \
                 only the database named by realtime.database) and that realtime.stats() shows \
                 a recent usage_updated_at.",
            ),
            RealtimeError::TopicNotChecked { .. } => Some(
                "Use realtime.send(), or SET LOCAL realtime.topic to the row's topic before the \
                 INSERT, so that policies reading realtime.topic() check the topic the message \
                 goes to.",
            ),
            _ => None,
        }
    }

    /// Raises this error as a Postgres ERROR; never returns.
    pub fn raise(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

impl From<RealtimeError> for ErrorReport {
    #[track_caller]
    fn from(e: RealtimeError) -> Self {
        let report = ErrorReport::new(e.sqlstate(), e.to_string(), "pg_realtime");
        match e.hint() {
            Some(hint) => report.set_hint(hint),
            None => report,
        }
    }
}
