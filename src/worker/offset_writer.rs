//! Offsets written back into `realtime.messages`, so that a client can resume after the last
//! message it saw (`config.broadcast.replay.offset`).
//!
//! A message's offset is its commit LSN and its index in its transaction, known only once it
//! has committed: the worker learns it when it takes the message off the commit queue, in
//! commit order, and stores it on the row here, in batches, in its own transactions. The
//! worker flushes before it answers a resume, so a resume sees the offset of every message
//! delivered before it. What a crash loses before a flush is reported to resuming clients
//! through the replay horizon (see [`mark_running`]).

use super::transaction;
use pgrx::prelude::*;
use realtime_server::offset::Offset;
use std::time::{Duration, Instant};

/// How long a delivered message's offset may wait to be stored.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// Offsets stored per transaction in the normal course. The worker delivers nothing while it
/// stores, so a transaction must stay short (well under a millisecond): a flush of everything
/// every 100 ms stalled delivery for several milliseconds at thousands of messages per second,
/// which was most of the database path's 99th percentile.
const CHUNK: usize = 64;
/// Offsets waiting at most: past this they are all stored at once (the bound on memory).
const BATCH: usize = 5_000;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Partition pruning on inserted_at finds each row with one index probe. The newest offset
/// per day goes to realtime.replay_days, for the replay horizon when retention drops that day.
const STORE: &str = "WITH stored AS (
         UPDATE realtime.messages AS m
            SET commit_lsn = u.lsn::pg_lsn, commit_index = u.idx
           FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::timestamp[]),
                           pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::int4[]))
                AS u(id, at, lsn, idx)
          WHERE m.id = u.id::uuid AND m.inserted_at = u.at
      RETURNING m.inserted_at::date AS day, m.commit_lsn)
     INSERT INTO realtime.replay_days AS d (day, last_lsn)
     SELECT day, max(commit_lsn) FROM stored GROUP BY day
     ON CONFLICT (day) DO UPDATE
        SET last_lsn = greatest(d.last_lsn, excluded.last_lsn)";

thread_local! {
    static STORE_PLAN: transaction::KeptPlan = const { transaction::KeptPlan::new() };
}

#[derive(Default)]
pub struct OffsetWriter {
    ids: Vec<String>,
    inserted_at: Vec<Timestamp>,
    lsns: Vec<String>,
    indexes: Vec<i32>,
    /// When the oldest waiting offset was delivered.
    oldest: Option<Instant>,
    /// The last flush failed (logged once until one succeeds).
    failing: bool,
}

impl OffsetWriter {
    /// Remembers a delivered message's offset. Messages without a row id (none are queued
    /// today) have nothing to store it on.
    pub fn push(&mut self, id: &str, inserted_at: i64, offset: Offset) {
        if id.is_empty() {
            return;
        }
        self.ids.push(id.to_string());
        self.inserted_at
            .push(Timestamp::saturating_from_raw(inserted_at));
        self.lsns.push(offset.lsn_text());
        self.indexes
            .push(i32::try_from(offset.index).unwrap_or(i32::MAX));
        self.oldest.get_or_insert_with(Instant::now);
        if self.ids.len() >= BATCH {
            self.flush();
        }
    }

    /// How long until a chunk of offsets is due; None when none wait. A full chunk is due at
    /// once, a partial one when its oldest offset has waited [`FLUSH_AFTER`].
    pub fn due_in(&self) -> Option<Duration> {
        let oldest = self.oldest?;
        if self.ids.len() >= CHUNK {
            return Some(Duration::ZERO);
        }
        Some(FLUSH_AFTER.saturating_sub(oldest.elapsed()))
    }

    /// Stores one chunk if one is due: the main loop delivers between chunks.
    pub fn flush_if_due(&mut self) {
        if self.due_in() == Some(Duration::ZERO) {
            self.store(CHUNK);
        }
    }

    /// Stores every waiting offset (before a resume is answered, and at shutdown).
    pub fn flush(&mut self) {
        self.store(usize::MAX);
    }

