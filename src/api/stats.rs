//! `realtime.stats()`: what the commit queue has done, so lost messages are never invisible,
//! and what the worker holds (its memory, and the sockets, channels, queues and presence that
//! hold it), so an operator can tell from SQL why the worker is large.

use crate::queue::shmem;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Counters since the cluster started, the queue's current fill, and the worker's last usage
/// snapshot (NULL until the worker took one).
// pgrx takes the column names from the signature itself, so the type cannot be aliased.
#[allow(clippy::type_complexity)]
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
        name!(worker_memory_bytes, Option<i64>),
        name!(sockets, Option<i64>),
        name!(channels, Option<i64>),
        name!(socket_queued_bytes, Option<i64>),
        name!(pending_authorizations, Option<i64>),
        name!(presence_keys, Option<i64>),
        name!(presence_bytes, Option<i64>),
        name!(held_write_bytes, Option<i64>),
        name!(publish_queue_bytes, Option<i64>),
        name!(usage_updated_at, Option<TimestampWithTimeZone>),
        name!(presence_events_dropped, i64),
        name!(async_commits, i64),
        name!(unwatched_commits, i64),
    ),
> {
    let s = shmem::stats();
    let (used, size) = shmem::usage();
    let u = &s.usage;
    let updated_at = u.updated_at.load(Ordering::Acquire);
    let known = updated_at != 0;
    let gauge = |g: &AtomicU64| known.then(|| counter(g.load(Ordering::Relaxed)));
    let memory = u.worker_memory_bytes.load(Ordering::Relaxed);
    TableIterator::once((
        counter(s.failed_sends.load(Ordering::Relaxed)),
        counter(s.queued.load(Ordering::Relaxed)),
        counter(s.delivered.load(Ordering::Relaxed)),
        counter(s.discarded.load(Ordering::Relaxed)),
        counter(s.dropped.load(Ordering::Relaxed)),
        counter(used),
        counter(size),
        (known && memory >= 0).then_some(memory),
        gauge(&u.sockets),
        gauge(&u.channels),
        gauge(&u.socket_queued_bytes),
        gauge(&u.pending_authorizations),
        gauge(&u.presence_keys),
        gauge(&u.presence_bytes),
        gauge(&u.held_write_bytes),
        gauge(&u.publish_queue_bytes),
        known
            .then(|| TimestampWithTimeZone::try_from(updated_at).ok())
            .flatten(),
        counter(s.presence_events_dropped.load(Ordering::Relaxed)),
        counter(s.async_commits.load(Ordering::Relaxed)),
        counter(s.unwatched_commits.load(Ordering::Relaxed)),
    ))
}

/// One more message lost to a refused insert, counted in `realtime.stats()`.
pub(crate) fn count_failed_send() {
    shmem::stats().failed_sends.fetch_add(1, Ordering::Relaxed);
}
