//! The shared-memory half of the commit queue: the ring, its lock, the worker's latch and the
//! counters `realtime.stats()` reports.
//!
//! The ring is sized by `realtime.queue_size`, so it is allocated with the raw shmem hooks
//! rather than pgrx's fixed-size `PgLwLock<T>`.

use crate::gucs;
use commit_ring::{Full, Ready, RingHeader, WatchedTopics};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering, fence};

const TRANCHE: &std::ffi::CStr = c"pg_realtime";
const SEGMENT: &std::ffi::CStr = c"pg_realtime commit queue";

/// Counters shown by `realtime.stats()`; monotonic since the cluster started.
#[repr(C)]
#[derive(Default)]
pub struct Stats {
    /// Messages `realtime.send` could not store (and warned about).
    pub failed_sends: AtomicU64,
    /// Message-only transactions committed without waiting for the disk.
    pub async_commits: AtomicU64,
    /// Commits that did not wake the worker: their topics had no subscriber on this node, and
    /// the worker was looking at the ring by itself (see `commit_ring::watched`).
    pub unwatched_commits: AtomicU64,
    /// Messages copied into the ring by committing transactions.
    pub queued: AtomicU64,
    /// Committed messages the worker handed to the socket server.
    pub delivered: AtomicU64,
    /// Entries the worker skipped because their transaction aborted.
    pub discarded: AtomicU64,
    /// Committed messages the socket server dropped because its dispatch queue stayed full
    /// (the network threads could not keep up at all).
    pub dropped: AtomicU64,
    /// Rows of `realtime.presence_events` the worker could not write (its buffer was full, or
    /// a batch failed).
    pub presence_events_dropped: AtomicU64,
    /// Set by `realtime._node_relay` when a standby's worker reaches this primary: from then
    /// on the primary's worker writes the bus, before it has even taken the standby's hello
    /// off the commit queue.
    pub standby_heard: AtomicBool,
    /// What the worker holds, as of its last snapshot.
    pub usage: UsageGauges,
}

/// Gauges of the worker's memory and of what holds it, published by the worker about once a
/// second (`worker/usage.rs`); read by `realtime.stats()`. Each is written on its own, so a
/// reader may mix two consecutive snapshots, which is fine for gauges.
#[repr(C)]
#[derive(Default)]
pub struct UsageGauges {
    /// When the last snapshot was taken (a `TimestampTz`); 0 before the first one.
    pub updated_at: AtomicI64,
    /// The worker's private memory in bytes (`Anonymous:` of its smaps_rollup); -1 when unknown.
    pub worker_memory_bytes: AtomicI64,
    pub sockets: AtomicU64,
    pub channels: AtomicU64,
    pub socket_queued_bytes: AtomicU64,
    pub pending_authorizations: AtomicU64,
    pub presence_keys: AtomicU64,
    pub presence_bytes: AtomicU64,
    pub held_write_bytes: AtomicU64,
    pub publish_queue_bytes: AtomicU64,
}

#[repr(C)]
struct Shared {
    lock: *mut pg_sys::LWLock,
    ring: RingHeader,
    capacity: u64,
    worker_latch: AtomicPtr<pg_sys::Latch>,
    /// The worker is looking at the ring on its own every millisecond or so: committing
    /// backends need not wake it (a wake-up is a signal, costly at thousands of commits/s).
    worker_polling: AtomicBool,
    /// The worker looks at the ring every few milliseconds by itself: commits for topics
    /// nobody joined need not wake it.
    worker_looking: AtomicBool,
    /// A commit woke the worker since it last took this flag: a subscriber may be waiting for
    /// its messages.
    woken_by_commit: AtomicBool,
    /// The worker stopped at an unfinished transaction while messages somebody waits for may
    /// be behind it: every commit wakes it, whatever its topics, until it gets past.
    worker_blocked: AtomicBool,
    /// Standbys' sockets hear this node's messages through the bus: every commit wakes the
    /// worker (the watch table holds only this node's topics).
    standbys_listen: AtomicBool,
    watched: WatchedTopics,
    stats: Stats,
}

static mut SHARED: *mut Shared = null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

fn data_offset() -> usize {
    size_of::<Shared>().next_multiple_of(64)
}

/// The ring's size in bytes: more than this can never be reserved by one transaction.
pub fn capacity() -> usize {
    gucs::queue_bytes()
}

