//! `realtime.send(payload, event, topic, private)` and `realtime.send_binary(...)`: the hottest
//! SQL functions of the extension, so they run their checks in Rust and store the message with
//! one INSERT plan kept per backend.

use std::cell::RefCell;
use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use pgrx::fcinfo::{pg_getarg_datum, pg_return_void};
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::error::RealtimeError;
use crate::gucs::{self, SendErrors};
use crate::queue::commit_mode;

/// Everything is schema-qualified: the plan is parsed under the first caller's search_path.
/// The payload already holds the row's id (see [`with_id`]).
const INSERT: &CStr =
    c"INSERT INTO realtime.messages (id, payload, event, topic, private, extension) \
    VALUES ($1, $2, $3, $4, COALESCE($5, true), 'broadcast')";

/// The same for a binary payload, which is stored as it is.
const INSERT_BINARY: &CStr =
    c"INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension) \
    VALUES ($1, $2, $3, $4, COALESCE($5, true), 'broadcast')";

/// A prepared INSERT, kept for the backend's life (the plan cache revalidates it).
struct KeptInsert {
    sql: &'static CStr,
    payload_type: pg_sys::Oid,
    plan: AtomicPtr<pg_sys::_SPI_plan>,
}

static JSON: KeptInsert = KeptInsert {
    sql: INSERT,
    payload_type: pg_sys::JSONBOID,
    plan: AtomicPtr::new(ptr::null_mut()),
};

static BINARY: KeptInsert = KeptInsert {
    sql: INSERT_BINARY,
    payload_type: pg_sys::BYTEAOID,
    plan: AtomicPtr::new(ptr::null_mut()),
};

const WARNING_HINT: &str = "The message was not sent. SET realtime.send_errors = error to raise \
                            instead; failures are counted in realtime.stats().";

/// The C entry point of `realtime.send` (declared in sql/api.sql).
///
/// # Safety
/// Called by the function manager with a valid `fcinfo` of four arguments.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn realtime_send(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid fcinfo with the four arguments declared in
    // sql/api.sql.
    let Some(payload) = (unsafe { pg_getarg_datum(fcinfo, 0) }) else {
        RealtimeError::SendNullPayload.raise()
    };
    // SAFETY: a non-null argument 0 of realtime.send is a jsonb datum.
    if let Some(kind) = unsafe { non_object_kind(payload) } {
        RealtimeError::SendPayloadNotObject(kind).raise()
    }
    let id = random_uuid();
    // SAFETY: as above; the payload is a jsonb object, and JSON's plan takes a jsonb payload.
    unsafe { send(fcinfo, id, with_id(payload, &id), &JSON) }
}

/// The C entry point of `realtime.send_binary` (declared in sql/api.sql).
///
/// # Safety
/// Called by the function manager with a valid `fcinfo` of four arguments.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn realtime_send_binary(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid fcinfo with the four arguments declared in
    // sql/api.sql.
    let Some(payload) = (unsafe { pg_getarg_datum(fcinfo, 0) }) else {
        RealtimeError::SendBinaryNullPayload.raise()
    };
    // SAFETY: as above; BINARY's plan takes a bytea payload.
    unsafe { send(fcinfo, random_uuid(), payload, &BINARY) }
}

