//! The per-backend half of the commit queue.
//!
//! A row trigger on `realtime.messages` stages every broadcast row of the transaction here,
//! tagged with the savepoint nesting level it was written at, so that rolling back to a
//! savepoint drops exactly its part. At pre-commit the staged messages are reserved as one
//! record of the shared ring (the last moment they can still fail the transaction); the commit
//! callback stamps the record with the commit LSN, the abort callback marks it aborted, and the
//! worker delivers records in commit-LSN order (`commit_ring::ring` explains why that needs no
//! lock between committers). Nothing that can fail runs after pre-commit.

use super::{commit_mode, guard, shmem};
use crate::error::{MAX_EVENT_BYTES, MAX_TOPIC_BYTES, RealtimeError};
use crate::gucs;
use commit_ring::{Message, PayloadKind};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;

struct Staged {
    nest_level: i32,
    body: Vec<u8>,
}

#[derive(Default)]
struct Transaction {
    staged: Vec<Staged>,
    /// Bytes of `staged`: past the ring's capacity the commit would fail anyway, so staging
    /// fails at once instead of growing the backend's heap without bound.
    staged_bytes: usize,
    /// This transaction's record in the ring, to finish (and wake the worker) when it ends.
    reserved: Option<shmem::Reservation>,
}

thread_local! {
    static CURRENT: RefCell<Transaction> = RefCell::new(Transaction::default());
}

pub(super) fn init() {
    // SAFETY: called once from _PG_init; the callbacks are extern C functions that live as long as
    // the library.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

fn nest_level() -> i32 {
    // SAFETY: reads the backend's transaction state.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => {
            pre_commit();
            commit_mode::pre_commit();
        }
        XACT_EVENT_PARALLEL_PRE_COMMIT => pre_commit(),
        XACT_EVENT_PRE_PREPARE if CURRENT.with_borrow(|t| !t.staged.is_empty()) => {
            RealtimeError::PrepareAfterSend.raise();
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            // The end of this transaction's commit record, set by RecordTransactionCommit.
            // SAFETY: a backend global, set by RecordTransactionCommit before this callback.
            finish(Some(unsafe { pg_sys::XactLastCommitEnd }));
            commit_mode::end();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            finish(None);
            commit_mode::end();
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => {
            let level = nest_level();
            CURRENT.with_borrow_mut(|t| {
                t.staged.retain(|s| s.nest_level < level);
                t.staged_bytes = t.staged.iter().map(|s| s.body.len()).sum();
            });
        }
        SUBXACT_EVENT_COMMIT_SUB => {
            let level = nest_level();
            CURRENT.with_borrow_mut(|t| {
                for s in t.staged.iter_mut().filter(|s| s.nest_level >= level) {
                    s.nest_level = level - 1;
                }
            });
        }
        _ => {}
    }
}

/// Ends the transaction's part in the queue; cannot fail.
fn finish(commit_lsn: Option<u64>) {
    let reserved = CURRENT.with_borrow_mut(std::mem::take).reserved;
    if let Some(reservation) = reserved {
        reservation.finish(commit_lsn);
        shmem::wake_worker();
    }
}

fn pre_commit() {
    let bodies: Vec<Vec<u8>> = CURRENT.with_borrow_mut(|t| {
        t.staged_bytes = 0;
        t.staged.drain(..).map(|s| s.body).collect()
    });
    if bodies.is_empty() {
        return;
    }
    // Assigns the xid now if the transaction has none, so that it writes a commit record.
    // SAFETY: called at pre-commit, inside the transaction, which may still be given an xid.
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    // SAFETY: a backend global set at connection.
    let database = unsafe { pg_sys::MyDatabaseId };
    let slices: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    match shmem::reserve(u32::from(xid), u32::from(database), &slices) {
        Ok(reservation) => CURRENT.with_borrow_mut(|t| t.reserved = Some(reservation)),
        Err(full) => RealtimeError::QueueFull {
            needed: full.needed,
            free: full.free,
        }
        .raise(),
    }
}

