//! `realtime.stats()`: what the commit queue has done, so lost messages are never invisible.

use crate::queue::shmem;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Counters since the cluster started, and the queue's current fill.
#[pg_extern(volatile, parallel_safe)]
fn stats() -> TableIterator<
    'static,
    (
        name!(failed_sends, i64),
        name!(queued, i64),
        name!(delivered, i64),
        name!(discarded, i64),
        name!(dropped, i64),
        name!(queue_used_bytes, i64),
        name!(queue_size_bytes, i64),
    ),
> {
    let s = shmem::stats();
    let (used, size) = shmem::usage();
    TableIterator::once((
        counter(s.failed_sends.load(Ordering::Relaxed)),
        counter(s.queued.load(Ordering::Relaxed)),
        counter(s.delivered.load(Ordering::Relaxed)),
        counter(s.discarded.load(Ordering::Relaxed)),
        counter(s.dropped.load(Ordering::Relaxed)),
        counter(used),
        counter(size),
    ))
}

/// One more message lost to a refused insert, counted in `realtime.stats()`.
pub(crate) fn count_failed_send() {
    shmem::stats().failed_sends.fetch_add(1, Ordering::Relaxed);
}
