//! Publishes what the worker holds for `realtime.stats()`: its private memory, read from
//! `/proc/self/smaps_rollup`, and the socket server's [`realtime_server::Usage`], about once a
//! second, into the shared-memory gauges.

use crate::queue::shmem;
use pgrx::pg_sys;
use realtime_server::{Usage, WorkerStats};
use std::sync::atomic::Ordering;

/// Publishes a snapshot: the server's `usage` and the worker's private memory. The main loop
/// calls it once a second. Returns what the server's `/metrics` shows of the worker.
pub fn publish(u: &Usage) -> WorkerStats {
    let g = &shmem::stats().usage;
    let private = private_memory_bytes();
    let memory = private.and_then(|m| i64::try_from(m).ok()).unwrap_or(-1);
    g.worker_memory_bytes.store(memory, Ordering::Relaxed);
    g.sockets.store(u.connections, Ordering::Relaxed);
    g.channels.store(u.channels, Ordering::Relaxed);
    g.socket_queued_bytes
        .store(u.queued_bytes, Ordering::Relaxed);
    g.pending_authorizations
        .store(u.pending_authorizations, Ordering::Relaxed);
    g.presence_keys.store(u.presence_keys, Ordering::Relaxed);
    g.presence_bytes.store(u.presence_bytes, Ordering::Relaxed);
    g.held_write_bytes
        .store(u.held_write_bytes, Ordering::Relaxed);
    g.publish_queue_bytes
        .store(u.publish_queue_bytes, Ordering::Relaxed);
    // SAFETY: reads the clock; no Postgres state involved.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    g.updated_at.store(now, Ordering::Release);
    let s = shmem::stats();
    let (used, size) = shmem::usage();
    WorkerStats {
        commit_queue_used_bytes: used,
        commit_queue_size_bytes: size,
        committed_messages: s.queued.load(Ordering::Relaxed),
        discarded_messages: s.discarded.load(Ordering::Relaxed),
        failed_sends: s.failed_sends.load(Ordering::Relaxed),
        async_commits: s.async_commits.load(Ordering::Relaxed),
        unwatched_commits: s.unwatched_commits.load(Ordering::Relaxed),
        worker_memory_bytes: private,
    }
}

/// The process's private anonymous memory in bytes: what it allocated itself (heap, thread
/// stacks), not shared buffers or mapped files. None when the kernel does not say.
fn private_memory_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    anonymous_bytes(&rollup)
}

/// The `Anonymous:` line of smaps_rollup (in kB), in bytes.
fn anonymous_bytes(rollup: &str) -> Option<u64> {
    let line = rollup.lines().find(|l| l.starts_with("Anonymous:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}
