//! The background worker "pg_realtime": its main thread is the only thread that calls
//! Postgres. It drains the commit queue, maintains partitions and runs the socket server,
//! whose threads never touch Postgres.
//!
//! - `main_loop`: sleeps, delivers, answers the server, schedules maintenance;
//! - `queue_reader`: takes committed messages off the shared-memory commit queue;
//! - `server_link`: starts the socket server, hands it messages, answers its events;
//! - `authorization`: RLS checks and replay for private channels;
//! - `persist`: client broadcasts sent with `persist`, checked and stored in `realtime.messages`;
//! - `presence`: the SQL mirror of socket presence and SQL-tracked presence;
//! - `presence_events`: socket presence changes written into `realtime.presence_events`;
//! - `admin`: answers SQL backends' requests about sockets (list them, close some);
//! - `maintenance`: daily partitions and retention;
//! - `offset_writer`: delivered messages' offsets, stored on their rows for resumes;
//! - `transaction`: the worker's own transactions, with timeouts and savepoints;
//! - `logging`: log records from the network threads, written by the main thread;
//! - `usage`: the worker's memory and what holds it, published for `realtime.stats()`;
//! - `allocator`: gives memory freed after a burst back to the operating system;
//! - `bus_writer` / `bus_reader`: the bus between nodes, written into the primary's WAL and
//!   read back from each hot standby's.

mod admin;
mod allocator;
pub(crate) mod authorization;
mod bus_reader;
mod bus_writer;
mod logging;
mod main_loop;
mod maintenance;
mod offset_writer;
mod persist;
mod presence;
mod presence_events;
mod queue_reader;
mod server_link;
mod transaction;
mod usage;

use crate::gucs;
use crate::queue::shmem;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::Duration;

/// How long the postmaster waits before restarting a worker that exited with code 1.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// How often the worker looks for the extension while it has not been created yet.
const EXTENSION_POLL: Duration = Duration::from_secs(5);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_realtime")
        .set_type("pg_realtime")
        .set_library("pg_realtime")
        .set_function("pg_realtime_worker_main")
        .enable_spi_access()
        // Hot standbys serve sockets too: start once they accept read-only connections.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_realtime_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyLatch is this process's latch, set up before the worker's main runs.
    shmem::register_worker_latch(unsafe { pg_sys::MyLatch });
    if let Err(e) = transaction::run(settle_session) {
        // Never run as a superuser with a search_path someone else chose.
        log!("pg_realtime: cannot set up the worker's session: {e}");
        // SAFETY: the worker's main thread, outside any transaction.
        unsafe { pg_sys::proc_exit(1) };
    }

    if !wait_for_extension(&database) {
        // SAFETY: as above.
        unsafe { pg_sys::proc_exit(1) };
    }
    main_loop::run(&database);
    // Exit code 1, not 0: a worker that exits with 0 is never restarted, and a terminated
    // worker (pg_terminate_backend) must come back. At server shutdown nothing is restarted.
    log!("pg_realtime: worker stopped");
    // SAFETY: as above.
    unsafe { pg_sys::proc_exit(1) };
}

/// Session settings of the worker, which runs as a superuser:
/// - its own statements resolve names in `pg_catalog` only, so that no schema owner's function
///   or operator ever runs with its rights; the search_path it had before is kept for the
///   users' policies (see `authorization`, whose statements under it are schema-qualified);
/// - it never waits long for a lock: a long reader must not stall delivery for everyone;
/// - its statements (authorization, replay, presence) run thousands of times with new
///   parameters: they are planned once (partitions are pruned at run time).
fn settle_session() -> Result<(), spi::SpiError> {
    let original = read_one::<String>("SELECT pg_catalog.current_setting('search_path')")?;
    authorization::set_policy_search_path(original.unwrap_or_default());
    for (name, value) in [
        ("search_path", "pg_catalog, pg_temp".to_string()),
        ("lock_timeout", LOCK_TIMEOUT.as_millis().to_string()),
        ("plan_cache_mode", "force_generic_plan".to_string()),
    ] {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT pg_catalog.set_config($1, $2, false)",
                    Some(1),
                    &[name.into(), value.into()],
                )
                .map(drop)
        })?;
    }
    Ok(())
}

/// The one value of a read-only query. Unlike `Spi::get_one`, which prepares for writes and
/// so takes a transaction id, it also runs on a hot standby.
fn read_one<T: FromDatum + IntoDatum>(sql: &str) -> Result<Option<T>, spi::SpiError> {
    Spi::connect(|client| client.select(sql, Some(1), &[])?.first().get_one::<T>())
}

/// How long any of the worker's statements waits for a lock before it gives up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether `CREATE EXTENSION pg_realtime` has run in the worker's database.
fn extension_exists() -> bool {
    transaction::run(|| {
        read_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_realtime')")
            .ok()
            .flatten()
            .unwrap_or(false)
    })
}

/// Called when the worker's own SQL fails: if the extension was dropped, exit with code 1 so
/// the postmaster starts a fresh worker, which waits (quietly) for CREATE EXTENSION again.
fn exit_if_extension_dropped() {
    if !extension_exists() {
        log!("pg_realtime: the extension was dropped; restarting the worker to wait for it");
        // SAFETY: as above.
        unsafe { pg_sys::proc_exit(1) };
    }
}

/// Waits, without flooding the log, until `CREATE EXTENSION pg_realtime` has run in the
/// worker's database, draining the queue meanwhile so other databases' sends never block.
/// Returns false when asked to stop.
fn wait_for_extension(database: &str) -> bool {
    let mut logged = false;
    loop {
        if extension_exists() {
            return true;
        }
        if !logged {
            log!(
                "pg_realtime: waiting for CREATE EXTENSION pg_realtime in database \"{database}\""
            );
            logged = true;
        }
        queue_reader::discard_queue();
        if !BackgroundWorker::wait_latch(Some(EXTENSION_POLL)) {
            return false;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the worker's main thread, between transactions.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}
