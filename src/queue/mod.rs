//! The commit queue: only committed messages reach sockets, and in commit order. Messages are
//! staged per transaction and per savepoint by a trigger on `realtime.messages`, reserved as
//! one record of a shared-memory ring at pre-commit, stamped with the commit LSN by the commit
//! callback, and read back by the background worker in commit-LSN order, only once committed.

//!
//! `commands` shares the same shared-memory hooks: the small bounded channel through which SQL
//! backends ask the worker about its sockets and tell it to close some.

pub mod commands;
pub mod commit_mode;
pub mod guard;
pub mod shmem;
pub mod staging;

/// Registers the shared memory hooks and the transaction callbacks. Postmaster only.
pub fn init() {
    shmem::init();
    staging::init();
}