/// Checks one broadcast row and stages it for the socket server.
fn stage(message: &Message<'_>) -> Result<(), RealtimeError> {
    if message.topic.is_empty() {
        return Err(RealtimeError::EmptyTopic);
    }
    if message.topic.len() > MAX_TOPIC_BYTES {
        return Err(RealtimeError::TopicTooLong(message.topic.len()));
    }
    if message.event.len() > MAX_EVENT_BYTES {
        return Err(RealtimeError::EventTooLong(message.event.len()));
    }
    // A relayed envelope carries other nodes' messages, each already within the limit.
    let limit = match message.kind {
        PayloadKind::Relay => MAX_RELAY_BYTES,
        _ => gucs::max_payload_bytes(),
    };
    if message.payload.len() > limit {
        return Err(RealtimeError::PayloadTooLarge {
            size: message.payload.len(),
            limit,
        });
    }
    let body = message.encode();
    let capacity = shmem::capacity();
    CURRENT.with_borrow_mut(|t| {
        let needed = t.staged_bytes.saturating_add(body.len());
        if needed > capacity {
            return Err(RealtimeError::QueueFull {
                needed: needed as u64,
                free: capacity as u64,
            });
        }
        t.staged_bytes = needed;
        t.staged.push(Staged {
            nest_level: nest_level(),
            body,
        });
        Ok(())
    })
}

/// The `payload` column as JSON text, straight from `jsonb_out`: no detour through a Rust
/// JSON value, since the text is all the sockets need.
fn payload_text(trigger: &PgTrigger<'_>) -> Result<Option<Vec<u8>>, RealtimeError> {
    let data = trigger.trigger_data();
    // SAFETY: a trigger's relation and its tuple descriptor are valid while it runs; natts bounds
    // attrs; the datum is read only after its type is checked to be jsonb.
    unsafe {
        let tupdesc = (*data.tg_relation).rd_att;
        let natts = (*tupdesc).natts as usize;
        let attrs = (*tupdesc).attrs.as_slice(natts);
        let Some(index) = attrs
            .iter()
            .position(|a| !a.attisdropped && name_data_to_str(&a.attname) == "payload")
        else {
            return Err(RealtimeError::Internal(
                "realtime.messages has no payload column".into(),
            ));
        };
        // Never read a datum as jsonb that is not one: the tuple layout is only trusted once
        // its type is checked.
        if attrs[index].atttypid != pg_sys::JSONBOID {
            return Err(RealtimeError::Internal(
                "the payload column of realtime.messages is not jsonb".into(),
            ));
        }
        let attno = std::num::NonZeroUsize::new(index + 1).expect("index + 1 is not zero");
        let Some(datum) = pgrx::htup::heap_getattr_raw(data.tg_trigtuple, attno, tupdesc) else {
            return Ok(None);
        };
        let text = pgrx::fcinfo::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)])
            .ok_or_else(|| RealtimeError::Internal("jsonb_out returned NULL".into()))?;
        let cstr = text.cast_mut_ptr::<std::ffi::c_char>();
        let bytes = std::ffi::CStr::from_ptr(cstr).to_bytes().to_vec();
        pg_sys::pfree(cstr.cast());
        Ok(Some(bytes))
    }
}

/// The largest envelope one `realtime._node_relay` call may hand over.
pub const MAX_RELAY_BYTES: usize = 16 * 1024 * 1024;

/// Queues a bus envelope from a standby; the worker applies and republishes it after commit.
pub fn stage_relay(envelope: &[u8]) -> Result<(), RealtimeError> {
    stage(&Message {
        topic: "bus",
        event: "",
        id: "",
        inserted_at: 0,
        private: false,
        kind: PayloadKind::Relay,
        payload: envelope,
    })
}

/// Queues "the SQL presence of (topic, private) changed"; the worker re-reads it after commit.
pub fn stage_presence_sync(topic: &str, private: bool) -> Result<(), RealtimeError> {
    stage(&Message {
        topic,
        event: "",
        id: "",
        inserted_at: 0,
        private,
        kind: PayloadKind::PresenceSync,
        payload: &[],
    })
}

