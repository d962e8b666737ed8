//! `realtime.send_synchronous_commit = off`: a transaction whose only writes are messages
//! stored by `realtime.send` commits without waiting for the disk, as a transaction under
//! `synchronous_commit = off` does. A LISTEN/NOTIFY bridge never waits for the disk either
//! (`pg_notify` alone takes no transaction id, so it writes no commit record); this lets a
//! message-only transaction match it while a transaction that also changed the caller's own
//! data keeps the caller's durability.
//!
//! "Only messages" is read off the WAL: the transaction had no id before its first send, and
//! this backend wrote no WAL record between its sends or after its last one. Anything else
//! (an UPDATE before or after, a sequence, a trigger's own writes) leaves the commit as the
//! caller configured it. Reading it that way errs on the durable side only.

use pgrx::pg_sys;
use std::cell::Cell;
use std::sync::atomic::Ordering;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Writes {
    /// Nothing sent in this transaction yet.
    #[default]
    None,
    /// Only sends so far; `wal_end` is where this backend's WAL stood after the last one.
    OnlyMessages { wal_end: u64 },
    /// Something else was written too.
    Mixed,
    /// Pre-commit switched the commit to asynchronous; the caller's setting is restored here.
    Switched { saved: i32 },
}

thread_local! {
    static WRITES: Cell<Writes> = const { Cell::new(Writes::None) };
}

fn wal_end() -> u64 {
    // SAFETY: a backend global, the end of the last WAL record this backend inserted.
    unsafe { pg_sys::XactLastRecEnd }
}

/// Called by `realtime.send` before it stores a message.
pub fn before_send() {
    let next = match WRITES.get() {
        Writes::None => {
            // SAFETY: reads the backend's transaction state.
            let has_xid =
                unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
            if has_xid {
                Writes::Mixed
            } else {
                Writes::OnlyMessages { wal_end: wal_end() }
            }
        }
        Writes::OnlyMessages { wal_end: end } if end != wal_end() => Writes::Mixed,
        other => other,
    };
    WRITES.set(next);
}

/// Called by `realtime.send` once its message is stored.
pub fn after_send() {
    if let Writes::OnlyMessages { .. } = WRITES.get() {
        WRITES.set(Writes::OnlyMessages { wal_end: wal_end() });
    }
}

/// At pre-commit: a message-only transaction commits asynchronously when the setting asks.
pub fn pre_commit() {
    let Writes::OnlyMessages { wal_end: end } = WRITES.get() else {
        return;
    };
    if end != wal_end() || crate::gucs::send_synchronous_commit() {
        return;
    }
    // RecordTransactionCommit reads the variable itself; the GUC machinery is not needed for a
    // value that lives only until the end of this commit, when `end` restores it.
    // SAFETY: a backend global, read by this backend's commit a moment later.
    let saved = unsafe {
        let saved = pg_sys::synchronous_commit;
        pg_sys::synchronous_commit = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32;
        saved
    };
    WRITES.set(Writes::Switched { saved });
    super::shmem::stats()
        .async_commits
        .fetch_add(1, Ordering::Relaxed);
}

/// At commit, abort or prepare: restores the caller's setting and forgets the transaction.
pub fn end() {
    if let Writes::Switched { saved } = WRITES.replace(Writes::None) {
        // SAFETY: as in pre_commit.
        unsafe { pg_sys::synchronous_commit = saved };
    }
}