    /// Stores the oldest `most` waiting offsets, in one transaction. On failure they are
    /// dropped (their messages were delivered; a resume across them then misses them, which
    /// the replay horizon cannot tell, so the failure is logged).
    fn store(&mut self, most: usize) {
        let count = self.ids.len().min(most);
        if count == 0 {
            self.oldest = None;
            return;
        }
        let ids: Vec<String> = self.ids.drain(..count).collect();
        let inserted_at: Vec<Timestamp> = self.inserted_at.drain(..count).collect();
        let lsns: Vec<String> = self.lsns.drain(..count).collect();
        let indexes: Vec<i32> = self.indexes.drain(..count).collect();
        if self.ids.is_empty() {
            self.oldest = None;
        }
        // Those left stay due: the next turn of the main loop stores the next chunk.
        let types = [
            PgBuiltInOids::TEXTARRAYOID.oid(),
            PgBuiltInOids::TIMESTAMPARRAYOID.oid(),
            PgBuiltInOids::TEXTARRAYOID.oid(),
            PgBuiltInOids::INT4ARRAYOID.oid(),
        ];
        let result = transaction::try_run(TIMEOUT, move || {
            // Losing these to an OS crash is the same as losing them to a worker crash, which
            // the replay horizon reports; a synchronous flush per batch would slow delivery.
            crate::gucs::set_local(c"synchronous_commit", c"off");
            // One index probe per row whatever the table's size: never a join that scans it.
            crate::gucs::set_local(c"enable_hashjoin", c"off");
            crate::gucs::set_local(c"enable_mergejoin", c"off");
            Spi::connect(|client| {
                transaction::with_plan(&STORE_PLAN, client, STORE, &types, |plan| {
                    let args = [ids.into(), inserted_at.into(), lsns.into(), indexes.into()];
                    client
                        .select(plan, None, &args)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
        })
        .and_then(|stored| stored);
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    log!(
                        "pg_realtime: cannot store the offsets of {count} delivered messages \
                         (later failures are not logged until one succeeds): {e}"
                    );
                }
            }
        }
    }
}

/// At start on the primary: if the last worker did not stop cleanly, offsets it delivered may
/// never have been stored, so every offset before now may have lost successors; resuming
/// clients from before now are told so. Then marks this worker running.
pub fn mark_running() {
    let result = transaction::try_spi(TIMEOUT, || {
        Spi::run(
            "UPDATE realtime.replay_horizon
                SET lost_through = CASE WHEN worker_running
                                        THEN greatest(lost_through, pg_catalog.pg_current_wal_lsn())
                                        ELSE lost_through END,
                    worker_running = true",
        )
    });
    if let Err(e) = result {
        log!("pg_realtime: cannot read the replay horizon: {e}");
    }
}

/// At a clean stop on the primary, after the last flush.
pub fn mark_stopped() {
    let result = transaction::try_spi(TIMEOUT, || {
        Spi::run("UPDATE realtime.replay_horizon SET worker_running = false")
    });
    if let Err(e) = result {
        log!("pg_realtime: cannot record a clean stop in the replay horizon: {e}");
    }
}

/// How long a standby remembers the offsets of the database messages it delivered: the
/// primary writes an offset back onto its row about 100 ms after delivering it, and that
/// write reaches this standby's copy a moment after the message itself.
const KEEP_DELIVERED: Duration = Duration::from_secs(30);
/// At most this many are remembered: about 10 MB with short topics, 40 MB with the longest.
const MAX_DELIVERED: usize = 100_000;

/// On a standby: the offsets of the database messages it delivered lately, so that a resume
/// served here right after a message also finds that message while its row, in this node's
/// copy, does not show its offset yet.
#[derive(Default)]
pub struct DeliveredOffsets {
    entries: std::collections::VecDeque<Delivered>,
}

struct Delivered {
    at: Instant,
    topic: String,
    private: bool,
    id: String,
    offset: Offset,
}

impl DeliveredOffsets {
    pub fn record(&mut self, topic: &str, private: bool, id: &str, offset: Offset) {
        while self
            .entries
            .front()
            .is_some_and(|d| d.at.elapsed() > KEEP_DELIVERED)
            || self.entries.len() >= MAX_DELIVERED
        {
            self.entries.pop_front();
        }
        self.entries.push_back(Delivered {
            at: Instant::now(),
            topic: topic.to_string(),
            private,
            id: id.to_string(),
            offset,
        });
    }

    /// Whether a message of `topic` was delivered here at `offset`.
    pub fn contains(&self, topic: &str, offset: Offset) -> bool {
        self.entries
            .iter()
            .any(|d| d.offset == offset && d.topic == topic)
    }

    /// (id, offset) of the messages of (topic, private) delivered after `after`.
    pub fn after(&self, topic: &str, private: bool, after: Offset) -> Vec<(String, Offset)> {
        self.entries
            .iter()
            .filter(|d| d.offset > after && d.private == private && d.topic == topic)
            .map(|d| (d.id.clone(), d.offset))
            .collect()
    }
}