/// The row's topic must be the one the inserting session's INSERT policies saw through
/// `realtime.topic()`, or a policy written for one topic would pass rows bound for another.
/// Roles that bypass row-level security on the table (superusers, BYPASSRLS, its owner) may
/// insert any topic: no policy constrained them anyway.
fn require_checked_topic(topic: &str, messages: pg_sys::Oid) -> Result<(), RealtimeError> {
    // Read in place, not through `GucSetting::get`, which copies it: this runs for every row.
    // SAFETY: the setting's storage is a C string pointer that only this backend's GUC machinery
    // writes.
    let raw = unsafe { *gucs::TOPIC.as_ptr() };
    let checked = if raw.is_null() {
        &[][..]
    } else {
        // SAFETY: a non-null GUC string value is NUL-terminated.
        unsafe { std::ffi::CStr::from_ptr(raw) }.to_bytes()
    };
    if checked == topic.as_bytes() {
        return Ok(());
    }
    // SAFETY: messages is the OID of an existing table; noError is set.
    let rls = unsafe { pg_sys::check_enable_rls(messages, pg_sys::InvalidOid, true) };
    if rls != pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
        return Ok(());
    }
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        // The usual checks give the clearer error.
        return Ok(());
    }
    Err(RealtimeError::TopicNotChecked {
        topic: topic.to_string(),
        checked: String::from_utf8_lossy(checked)
            .chars()
            .take(MAX_TOPIC_BYTES)
            .collect(),
    })
}

/// `AFTER INSERT` row trigger on `realtime.messages`. It fires for every row and passes over
/// those that are not broadcast messages (authorization probes carry no event; persistence
/// records another extension): a `WHEN` clause would do the same, but PostgreSQL parses it
/// again for each single-row INSERT, which is what `realtime.send` runs.
#[pg_trigger]
fn queue_broadcast_row<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, RealtimeError> {
    // Raised here rather than returned: pgrx reports a returned error without its SQLSTATE.
    if let Err(e) = stage_row(trigger) {
        e.raise();
    }
    Ok(None)
}

fn stage_row(trigger: &PgTrigger<'_>) -> Result<(), RealtimeError> {
    let messages = guard::require_table(trigger, "realtime.queue_broadcast_row()", c"messages")?;
    let Some(row) = trigger.new() else {
        return Ok(());
    };
    let datum = |e: pgrx::datum::TryFromDatumError| RealtimeError::Internal(e.to_string());
    let extension: Option<&str> = row.get_by_name("extension").map_err(datum)?;
    if extension != Some("broadcast") {
        return Ok(());
    }
    let Some(event) = row.get_by_name::<String>("event").map_err(datum)? else {
        return Ok(());
    };
    let topic: String = row.get_by_name("topic").map_err(datum)?.unwrap_or_default();
    let private: bool = row.get_by_name("private").map_err(datum)?.unwrap_or(false);
    let id: Option<pgrx::Uuid> = row.get_by_name("id").map_err(datum)?;
    let id = id.map(|u| u.to_string()).unwrap_or_default();
    let inserted_at: Option<Timestamp> = row.get_by_name("inserted_at").map_err(datum)?;
    let inserted_at = inserted_at.map_or(0, Timestamp::into_inner);
    require_checked_topic(&topic, messages)?;
    let json = payload_text(trigger)?;
    let binary: Option<&[u8]> = row.get_by_name("binary_payload").map_err(datum)?;
    let (kind, payload) = match (json, binary) {
        (Some(_), Some(_)) => return Err(RealtimeError::TwoPayloads),
        (None, Some(bytes)) => (PayloadKind::Binary, bytes.to_vec()),
        (Some(json), None) => (PayloadKind::Json, json),
        (None, None) => (PayloadKind::Json, b"{}".to_vec()),
    };
    stage(&Message {
        topic: &topic,
        event: &event,
        id: &id,
        inserted_at,
        private,
        kind,
        payload: &payload,
    })
}
