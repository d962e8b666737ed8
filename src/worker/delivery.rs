//! Reading the commit queue: entries are delivered in ring order (= commit order) once their
//! transaction committed, skipped when it aborted, and waited for while it is in progress.

use crate::queue::shmem;
use commit_ring::{Message, PayloadKind};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Entries taken per lock hold, so committing backends never wait long for the ring.
const BATCH: usize = 512;
/// While an entry's transaction is still in progress, look again this often even without a
/// wake-up (its backend wakes the worker at commit or abort; this only bounds a lost wake-up).
const BLOCKED_POLL: Duration = Duration::from_millis(50);
const IDLE_POLL: Duration = Duration::from_secs(1);

/// A committed message, copied out of shared memory.
#[derive(Debug)]
pub struct Committed {
    pub topic: String,
    pub event: String,
    pub id: String,
    pub private: bool,
    pub kind: PayloadKind,
    pub payload: Vec<u8>,
}

enum Status {
    InProgress,
    Committed,
    Aborted,
}

fn status(xid: u32) -> Status {
    let xid = pg_sys::TransactionId::from(xid);
    unsafe {
        if pg_sys::TransactionIdIsInProgress(xid) {
            Status::InProgress
        } else if pg_sys::TransactionIdDidCommit(xid) {
            Status::Committed
        } else {
            Status::Aborted
        }
    }
}

/// Takes up to [`BATCH`] finished entries off the ring. Returns the committed messages of
/// `database` and whether an in-progress transaction blocks the rest.
pub fn drain(database: u32) -> (Vec<Committed>, bool) {
    let mut out = Vec::new();
    let mut discarded = 0u64;
    let blocked = shmem::consume(|ring, buf| {
        for _ in 0..BATCH {
            let Some(entry) = ring.peek(buf) else {
                return false;
            };
            match status(entry.xid) {
                Status::InProgress => return true,
                Status::Aborted => discarded += 1,
                Status::Committed if entry.database != database => discarded += 1,
                Status::Committed => match Message::decode(entry.body) {
                    Ok(m) => out.push(Committed {
                        topic: m.topic.to_owned(),
                        event: m.event.to_owned(),
                        id: m.id.to_owned(),
                        private: m.private,
                        kind: m.kind,
                        payload: m.payload.to_vec(),
                    }),
                    Err(_) => discarded += 1,
                },
            }
            let next = entry.next;
            ring.advance(next);
        }
        false
    });
    shmem::stats()
        .discarded
        .fetch_add(discarded, Ordering::Relaxed);
    (out, blocked)
}

/// Frees the ring while there is no server to deliver to (the extension does not exist in
/// the worker's database yet, so nothing in the ring can be for it).
pub fn discard_queue() {
    loop {
        let (messages, blocked) = drain(0);
        if messages.is_empty() && (blocked || shmem::usage().0 == 0) {
            return;
        }
    }
}

/// The worker's link to the socket server.
pub struct Delivery {
    database: u32,
    blocked: bool,
}

impl Delivery {
    pub fn start(_database_name: &str) -> Delivery {
        log!("pg_realtime: worker ready");
        Delivery {
            database: u32::from(unsafe { pg_sys::MyDatabaseId }),
            blocked: false,
        }
    }

    pub fn poll_interval(&self) -> Duration {
        if self.blocked {
            BLOCKED_POLL
        } else {
            IDLE_POLL
        }
    }

    /// Sleeps until the latch is set, the server has news, or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) {
        let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                pg_sys::PGINVALID_SOCKET,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }

    pub fn reload(&mut self) {}

    pub fn deliver(&mut self) {
        loop {
            let (messages, blocked) = drain(self.database);
            self.blocked = blocked;
            let n = messages.len();
            shmem::stats()
                .delivered
                .fetch_add(n as u64, Ordering::Relaxed);
            if n == 0 || blocked {
                return;
            }
        }
    }

    pub fn shutdown(self) {}
}
