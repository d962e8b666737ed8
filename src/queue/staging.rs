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
use pgrx::trigger_support::{
    trigger_fired_by_insert, trigger_fired_by_update, trigger_fired_for_statement,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::num::NonZeroUsize;

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
    /// What its commit needs from the worker.
    wake: Wake,
}

/// The topics of a transaction's messages, as watch buckets, so that its commit wakes the
/// worker only if somebody on this node joined one of them (see `commit_ring::watched`).
#[derive(Default)]
struct Wake {
    buckets: [u16; WAKE_BUCKETS],
    len: usize,
    /// A relay or a presence change (the worker acts on those whoever listens), or more
    /// topics than `buckets` holds.
    urgent: bool,
}

const WAKE_BUCKETS: usize = 8;

impl Wake {
    fn add(&mut self, message: &Message<'_>) {
        if !matches!(message.kind, PayloadKind::Json | PayloadKind::Binary) {
            self.urgent = true;
            return;
        }
        let bucket = commit_ring::watched::bucket(message.private, message.topic);
        if self.buckets[..self.len].contains(&bucket) {
            return;
        }
        match self.buckets.get_mut(self.len) {
            Some(slot) => {
                *slot = bucket;
                self.len += 1;
            }
            None => self.urgent = true,
        }
    }
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
    let Transaction { reserved, wake, .. } = CURRENT.with_borrow_mut(std::mem::take);
    if let Some(reservation) = reserved {
        reservation.finish(commit_lsn);
        shmem::wake_worker_after_commit(shmem::CommitWake {
            // An abort frees its space and unblocks whatever waits behind it.
            urgent: wake.urgent || reservation.crowded || commit_lsn.is_none(),
            buckets: &wake.buckets[..wake.len],
        });
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
        t.wake.add(message);
        t.staged.push(Staged {
            nest_level: nest_level(),
            body,
        });
        Ok(())
    })
}

/// The columns of `realtime.messages` the trigger reads, each with the only type it reads it
/// as: a datum is never interpreted as another type than its column was checked to have.
const COLUMNS: [(&CStr, pg_sys::Oid); 8] = [
    (c"extension", pg_sys::TEXTOID),
    (c"event", pg_sys::TEXTOID),
    (c"topic", pg_sys::TEXTOID),
    (c"private", pg_sys::BOOLOID),
    (c"id", pg_sys::UUIDOID),
    (c"inserted_at", pg_sys::TIMESTAMPOID),
    (c"payload", pg_sys::JSONBOID),
    (c"binary_payload", pg_sys::BYTEAOID),
];
const EXTENSION: usize = 0;
const EVENT: usize = 1;
const TOPIC: usize = 2;
const PRIVATE: usize = 3;
const ID: usize = 4;
const INSERTED_AT: usize = 5;
const PAYLOAD: usize = 6;
const BINARY_PAYLOAD: usize = 7;

/// The attribute numbers of `COLUMNS` in one relation's tuple descriptor.
type Layout = [NonZeroUsize; COLUMNS.len()];

/// A partition-tree size that is never reached in practice: only bounds the cache.
const MAX_LAYOUTS: usize = 256;

thread_local! {
    /// Layouts by relation OID. The trigger fires with each partition's own tuple descriptor,
    /// and a partition's column order can differ from its parent's (one created with its own
    /// column list and attached, or one with dropped columns), so the cache is per relation. An
    /// entry is a guess only: it is checked against the descriptor at every row, since an OID
    /// can be reused by another relation and a relation can be altered.
    static LAYOUTS: RefCell<HashMap<pg_sys::Oid, Layout>> = RefCell::new(HashMap::new());
}

/// Whether attribute `attno` of `attrs` is the live column `name` of type `typid`.
fn is_column(
    attrs: &[pg_sys::FormData_pg_attribute],
    attno: NonZeroUsize,
    (name, typid): (&CStr, pg_sys::Oid),
) -> bool {
    attrs.get(attno.get() - 1).is_some_and(|a| {
        // SAFETY: attname is a NUL-terminated NameData.
        !a.attisdropped
            && a.atttypid == typid
            && unsafe { CStr::from_ptr(a.attname.data.as_ptr()) } == name
    })
}

/// The layout of the relation `relid` whose tuple descriptor has `attrs`: the cached one when it
/// still matches, else one looked up by name (and cached).
fn layout(
    relid: pg_sys::Oid,
    attrs: &[pg_sys::FormData_pg_attribute],
) -> Result<Layout, RealtimeError> {
    let cached = LAYOUTS.with_borrow(|layouts| layouts.get(&relid).copied());
    if let Some(layout) = cached
        && layout
            .iter()
            .zip(COLUMNS)
            .all(|(&attno, column)| is_column(attrs, attno, column))
    {
        return Ok(layout);
    }
    let mut layout = [NonZeroUsize::MIN; COLUMNS.len()];
    for (slot, (name, typid)) in layout.iter_mut().zip(COLUMNS) {
        let found = attrs.iter().position(|a| {
            // SAFETY: attname is a NUL-terminated NameData.
            !a.attisdropped && unsafe { CStr::from_ptr(a.attname.data.as_ptr()) } == name
        });
        let Some(index) = found else {
            return Err(RealtimeError::Internal(format!(
                "realtime.messages has no {} column",
                name.to_string_lossy()
            )));
        };
        if attrs[index].atttypid != typid {
            return Err(RealtimeError::Internal(format!(
                "the {} column of realtime.messages has an unexpected type",
                name.to_string_lossy()
            )));
        }
        *slot = NonZeroUsize::MIN.saturating_add(index);
    }
    LAYOUTS.with_borrow_mut(|layouts| {
        if layouts.len() >= MAX_LAYOUTS {
            layouts.clear();
        }
        layouts.insert(relid, layout);
    });
    Ok(layout)
}