pub(super) fn init() {
    // SAFETY: called once from _PG_init in the postmaster, before any backend exists; the previous
    // hooks are chained.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_shmem);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_shmem);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn request_shmem() {
    // SAFETY: the shmem request hook runs in the postmaster at the time PostgreSQL allows requests.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(data_offset() + capacity());
        pg_sys::RequestAddinShmemSpace(super::commands::size());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_shmem() {
    // SAFETY: the startup hook runs in the postmaster; AddinShmemInitLock (main LWLock 21)
    // serialises segment creation, and the segment is as large as requested.
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let size = data_offset() + capacity();
        let shared = pg_sys::ShmemInitStruct(SEGMENT.as_ptr(), size, &mut found) as *mut Shared;
        if !found {
            shared.write(Shared {
                lock: &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock,
                ring: RingHeader::default(),
                capacity: capacity() as u64,
                worker_latch: AtomicPtr::new(null_mut()),
                worker_polling: AtomicBool::new(false),
                worker_looking: AtomicBool::new(false),
                woken_by_commit: AtomicBool::new(false),
                worker_blocked: AtomicBool::new(false),
                standbys_listen: AtomicBool::new(false),
                watched: WatchedTopics::default(),
                stats: Stats::default(),
            });
        }
        SHARED = shared;
        super::commands::startup();
        pg_sys::LWLockRelease(init_lock);
    }
}

fn shared() -> &'static Shared {
    // SAFETY: set by the startup hook in the postmaster before any backend or worker forks;
    // `_PG_init` refuses to run outside shared_preload_libraries, so it is never null here.
    unsafe { &*SHARED }
}

/// Runs `f` on the ring while holding its lock exclusively.
fn with_ring<R>(f: impl FnOnce(&mut RingHeader, &mut [u8]) -> R) -> R {
    // SAFETY: SHARED points at a segment of data_offset() + capacity bytes, set before any backend
    // forks; its lock guards the ring header and buffer.
    unsafe {
        let shared = SHARED;
        pg_sys::LWLockAcquire((*shared).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let data = (shared as *mut u8).add(data_offset());
        let buf = std::slice::from_raw_parts_mut(data, (*shared).capacity as usize);
        let result = f(&mut (*shared).ring, buf);
        pg_sys::LWLockRelease((*shared).lock);
        result
    }
}

/// A transaction's record in the ring, waiting for [`Reservation::finish`].
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    position: usize,
    /// The ring was more than half full once this record was in: wake the worker now.
    pub crowded: bool,
}

impl Reservation {
    /// Records how the transaction ended: `Some(commit LSN)` or `None` for an abort. Takes no
    /// lock and cannot fail, so it is safe in commit and abort callbacks.
    pub fn finish(self, commit_lsn: Option<u64>) {
        let outcome =
            commit_lsn.map_or(commit_ring::ring::ABORTED, commit_ring::ring::committed_at);
        commit_ring::ring::finish(buffer(), self.position, outcome);
    }
}

/// Settles a record whose backend ended without finishing it (see the worker's stall check);
/// does nothing if the backend finished it meanwhile.
pub fn settle(pending: &commit_ring::Pending, commit_lsn: Option<u64>) {
    let outcome = commit_lsn.map_or(commit_ring::ring::ABORTED, commit_ring::ring::committed_at);
    let _ = commit_ring::ring::state_cell(buffer(), pending.position).compare_exchange(
        commit_ring::ring::PENDING,
        outcome,
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
}

/// Appends one transaction's messages as one pending record, all or none. The floor is read
/// under the ring's lock so that floors grow in ring order.
pub fn reserve(xid: u32, database: u32, bodies: &[&[u8]]) -> Result<Reservation, Full> {
    let (position, crowded) = with_ring(|ring, buf| {
        // SAFETY: reads the WAL insert position under its own spinlock.
        let floor = unsafe { pg_sys::GetXLogInsertRecPtr() };
        let position = ring.reserve(buf, xid, database, floor, bodies)?;
        Ok::<_, Full>((position, ring.used() > buf.len() as u64 / 2))
    })?;
    stats()
        .queued
        .fetch_add(bodies.len() as u64, Ordering::Relaxed);
    Ok(Reservation { position, crowded })
}

/// Lets the worker take the records that are ready, in commit order; `f` must copy what it
/// needs before returning, since the space is free for producers once the lock is released.
pub fn take_ready<R>(max: usize, f: impl FnOnce(Ready<'_>, &[u8]) -> R) -> R {
    with_ring(|ring, buf| {
        let ready = ring.take_ready(buf, max);
        f(ready, buf)
    })
}

/// The ring's buffer, for the lock-free state words only.
fn buffer() -> &'static [u8] {
    // SAFETY: as for with_ring; only the atomically written state words are read through this
    // slice.
    unsafe {
        let shared = SHARED;
        let data = (shared as *const u8).add(data_offset());
        std::slice::from_raw_parts(data, (*shared).capacity as usize)
    }
}

/// Bytes in use and capacity of the ring.
pub fn usage() -> (u64, u64) {
    with_ring(|ring, buf| (ring.used(), buf.len() as u64))
}

pub fn stats() -> &'static Stats {
    &shared().stats
}