/// The rest of both: the event, topic and private arguments, and the insert of the row `id`.
unsafe fn send(
    fcinfo: pg_sys::FunctionCallInfo,
    id: [u8; 16],
    payload: pg_sys::Datum,
    insert_with: &KeptInsert,
) -> pg_sys::Datum {
    // SAFETY: the caller vouches for fcinfo; n is below its four arguments.
    let arg = |n| unsafe { pg_getarg_datum(fcinfo, n) };
    // SAFETY: arguments 1 and 2 are declared text.
    let (topic, topic_text) = unsafe { required_text(arg(2), "topic") };
    // SAFETY: as above.
    let (event, _) = unsafe { required_text(arg(1), "event") };
    // Lets INSERT policies decide with realtime.topic(), as in Supabase; it stays set for the
    // rest of the transaction, as set_config(..., true) does.
    // SAFETY: text_to_cstring returned a NUL-terminated palloc'd string.
    gucs::set_local(c"realtime.topic", unsafe { CStr::from_ptr(topic_text) });

    let private = arg(3);
    let mut values = [
        pgrx::Uuid::from_bytes(id)
            .into_datum()
            .unwrap_or_else(|| RealtimeError::Internal("uuid datum".into()).raise()),
        payload,
        event,
        topic,
        private.unwrap_or(pg_sys::Datum::null()),
    ];
    let nulls = [
        b' ',
        b' ',
        b' ',
        b' ',
        if private.is_some() { b' ' } else { b'n' },
    ];
    commit_mode::before_send();
    match gucs::send_errors() {
        // SAFETY: values and nulls match the kept plan's five parameters, and this backend is in
        // a transaction (a SQL function is running).
        SendErrors::Error => unsafe { insert(insert_with, &mut values, &nulls) },
        // SAFETY: as above.
        SendErrors::Warning => unsafe { insert_or_warn(insert_with, &mut values, &nulls) },
    }
    commit_mode::after_send();
    pg_return_void()
}

const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };

/// The function manager's "version 1" record for `realtime_send`.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_realtime_send() -> &'static pg_sys::Pg_finfo_record {
    &V1
}

/// The function manager's "version 1" record for `realtime_send_binary`.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_realtime_send_binary() -> &'static pg_sys::Pg_finfo_record {
    &V1
}

/// `None` for a JSON object, else what `jsonb_typeof` calls it.
unsafe fn non_object_kind(payload: pg_sys::Datum) -> Option<String> {
    // A Jsonb is a 4-byte varlena header followed by its root container's header word.
    // SAFETY: payload is a non-null jsonb datum; detoasting yields a complete varlena.
    let jsonb = unsafe { pg_sys::pg_detoast_datum(payload.cast_mut_ptr()) };
    // SAFETY: a detoasted Jsonb has at least its varlena header and root header word.
    let root = unsafe {
        jsonb
            .cast::<u8>()
            .add(pg_sys::VARHDRSZ)
            .cast::<u32>()
            .read_unaligned()
    };
    if root & pg_sys::JB_FOBJECT != 0 {
        return None;
    }
    let kind =
        // SAFETY: jsonb_typeof takes one non-null jsonb, which payload is.
        unsafe { pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(payload)]) };
    Some(kind.unwrap_or_else(|| "unknown".into()))
}

/// Raises unless `value` is a non-empty text; returns it and its C string.
unsafe fn required_text(
    value: Option<pg_sys::Datum>,
    what: &'static str,
) -> (pg_sys::Datum, *mut std::ffi::c_char) {
    let Some(value) = value else {
        RealtimeError::SendNullArgument(what).raise()
    };
    // SAFETY: the caller passes a non-null text datum.
    let text = unsafe { pg_sys::text_to_cstring(value.cast_mut_ptr()) };
    // SAFETY: text_to_cstring returns a NUL-terminated string, so its first byte is readable.
    if unsafe { *text } == 0 {
        RealtimeError::SendEmptyArgument(what).raise()
    }
    (value, text)
}

thread_local! {
    /// The generator of message ids and the process it was seeded in. The library is loaded in
    /// the postmaster, so a generator seeded there would be copied into every backend it forks,
    /// each then producing the same ids: it is seeded on first use, and again whenever the
    /// process id shows it was inherited.
    static IDS: RefCell<Option<(i32, ChaCha20Rng)>> = const { RefCell::new(None) };
}