/// One row's columns, read in place: borrowed values live in the trigger's memory context.
struct Row {
    tuple: *mut pg_sys::HeapTupleData,
    tupdesc: pg_sys::TupleDesc,
    layout: Layout,
}

impl Row {
    fn datum(&self, column: usize) -> Option<pg_sys::Datum> {
        // SAFETY: the tuple belongs to the descriptor, and layout's attribute numbers are within
        // it (checked by layout()).
        unsafe { pgrx::htup::heap_getattr_raw(self.tuple, self.layout[column], self.tupdesc) }
    }

    /// Reads `column` as `T`; `None` for a NULL, or when `typid` is not the column's type.
    ///
    /// # Safety
    /// `T` must read datums of type `typid`. The column itself was checked by layout() to have
    /// the type `COLUMNS` gives it, which is compared with `typid` here.
    unsafe fn get<'r, T: FromDatum + 'r>(&'r self, column: usize, typid: pg_sys::Oid) -> Option<T> {
        if COLUMNS[column].1 != typid {
            return None;
        }
        let datum = self.datum(column)?;
        // SAFETY: the column's type is typid, which the caller vouches T reads; the datum is not
        // null.
        unsafe { T::from_polymorphic_datum(datum, false, typid) }
    }

    fn text(&self, column: usize) -> Option<&str> {
        // SAFETY: &str reads text datums.
        unsafe { self.get(column, pg_sys::TEXTOID) }
    }

    fn boolean(&self, column: usize) -> Option<bool> {
        // SAFETY: bool reads boolean datums.
        unsafe { self.get(column, pg_sys::BOOLOID) }
    }

    fn uuid(&self, column: usize) -> Option<pgrx::Uuid> {
        // SAFETY: pgrx::Uuid reads uuid datums.
        unsafe { self.get(column, pg_sys::UUIDOID) }
    }

    fn timestamp(&self, column: usize) -> Option<Timestamp> {
        // SAFETY: Timestamp reads timestamp (without time zone) datums.
        unsafe { self.get(column, pg_sys::TIMESTAMPOID) }
    }

    fn bytes(&self, column: usize) -> Option<&[u8]> {
        // SAFETY: &[u8] reads bytea datums.
        unsafe { self.get(column, pg_sys::BYTEAOID) }
    }

    /// The `payload` column as JSON text, straight from `jsonb_out`: no detour through a Rust
    /// JSON value, since the text is all the sockets need.
    fn payload_text(&self) -> Result<Option<Vec<u8>>, RealtimeError> {
        let Some(datum) = self.datum(PAYLOAD) else {
            return Ok(None);
        };
        // SAFETY: the payload column was checked to be jsonb; jsonb_out returns a palloc'd
        // NUL-terminated string, freed once copied.
        unsafe {
            let text =
                pgrx::fcinfo::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)])
                    .ok_or_else(|| RealtimeError::Internal("jsonb_out returned NULL".into()))?;
            let cstr = text.cast_mut_ptr::<std::ffi::c_char>();
            let bytes = CStr::from_ptr(cstr).to_bytes().to_vec();
            pg_sys::pfree(cstr.cast());
            Ok(Some(bytes))
        }
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
        unsafe { CStr::from_ptr(raw) }.to_bytes()
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
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let tuple = if trigger_fired_for_statement(event) {
        return Ok(());
    } else if trigger_fired_by_insert(event) {
        data.tg_trigtuple
    } else if trigger_fired_by_update(event) {
        data.tg_newtuple
    } else {
        return Ok(());
    };
    if tuple.is_null() {
        return Ok(());
    }
    // SAFETY: a row trigger's relation and its tuple descriptor are valid while it runs, and
    // natts bounds attrs.
    let (relid, tupdesc, attrs) = unsafe {
        let relation = data.tg_relation;
        let tupdesc = (*relation).rd_att;
        let natts = usize::try_from((*tupdesc).natts).unwrap_or(0);
        ((*relation).rd_id, tupdesc, (*tupdesc).attrs.as_slice(natts))
    };
    let row = Row {
        tuple,
        tupdesc,
        layout: layout(relid, attrs)?,
    };
    if row.text(EXTENSION) != Some("broadcast") {
        return Ok(());
    }
    let Some(event) = row.text(EVENT) else {
        return Ok(());
    };
    let topic = row.text(TOPIC).unwrap_or_default();
    let private = row.boolean(PRIVATE).unwrap_or(false);
    let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id: &str = match row.uuid(ID) {
        Some(u) => uuid::Uuid::from_bytes(*u.as_bytes())
            .hyphenated()
            .encode_lower(&mut id_text),
        None => "",
    };
    let inserted_at = row.timestamp(INSERTED_AT).map_or(0, Timestamp::into_inner);
    require_checked_topic(topic, messages)?;
    let json = row.payload_text()?;
    let binary = row.bytes(BINARY_PAYLOAD);
    let (kind, payload) = match (json, binary) {
        (Some(_), Some(_)) => return Err(RealtimeError::TwoPayloads),
        (None, Some(bytes)) => (PayloadKind::Binary, bytes.to_vec()),
        (Some(json), None) => (PayloadKind::Json, json),
        (None, None) => (PayloadKind::Json, b"{}".to_vec()),
    };
    stage(&Message {
        topic,
        event,
        id,
        inserted_at,
        private,
        kind,
        payload: &payload,
    })
}
