//! What a standby's worker calls on the primary over its link (see the server crate's
//! `bus.rs`): `_node_relay` hands over the standby's bus envelope, `_node_authorize` runs a
//! private channel's checks, which need probe rows a standby cannot insert. Neither is
//! executable by PUBLIC: the link connects as the user of `primary_conninfo` (or
//! `realtime.primary_conninfo`), a superuser unless these are granted to it.

use crate::error::RealtimeError;
use crate::queue::staging;
use pgrx::prelude::*;

/// Queues a standby's envelope; once this transaction commits, the primary's worker delivers
/// it to its own sockets and writes it into the WAL for every other standby.
#[pg_extern(volatile, parallel_unsafe)]
fn _node_relay(envelope: &[u8]) {
    if envelope.len() > staging::MAX_RELAY_BYTES {
        RealtimeError::PayloadTooLarge {
            size: envelope.len(),
            limit: staging::MAX_RELAY_BYTES,
        }
        .raise();
    }
    let decoded = realtime_server::bus::Envelope::decode(envelope)
        .unwrap_or_else(|e| RealtimeError::InvalidNodeRequest(e.to_string()).raise());
    // Database messages and SQL presence come from the primary's own commits only: a standby
    // (or anyone allowed to call this) cannot make every node deliver a message nobody
    // committed.
    if decoded.frames.iter().any(|f| {
        matches!(
            f,
            realtime_server::bus::Frame::Database { .. }
                | realtime_server::bus::Frame::SqlPresence { .. }
        )
    }) {
        RealtimeError::InvalidNodeRequest(
            "a standby's envelope may not carry database messages or SQL presence".into(),
        )
        .raise();
    }
    if let Err(e) = staging::stage_relay(envelope) {
        e.raise();
    }
    // Before this call returns: the standby serves its clients once its link works, and what
    // commits from then on must already be on the bus.
    crate::queue::shmem::stats()
        .standby_heard
        .store(true, std::sync::atomic::Ordering::Release);
}

/// Runs a standby's checks (the JSON list its link sends) as the worker would, each in a
/// subtransaction that is rolled back; returns the answers in order, as JSON.
#[pg_extern(volatile, parallel_unsafe)]
fn _node_authorize(requests: &str) -> String {
    let requests = realtime_server::bus::link::decode_requests(requests)
        .unwrap_or_else(|e| RealtimeError::InvalidNodeRequest(e).raise());
    let answers = crate::worker::authorization::check_in_transaction(&requests);
    realtime_server::bus::link::encode_answers(&answers)
}