/// A version 4 UUID from a ChaCha20 generator seeded with 32 bytes of `pg_strong_random` (the
/// source of `gen_random_uuid()`), rather than a call into the crypto library for every id.
fn random_uuid() -> [u8; 16] {
    // PostgreSQL's copy of the process id, set at each fork (no system call).
    // SAFETY: a backend global, written only when the process starts.
    let pid = unsafe { pg_sys::MyProcPid };
    let mut bytes = [0u8; 16];
    let filled = IDS.with_borrow_mut(|ids| match ids {
        Some((owner, rng)) if *owner == pid => {
            rng.fill_bytes(&mut bytes);
            true
        }
        _ => false,
    });
    if !filled {
        let mut seed = [0u8; 32];
        // SAFETY: writes at most seed.len() bytes into seed.
        if !unsafe { pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) } {
            RealtimeError::Internal("could not generate random values".into()).raise()
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        rng.fill_bytes(&mut bytes);
        IDS.set(Some((pid, rng)));
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// `payload` with the row's id added as `"id"` unless it has one, as Supabase's `send` does
/// (`payload || jsonb_build_object('id', id)`). Built here rather than in the INSERT, where
/// `jsonb_build_object` looks its argument's type up again for every message.
///
/// # Safety
/// `payload` is a non-null jsonb datum, and this runs inside a transaction.
unsafe fn with_id(payload: pg_sys::Datum, id: &[u8; 16]) -> pg_sys::Datum {
    // SAFETY: jsonb_exists takes a jsonb and a text; cstring_to_text returns a palloc'd text.
    let has_id = unsafe {
        let key = pg_sys::cstring_to_text(c"id".as_ptr());
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::jsonb_exists,
            &[Some(payload), Some(pg_sys::Datum::from(key))],
        )
    };
    if has_id.is_some_and(|d| d.value() != 0) {
        return payload;
    }
    // SAFETY: jsonb_concat takes two jsonb values; id_object returns one.
    unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::jsonb_concat,
            &[Some(payload), Some(id_object(id))],
        )
    }
    .unwrap_or_else(|| RealtimeError::Internal("adding the id to the payload".into()).raise())
}

/// A placeholder id of the right length, found once in the binary `{"id": "…"}` jsonb_in made:
/// its type is the length the uuid encoder writes, so the two cannot drift apart.
const SAMPLE_ID: &[u8; uuid::fmt::Hyphenated::LENGTH] = b"a0a0a0a0-b1b1-c2c2-d3d3-e4e4e4e4e4e4";

thread_local! {
    /// The jsonb `{"id": SAMPLE_ID}` as jsonb_in built it, and where the id's text is in it.
    /// Every id has the same length, so every such object has these bytes but the id's: copying
    /// them and writing the id in place costs a small part of parsing the text each time.
    static ID_OBJECT: std::cell::OnceCell<(Vec<u8>, usize)> = const { std::cell::OnceCell::new() };
}

/// The jsonb `{"id": "<id>"}`, palloc'd in the current memory context.
///
/// # Safety
/// Runs inside a transaction.
unsafe fn id_object(id: &[u8; 16]) -> pg_sys::Datum {
    ID_OBJECT.with(|template| {
        let (bytes, at) = template.get_or_init(|| {
            let mut text = b"{\"id\": \"".to_vec();
            text.extend_from_slice(SAMPLE_ID);
            text.extend_from_slice(b"\"}\0");
            // SAFETY: text is a NUL-terminated JSON object; jsonb_in returns a detoasted
            // varlena with a 4-byte header, whose VARSIZE bytes are all readable.
            let bytes = unsafe {
                let jsonb = pgrx::fcinfo::direct_function_call_as_datum(
                    pg_sys::jsonb_in,
                    &[Some(pg_sys::Datum::from(text.as_ptr()))],
                )
                .unwrap_or_else(|| RealtimeError::Internal("jsonb_in returned NULL".into()).raise())
                .cast_mut_ptr::<pg_sys::varlena>();
                std::slice::from_raw_parts(jsonb.cast::<u8>(), pgrx::varlena::varsize_any(jsonb))
                    .to_vec()
            };
            let at = bytes
                .windows(SAMPLE_ID.len())
                .position(|w| w == SAMPLE_ID)
                .unwrap_or_else(|| {
                    RealtimeError::Internal("the id's place in its jsonb object".into()).raise()
                });
            (bytes, at)
        });
        // SAFETY: palloc returns bytes.len() writable bytes in the current memory context; the
        // copy is the template's complete varlena, and the id's characters replace the
        // sample's, as many, at the same place.
        unsafe {
            let copy = pg_sys::palloc(bytes.len()).cast::<u8>();
            let out = std::slice::from_raw_parts_mut(copy, bytes.len());
            out.copy_from_slice(bytes);
            uuid::Uuid::from_bytes(*id)
                .hyphenated()
                .encode_lower(&mut out[*at..*at + SAMPLE_ID.len()]);
            pg_sys::Datum::from(copy)
        }
    })
}

