//! Transactions on the worker's main thread.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::ffi::c_int;
use std::time::Duration;

/// Starts a transaction and pushes a snapshot for it.
fn begin() {
    // SAFETY: the worker's main thread, between transactions: what a background worker does to
    // start one.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

/// Arms the statement timeout (the worker runs no client loop that would).
fn arm_timeout(timeout: Duration) {
    // SAFETY: STATEMENT_TIMEOUT's handler is registered by InitPostgres in every backend.
    unsafe {
        enable_timeout_after(
            STATEMENT_TIMEOUT,
            timeout.as_millis().min(i32::MAX as u128) as c_int,
        )
    };
}

/// Runs `body` in its own transaction with a snapshot. An ERROR inside propagates (the worker
/// then exits with code 1 and the postmaster restarts it).
pub fn run<R>(body: impl FnOnce() -> R) -> R {
    begin();
    let result = body();
    // SAFETY: ends the transaction begun above, whose snapshot was pushed by begin().
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    result
}

/// Like [`run`], but bounded by a statement timeout, and an ERROR inside is caught, the
/// transaction rolled back, and the error's message returned, so one failed maintenance round
/// does not drop every client nor stall the worker behind someone else's lock.
pub fn try_run<R>(
    timeout: Duration,
    body: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    begin();
    arm_timeout(timeout);
    PgTryBuilder::new(|| {
        let result = body();
        // SAFETY: as in run; the timeout was armed above.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    })
    .catch_others(|caught| {
        // SAFETY: aborting the transaction begun above releases its snapshot and locks.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            pg_sys::AbortCurrentTransaction();
        }
        Err(caught_message(caught))
    })
    .execute()
}

// utils/timeout.h is not in pgrx's bindings. `TimeoutId` is a C enum: STATEMENT_TIMEOUT is its
// fourth member in PostgreSQL 15. Every backend, background workers included, registers its
// handler in InitPostgres; only the client loop arms it, which a worker does not run.
const STATEMENT_TIMEOUT: c_int = 3;

// Neither raises an ERROR (an unregistered timeout is FATAL, which exits), so no guard is needed.
unsafe extern "C" {
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
}

/// [`try_run`] for a body that returns an SPI result: either kind of failure as one message.
pub fn try_spi<R>(
    timeout: Duration,
    body: impl FnOnce() -> Result<R, spi::SpiError> + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    try_run(timeout, body)?.map_err(|e| e.to_string())
}

fn caught_message(caught: CaughtError) -> String {
    match caught {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Runs `body` in a transaction that is always rolled back, with a statement timeout (the
/// worker runs no client loop that would arm one); an ERROR inside becomes `Err`.
pub fn rolled_back<R>(
    timeout: Duration,
    body: impl FnOnce() -> Result<R, String>,
) -> Result<R, String> {
    begin();
    arm_timeout(timeout);
    let body = std::panic::AssertUnwindSafe(body);
    let result = PgTryBuilder::new(move || {
        let body = body;
        (body.0)()
    })
    .catch_others(|caught| Err(caught_message(caught)))
    .execute();
    // SAFETY: as in try_run.
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        pg_sys::AbortCurrentTransaction();
    }
    result
}

/// Runs `setup`, then `body` once per item, all in one transaction that is always rolled back,
/// each item in its own subtransaction (rolled back too) with its own statement timeout: one
/// failing item fails alone. One transaction per batch instead of per item spares a transaction start, an
/// abort record and a WAL writer wake-up per item.
pub fn rolled_back_each<T, R>(
    timeout: Duration,
    items: &[T],
    setup: impl FnOnce(),
    body: impl Fn(&T) -> Result<R, String>,
) -> Vec<Result<R, String>> {
    if items.is_empty() {
        return Vec::new();
    }
    begin();
    setup();
    let results = each_rolled_back(Some(timeout), items, body);
    // SAFETY: aborts the transaction begun above.
    unsafe { pg_sys::AbortCurrentTransaction() };
    results
}

/// Runs `body` once per item inside the current transaction, each item in its own
/// subtransaction that is rolled back, with its own statement timeout if `timeout` is set
/// (a backend's own statement timeout already covers a SQL function's call).
pub fn each_rolled_back<T, R>(
    timeout: Option<Duration>,
    items: &[T],
    body: impl Fn(&T) -> Result<R, String>,
) -> Vec<Result<R, String>> {
    each_in_subtransaction(timeout, items, body, false)
}

/// Runs `body` once per item inside the current transaction, each item in its own
/// subtransaction with its own statement timeout: kept (released) when `body` returns `Ok`,
/// rolled back when it returns `Err` or raises, so one failing item fails alone and the others
/// commit with the transaction.
pub fn each_kept<T, R>(
    timeout: Duration,
    items: &[T],
    body: impl Fn(&T) -> Result<R, String>,
) -> Vec<Result<R, String>> {
    each_in_subtransaction(Some(timeout), items, body, true)
}

/// The loop of [`each_rolled_back`] and [`each_kept`]: `keep` releases the subtransactions of
/// the items whose `body` returned `Ok` instead of rolling them back.
fn each_in_subtransaction<T, R>(
    timeout: Option<Duration>,
    items: &[T],
    body: impl Fn(&T) -> Result<R, String>,
    keep: bool,
) -> Vec<Result<R, String>> {
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        // What the subtransaction's start and rollback switch away from, as plpgsql restores
        // around each BEGIN ... EXCEPTION block.
        let (context, owner) =
            // SAFETY: plain reads of backend globals.
            unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
        // SAFETY: inside a transaction (the caller's).
        unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
        if let Some(timeout) = timeout {
            arm_timeout(timeout);
        }
        let run = std::panic::AssertUnwindSafe(|| body(item));
        let result = PgTryBuilder::new(move || {
            let run = run;
            (run.0)()
        })
        .catch_others(|caught| Err(caught_message(caught)))
        .execute();
        // SAFETY: ends the subtransaction begun above (keeping its work only when asked and on
        // success) and restores what its start switched away from, as PL/pgSQL does.
        unsafe {
            if timeout.is_some() {
                disable_timeout(STATEMENT_TIMEOUT, false);
            }
            if keep && result.is_ok() {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
        results.push(result);
    }
    results
}

/// A statement planned once for the worker's life (the plan cache revalidates it).
pub type KeptPlan = std::cell::OnceCell<spi::OwnedPreparedStatement>;

/// Runs `f` with the statement kept in `cell`, preparing it on first use.
pub fn with_plan<R>(
    cell: &'static std::thread::LocalKey<KeptPlan>,
    client: &spi::SpiClient<'_>,
    sql: &str,
    types: &[PgOid],
    f: impl FnOnce(&spi::OwnedPreparedStatement) -> Result<R, String>,
) -> Result<R, String> {
    cell.with(|cell| {
        let plan = match cell.get() {
            Some(plan) => plan,
            None => {
                let kept = client
                    .prepare_mut(sql, types)
                    .map_err(|e| e.to_string())?
                    .keep();
                cell.get_or_init(|| kept)
            }
        };
        f(plan)
    })
}