/// Called by the worker once it waits on its latch, so committing backends can wake it.
pub fn register_worker_latch(latch: *mut pg_sys::Latch) {
    shared().worker_latch.store(latch, Ordering::Release);
    // A worker that died while polling must not leave committers thinking nobody needs waking,
    // and its subscribers are gone with it.
    set_worker_polling(false);
    set_worker_looking(false);
    set_worker_blocked(false);
    set_standbys_listen(false);
    shared().watched.clear();
}

/// The worker's table of topics with subscribers (see `commit_ring::watched`).
pub fn watched_topics() -> &'static WatchedTopics {
    &shared().watched
}

/// What a finished commit needs from the worker.
pub struct CommitWake<'a> {
    /// Something in it needs the worker now whoever listens (a relay, a presence change, a
    /// ring filling up).
    pub urgent: bool,
    /// The watch buckets of its messages' topics.
    pub buckets: &'a [u16],
}

/// Wakes the worker after a commit, unless it is polling, or it looks at the ring by itself
/// and nothing in the commit is wanted soon: no topic in it has a subscriber here, nothing is
/// urgent, and no other transaction's messages wait behind this one.
///
/// Cannot fail, so it is safe in commit and abort callbacks. Call it after finishing a record.
pub fn wake_worker_after_commit(commit: CommitWake<'_>) {
    // Pairs with the fence in `publish_flag`: either this backend sees the worker's flags as
    // they are now, or the worker's next look at the ring sees this backend's record.
    fence(Ordering::SeqCst);
    let s = shared();
    let wanted = commit.urgent
        || !s.worker_looking.load(Ordering::Relaxed)
        || s.standbys_listen.load(Ordering::Relaxed)
        || s.worker_blocked.load(Ordering::Relaxed)
        || commit.buckets.iter().any(|b| s.watched.is_watched(*b));
    if !wanted {
        s.stats.unwatched_commits.fetch_add(1, Ordering::Relaxed);
        return;
    }
    s.woken_by_commit.store(true, Ordering::Relaxed);
    if !s.worker_polling.load(Ordering::Relaxed) {
        set_worker_latch();
    }
}

/// The worker says whether it looks at the ring every few milliseconds by itself. After
/// turning it off it must look once more before sleeping, as after [`set_worker_polling`].
pub fn set_worker_looking(on: bool) {
    publish_flag(&shared().worker_looking, on);
}

/// The worker says whether standbys listen to this node's messages (see `bus_writer`).
pub fn set_standbys_listen(on: bool) {
    shared().standbys_listen.store(on, Ordering::Relaxed);
}

/// Whether a commit woke the worker since the last call (the worker's main thread only).
pub fn take_commit_wake() -> bool {
    shared().woken_by_commit.swap(false, Ordering::Relaxed)
}

/// The worker says whether it stopped at an unfinished transaction with messages somebody may
/// wait for behind it. After turning it on it must look once more: that transaction may have
/// committed just before, without waking it.
pub fn set_worker_blocked(on: bool) {
    publish_flag(&shared().worker_blocked, on);
}

/// Wakes the worker whether or not it polls the ring: for requests other than commits,
/// which its polling does not look for.
pub fn set_worker_latch() {
    let latch = shared().worker_latch.load(Ordering::Acquire);
    if !latch.is_null() {
        // SAFETY: the latch is the worker's, in shared memory; setting a latch of a process that
        // exited is harmless.
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// The worker says whether it polls the ring. After turning polling off it must look at the
/// ring once more before sleeping: a commit may have skipped the wake-up just before.
pub fn set_worker_polling(on: bool) {
    publish_flag(&shared().worker_polling, on);
}

/// Sets one of the worker's flags that committers read after their fence (see
/// [`wake_worker_after_commit`]); the worker looks at the ring once more after lowering a flag
/// that let committers skip the wake-up, or raising one that makes them wake it.
fn publish_flag(flag: &AtomicBool, on: bool) {
    flag.store(on, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}
