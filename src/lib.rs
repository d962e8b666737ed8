//! pg_realtime: Supabase-Realtime-compatible Broadcast and Presence inside PostgreSQL.
//!
//! Layout: `gucs` (settings), `api/` (SQL functions in Rust; the rest of the SQL API is in
//! `sql/`), `queue/` (the commit queue: per-transaction staging and the shared-memory ring),
//! `worker/` (the background worker: the only process-side code that runs the socket server,
//! whose network threads live in the pgrx-free `realtime-server` crate).

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod api;
mod error;
mod gucs;
mod queue;
mod worker;

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: backend globals, read while the library is being loaded.
    unsafe {
        if pg_sys::IsBinaryUpgrade {
            return;
        }
        if !pg_sys::process_shared_preload_libraries_in_progress {
            error::RealtimeError::NotPreloaded.raise();
        }
    }
    gucs::init();
    // SAFETY: called from _PG_init after the settings are defined, as PostgreSQL expects.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"realtime".as_ptr()) };
    queue::init();
    worker::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries='pg_realtime'",
            // The in-backend tests need no socket server; keep its port out of the way.
            "realtime.port=0",
        ]
    }
}