/// Runs the kept INSERT; any error propagates.
unsafe fn insert(insert_with: &KeptInsert, values: &mut [pg_sys::Datum; 5], nulls: &[u8; 5]) {
    // SAFETY: called by send inside a transaction; SPI_connect/SPI_finish bracket the plan's use,
    // and values and nulls have the plan's five parameters.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            RealtimeError::Internal("SPI_connect failed".into()).raise()
        }
        let plan = kept_plan(insert_with);
        let rc =
            pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr().cast(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            RealtimeError::Internal(format!("storing the message returned SPI code {rc}")).raise()
        }
        pg_sys::SPI_finish();
    }
}

/// Must be called while connected to SPI.
unsafe fn kept_plan(insert_with: &KeptInsert) -> pg_sys::SPIPlanPtr {
    let plan = insert_with.plan.load(Ordering::Relaxed);
    if !plan.is_null() {
        return plan;
    }
    let mut types = [
        pg_sys::UUIDOID,
        insert_with.payload_type,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::BOOLOID,
    ];
    // SAFETY: the caller is connected to SPI; types has as many entries as the statement has
    // parameters, and the kept plan lives as long as the backend.
    unsafe {
        let plan = pg_sys::SPI_prepare(
            insert_with.sql.as_ptr(),
            types.len() as i32,
            types.as_mut_ptr(),
        );
        if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
            RealtimeError::Internal("could not prepare the message insert".into()).raise()
        }
        insert_with.plan.store(plan, Ordering::Relaxed);
        plan
    }
}

/// Supabase's behaviour: a failed insert (permissions, policies, constraints) becomes a
/// WARNING, is counted, and the caller's transaction goes on. The insert runs in a
/// subtransaction, as a PL/pgSQL `BEGIN ... EXCEPTION` block would run it.
unsafe fn insert_or_warn(
    insert_with: &KeptInsert,
    values: &mut [pg_sys::Datum; 5],
    nulls: &[u8; 5],
) {
    // SAFETY: plain reads of backend globals.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: inside a transaction (a SQL function is running); the caller's memory context is
    // restored at once, as PL/pgSQL does around an exception block.
    unsafe {
        pg_sys::BeginInternalSubTransaction(ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let values = std::panic::AssertUnwindSafe(values);
    let outcome = PgTryBuilder::new(move || {
        let values = values;
        // SAFETY: inside the subtransaction just begun; the caller vouches for values and nulls.
        unsafe { insert(insert_with, values.0, nulls) };
        Ok(())
    })
    .catch_others(|caught| Err(Box::new(caught)))
    .execute();
    // SAFETY: ends the subtransaction begun above, then restores the caller's memory context and
    // resource owner, which the subtransaction's end switched away from.
    unsafe {
        match outcome {
            Ok(()) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    if let Err(caught) = outcome {
        let report = match caught.as_ref() {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r)
                if !must_propagate(r.sql_error_code()) =>
            {
                r
            }
            _ => caught.rethrow(),
        };
        super::stats::count_failed_send();
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("WarnSendingBroadcastMessage: {}", report.message()),
            "pg_realtime",
        )
        .set_hint(WARNING_HINT)
        .report(PgLogLevel::WARNING);
    }
}

/// Errors that are not the insert being refused: bad input (too large, too long) is the
/// caller's bug, and a cancel or an assertion must stop the caller, as PL/pgSQL's `WHEN OTHERS`
/// would let them.
fn must_propagate(code: PgSqlErrorCode) -> bool {
    let category = |c: PgSqlErrorCode| (c as i32) & ((1 << 12) - 1);
    let code_category = category(code);
    code_category == category(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION)
        || code_category == category(PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED)
        || code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
        || code == PgSqlErrorCode::ERRCODE_ASSERT_FAILURE
}
