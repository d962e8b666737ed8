//! The commit queue (DESIGN.md principle 2): messages are staged per transaction and per
//! savepoint by a trigger on `realtime.messages`, copied into a shared-memory ring at
//! pre-commit stamped with the transaction id, and read back by the background worker, which
//! delivers an entry only once its transaction has committed.

pub mod shmem;
pub mod staging;

/// Registers the shared memory hooks and the transaction callbacks. Postmaster only.
pub fn init() {
    shmem::init();
    staging::init();
}
