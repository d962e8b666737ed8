//! Reading the commit queue: committed records are delivered in commit order once nothing can
//! commit before them any more, aborted ones are skipped, and an unfinished one holds back
//! whatever may still be overtaken by it.

use crate::queue::shmem;
use commit_ring::{Message, PayloadKind, Pending};
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::offset::Offset;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Transactions taken per lock hold, so committing backends never wait long for the ring.
const BATCH: usize = 256;
/// A record whose transaction is over but was never marked by its backend (only possible if
/// that backend died between its commit and its commit callback) is settled from the commit
/// log after this long, so that it cannot hold back the queue forever.
const ABANDONED_AFTER: Duration = Duration::from_secs(5);

/// A committed message, copied out of shared memory.
#[derive(Debug)]
pub struct Committed {
    pub topic: String,
    pub event: String,
    pub id: String,
    pub private: bool,
    pub kind: PayloadKind,
    pub payload: Vec<u8>,
    /// The row's `inserted_at` (with `id`, where to write its offset back).
    pub inserted_at: i64,
    /// Its commit LSN and its index among its transaction's queued messages.
    pub offset: Offset,
}

/// Takes up to [`BATCH`] ready transactions off the ring. Returns the committed messages of
/// `database`, in commit order, and the unfinished transaction that holds back the rest.
pub fn drain(database: u32) -> (Vec<Committed>, Option<Pending>) {
    let mut out = Vec::new();
    let mut discarded = 0u64;
    let pending = shmem::take_ready(BATCH, |ready, _| {
        discarded += ready.aborted_messages;
        for record in &ready.records {
            if record.database != database {
                discarded += u64::from(record.message_count());
                continue;
            }
            for (index, body) in record.messages().enumerate() {
                match Message::decode(body) {
                    Ok(m) => out.push(Committed {
                        topic: m.topic.to_owned(),
                        event: m.event.to_owned(),
                        id: m.id.to_owned(),
                        private: m.private,
                        kind: m.kind,
                        payload: m.payload.to_vec(),
                        inserted_at: m.inserted_at,
                        offset: Offset::new(record.commit_lsn, index as u32),
                    }),
                    Err(_) => discarded += 1,
                }
            }
        }
        ready.pending
    });
    shmem::stats()
        .discarded
        .fetch_add(discarded, Ordering::Relaxed);
    (out, pending)
}

/// Frees the ring while there is no server to deliver to (the extension does not exist in
/// the worker's database yet, so nothing in the ring can be for it).
pub fn discard_queue() {
    loop {
        let (messages, pending) = drain(0);
        if messages.is_empty() && (pending.is_some() || shmem::usage().0 == 0) {
            return;
        }
    }
}

/// Watches the record that holds back delivery, to settle it if its backend never does.
#[derive(Default)]
pub struct Stall {
    since: Option<(Pending, Instant)>,
}

impl Stall {
    pub fn observe(&mut self, pending: Option<Pending>) {
        let Some(pending) = pending else {
            self.since = None;
            return;
        };
        // SAFETY: plain reads of the proc array and commit log, on the main thread inside the
        // worker's connected backend.
        let running =
            unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(pending.xid)) };
        match self.since {
            _ if running => self.since = None,
            Some((p, since)) if p == pending => {
                if since.elapsed() >= ABANDONED_AFTER {
                    // SAFETY: as above; the transaction is over, so its status is final.
                    let committed = unsafe {
                        pg_sys::TransactionIdDidCommit(pg_sys::TransactionId::from(pending.xid))
                    };
                    log!(
                        "pg_realtime: transaction {} ended without marking its queued messages; {} them",
                        pending.xid,
                        if committed { "delivering" } else { "dropping" }
                    );
                    // Its commit record came after its floor: close enough for a lost stamp.
                    shmem::settle(&pending, committed.then_some(pending.floor));
                    self.since = None;
                }
            }
            _ => self.since = Some((pending, Instant::now())),
        }
    }
}
