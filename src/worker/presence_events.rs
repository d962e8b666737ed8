//! `realtime.presence_events`: the socket presence changes the worker receives (joins,
//! updates, leaves, of every node's members) written as rows, so that users can react to them
//! with ordinary triggers. Only when `realtime.presence_events` is on, and only on the
//! primary (a standby is read-only; the primary sees every node's presence anyway).
//!
//! Delivery never waits for it: changes go into a bounded buffer and are written in batches,
//! in the worker's own short transactions between deliveries. Past the buffer's bounds, or
//! when a batch fails (a user's trigger raised, a lock was not granted in time), rows are
//! dropped, counted in `realtime.stats()` and logged once per streak.

use super::transaction;
use crate::gucs;
use crate::queue::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::PresenceChange;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Rows and bytes (topics, keys, metas) the buffer holds at most.
const MAX_BUFFERED_ROWS: usize = 10_000;
const MAX_BUFFERED_BYTES: usize = 16 << 20;
/// Rows per transaction at most.
const BATCH_ROWS: usize = 1_000;
/// A batch is written once it is this old, or full.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// One batch, user triggers included, may take this long; past it the batch is dropped.
const BATCH_TIMEOUT: Duration = Duration::from_secs(1);

struct Row {
    topic: String,
    private: bool,
    key: String,
    event: &'static str,
    meta: Option<String>,
    /// Seconds since the Unix epoch.
    at: f64,
}

impl Row {
    fn bytes(&self) -> usize {
        self.topic.len() + self.key.len() + self.meta.as_ref().map_or(0, String::len)
    }
}

#[derive(Default)]
pub struct PresenceEvents {
    rows: VecDeque<Row>,
    bytes: usize,
    oldest: Option<Instant>,
    /// Dropping since the last logged drop (logged once per streak).
    dropping: bool,
    failing: bool,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl PresenceEvents {
    /// Buffers `changes` as rows when the setting is on.
    pub fn record(&mut self, changes: &[PresenceChange]) {
        if changes.is_empty() || !gucs::presence_events() {
            return;
        }
        // The caller only asks on a primary; a standby that is still replaying must never
        // try to write, whatever the caller believes.
        // SAFETY: reads shared recovery state.
        if unsafe { pg_sys::RecoveryInProgress() } {
            return;
        }
        let at = now_unix();
        for change in changes {
            let row = match change {
                PresenceChange::Tracked {
                    updated,
                    topic,
                    private,
                    key,
                    meta_json,
                    ..
                } => Row {
                    topic: topic.clone(),
                    private: *private,
                    key: key.clone(),
                    event: if *updated { "update" } else { "join" },
                    meta: Some(meta_json.clone()),
                    at,
                },
                PresenceChange::Untracked {
                    topic,
                    private,
                    key,
                    ..
                } => Row {
                    topic: topic.clone(),
                    private: *private,
                    key: key.clone(),
                    event: "leave",
                    meta: None,
                    at,
                },
            };
            // PostgreSQL text and jsonb cannot hold NUL: such a row would fail its whole batch.
            if row.topic.contains('\0')
                || row.key.contains('\0')
                || row.meta.as_deref().is_some_and(|m| m.contains("\\u0000"))
            {
                self.drop_rows(1, "a topic, key or meta holds a NUL character");
                continue;
            }
            if self.rows.len() >= MAX_BUFFERED_ROWS || self.bytes + row.bytes() > MAX_BUFFERED_BYTES
            {
                self.drop_rows(1, "the buffer of rows waiting to be written is full");
                continue;
            }
            self.bytes += row.bytes();
            self.oldest.get_or_insert_with(Instant::now);
            self.rows.push_back(row);
        }
    }

    fn drop_rows(&mut self, n: usize, why: &str) {
        shmem::stats()
            .presence_events_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
        if !std::mem::replace(&mut self.dropping, true) {
            log!(
                "pg_realtime: dropping realtime.presence_events rows ({why}); counted in realtime.stats()"
            );
        }
    }

    /// Rows wait to be written.
    pub fn waiting(&self) -> bool {
        !self.rows.is_empty()
    }

    /// Writes a batch if one is due.
    pub fn flush(&mut self) {
        let due = self.rows.len() >= BATCH_ROWS
            || self.oldest.is_some_and(|t| t.elapsed() >= FLUSH_EVERY);
        if !due {
            return;
        }
        let n = self.rows.len().min(BATCH_ROWS);
        let batch: Vec<Row> = self.rows.drain(..n).collect();
        self.bytes -= batch.iter().map(Row::bytes).sum::<usize>();
        self.oldest = (!self.rows.is_empty()).then(Instant::now);
        let count = batch.len();
        let (mut topics, mut privates, mut keys, mut events, mut metas, mut ats) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for row in batch {
            topics.push(row.topic);
            privates.push(row.private);
            keys.push(row.key);
            events.push(row.event.to_string());
            metas.push(row.meta);
            ats.push(row.at);
        }
        let result = transaction::try_spi(BATCH_TIMEOUT, move || {
            // Users' triggers on the table run under the search_path sessions get, not the
            // worker's own pinned one.
            super::authorization::set_policy_search_path_local();
            Spi::run_with_args(
                "INSERT INTO realtime.presence_events (topic, private, key, event, meta, node, at)
                 SELECT t, p, k, e, m::jsonb, NULL, pg_catalog.to_timestamp(a)
                   FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::boolean[]),
                                   pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]),
                                   pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::float8[]))
                        AS u(t, p, k, e, m, a)",
                &[
                    topics.into(),
                    privates.into(),
                    keys.into(),
                    events.into(),
                    metas.into(),
                    ats.into(),
                ],
            )
        });
        match result {
            Ok(()) => {
                self.failing = false;
                if self.rows.is_empty() {
                    self.dropping = false;
                }
            }
            Err(e) => {
                shmem::stats()
                    .presence_events_dropped
                    .fetch_add(count as u64, Ordering::Relaxed);
                if !std::mem::replace(&mut self.failing, true) {
                    log!(
                        "pg_realtime: cannot write realtime.presence_events ({count} rows dropped, \
                         and later failures are only counted in realtime.stats()): {e}"
                    );
                }
            }
        }
    }
}
