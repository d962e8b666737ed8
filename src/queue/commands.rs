//! Requests from SQL backends to the worker (`realtime.connections()`, `channels()`,
//! `disconnect()`, `disconnect_user()`): a few fixed slots in shared memory. A backend claims a
//! free slot, writes its request, sets the worker's latch and waits on its own latch; the
//! worker answers on its main loop (see `worker/admin.rs`), never waiting for a backend.
//!
//! Bounded in bytes: [`SLOTS`] slots of [`CHUNK_BYTES`] each. A snapshot larger than a chunk
//! is taken once by the worker, kept for that slot's claim, and read chunk by chunk with
//! follow-up requests on the same slot.
//!
//! A slot's state word says who may touch its other fields:
//! `FREE` → (backend) `CLAIMED` → `REQUESTED` → (worker) `WORKING` → `ANSWERED` → (backend)
//! `CLAIMED` for the next chunk, or `FREE`. A backend that gives up frees a `REQUESTED` slot
//! itself (the worker has not taken it) and moves a `WORKING` one to `ABANDONED`, which the
//! worker frees when it is done; a backend that died holding `CLAIMED` or `ANSWERED` is freed
//! by the worker after [`STALE_AFTER`].

use pgrx::pg_sys;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::RealtimeError;

/// Requests that may be in flight at once; more callers wait for a free slot.
pub const SLOTS: usize = 4;
/// Bytes of one answer.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The text arguments (a `sub`, a reason) are cut to this many bytes each.
pub const ARG_BYTES: usize = 1024;
/// How long a backend waits for the worker before it gives up with an error.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed slot untouched for this long belongs to a backend that is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

const FREE: u32 = 0;
const CLAIMED: u32 = 1;
const REQUESTED: u32 = 2;
const WORKING: u32 = 3;
const ANSWERED: u32 = 4;
const ABANDONED: u32 = 5;

const SEGMENT: &std::ffi::CStr = c"pg_realtime admin requests";

/// What a backend asks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The connection snapshot, from byte `number` on.
    Connections = 1,
    /// The channel snapshot, from byte `number` on.
    Channels = 2,
    /// Close connection `number` with reason `text2`.
    Disconnect = 3,
    /// Close the connections whose token's `sub` is `text1`, with reason `text2`.
    DisconnectUser = 4,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        [
            Kind::Connections,
            Kind::Channels,
            Kind::Disconnect,
            Kind::DisconnectUser,
        ]
        .into_iter()
        .find(|k| *k as u32 == v)
    }
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    /// New at each claim, so the worker tells one claim's chunks from the next one's.
    claim: AtomicI64,
    /// When the owner last touched it (milliseconds of a monotonic clock shared by all
    /// processes: `CLOCK_MONOTONIC`).
    touched_ms: AtomicI64,
    latch: AtomicPtr<pg_sys::Latch>,
    // The request, written by the owner while `CLAIMED`.
    kind: u32,
    number: i64,
    text1_len: u32,
    text1: [u8; ARG_BYTES],
    text2_len: u32,
    text2: [u8; ARG_BYTES],
    // The answer, written by the worker while `WORKING`.
    failed: AtomicI32,
    count: i64,
    total: u64,
    len: u32,
    data: [u8; CHUNK_BYTES],
}

#[repr(C)]
struct Shared {
    /// Some slot was requested since the worker last looked.
    pending: AtomicBool,
    next_claim: AtomicI64,
    slots: [Slot; SLOTS],
}

static mut SHARED: *mut Shared = null_mut();

pub(super) fn size() -> usize {
    size_of::<Shared>()
}

/// Called from the shared-memory startup hook, under `AddinShmemInitLock`.
pub(super) fn startup() {
    // SAFETY: the startup hook, in the postmaster, holding AddinShmemInitLock; the segment is
    // requested with `size()` bytes by the request hook.
    unsafe {
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(SEGMENT.as_ptr(), size(), &mut found).cast::<Shared>();
        if !found {
            // All-zero is every slot FREE and every counter 0.
            std::ptr::write_bytes(shared.cast::<u8>(), 0, size());
        }
        SHARED = shared;
    }
}

fn shared() -> &'static Shared {
    // SAFETY: set by the startup hook before any backend or worker forks (the library is
    // always preloaded).
    unsafe { &*SHARED }
}

fn slot_ptr(i: usize) -> *mut Slot {
    // SAFETY: `i < SLOTS`; the slots live as long as shared memory.
    unsafe { (&raw mut (*SHARED).slots).cast::<Slot>().add(i) }
}

/// Milliseconds of `CLOCK_MONOTONIC`, the same in every process of the machine.
fn monotonic_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec.saturating_mul(1000) + ts.tv_nsec / 1_000_000
}

/// A worker's answer.
#[derive(Debug, Default)]
pub struct Answer {
    /// How many connections a disconnect closed.
    pub count: i64,
    /// The whole snapshot's length in bytes.
    pub total: u64,
    /// This chunk of it.
    pub data: Vec<u8>,
}

/// A slot this backend holds; freed on drop.
pub struct Claim {
    index: usize,
    claim: i64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // SAFETY: the slot pointer is valid; only the state word is touched, atomically.
        let state = unsafe { &(*slot_ptr(self.index)).state };
        // Ours while CLAIMED or ANSWERED, and while REQUESTED: the worker has not taken the
        // request (its own compare-exchange from REQUESTED then fails). A request the worker
        // is working on is handed back to it.
        for from in [CLAIMED, ANSWERED, REQUESTED] {
            if state
                .compare_exchange(from, FREE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
        if state
            .compare_exchange(WORKING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            set_worker_latch();
        }
    }
}

fn set_worker_latch() {
    crate::queue::shmem::set_worker_latch();
}

/// Waits on this backend's latch for up to 10 ms (the worker sets it when it answers).
fn nap() {
    // SAFETY: a backend's own latch, waited on from its main thread.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            10,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

fn interrupted() -> bool {
    // SAFETY: a plain read of a backend global.
    unsafe { pg_sys::InterruptPending != 0 }
}

fn timed_out() -> RealtimeError {
    RealtimeError::WorkerDidNotAnswer(ANSWER_TIMEOUT.as_secs())
}

/// Claims a free slot, waiting for one (up to the answer timeout).
pub fn claim() -> Result<Claim, RealtimeError> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        for index in 0..SLOTS {
            // SAFETY: only the state word is touched before the claim succeeds.
            let slot = unsafe { &*slot_ptr(index) };
            if slot
                .state
                .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let claim = shared().next_claim.fetch_add(1, Ordering::Relaxed) + 1;
                slot.claim.store(claim, Ordering::Relaxed);
                slot.touched_ms.store(monotonic_ms(), Ordering::Relaxed);
                // SAFETY: the backend's own latch, valid while it lives.
                slot.latch
                    .store(unsafe { pg_sys::MyLatch }, Ordering::Relaxed);
                return Ok(Claim { index, claim });
            }
        }
        if Instant::now() >= deadline {
            return Err(timed_out());
        }
        if interrupted() {
            pgrx::check_for_interrupts!();
        }
        nap();
    }
}

fn copy_text(dst: &mut [u8; ARG_BYTES], len: &mut u32, text: &str) {
    let mut n = text.len().min(ARG_BYTES);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&text.as_bytes()[..n]);
    *len = n as u32;
}

impl Claim {
    /// Sends one request on the claimed slot and waits for its answer.
    pub fn request(
        &mut self,
        kind: Kind,
        number: i64,
        text1: &str,
        text2: &str,
    ) -> Result<Answer, RealtimeError> {
        let ptr = slot_ptr(self.index);
        // SAFETY: the slot is CLAIMED by this backend (after `claim` or a taken answer): no
        // other process reads or writes its request fields until it is REQUESTED.
        unsafe {
            let s = &mut *ptr;
            if s.state.load(Ordering::Acquire) != CLAIMED
                || s.claim.load(Ordering::Relaxed) != self.claim
            {
                return Err(timed_out());
            }
            s.kind = kind as u32;
            s.number = number;
            copy_text(&mut s.text1, &mut s.text1_len, text1);
            copy_text(&mut s.text2, &mut s.text2_len, text2);
            s.touched_ms.store(monotonic_ms(), Ordering::Relaxed);
            s.state.store(REQUESTED, Ordering::Release);
        }
        shared().pending.store(true, Ordering::Release);
        set_worker_latch();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            // SAFETY: the state word is atomic.
            let state = unsafe { (*ptr).state.load(Ordering::Acquire) };
            if state == ANSWERED {
                break;
            }
            if Instant::now() >= deadline {
                // Drop hands the slot back to the worker.
                return Err(timed_out());
            }
            if interrupted() {
                // Cancelled: the claim's drop (during unwinding) gives the slot back.
                pgrx::check_for_interrupts!();
            }
            nap();
        }
        // SAFETY: ANSWERED: the worker wrote the answer before its release store, and no
        // one else touches the slot until this backend moves it on.
        let answer = unsafe {
            let s = &*ptr;
            let len = (s.len as usize).min(CHUNK_BYTES);
            let answer = Answer {
                count: s.count,
                total: s.total,
                data: s.data[..len].to_vec(),
            };
            let failed = s.failed.load(Ordering::Relaxed) != 0;
            s.touched_ms.store(monotonic_ms(), Ordering::Relaxed);
            s.state.store(CLAIMED, Ordering::Release);
            if failed {
                return Err(RealtimeError::WorkerRefused(
                    String::from_utf8_lossy(&answer.data).into_owned(),
                ));
            }
            answer
        };
        Ok(answer)
    }

    /// A whole snapshot (`Kind::Connections` or `Kind::Channels`), chunk by chunk.
    pub fn snapshot(&mut self, kind: Kind) -> Result<Vec<u8>, RealtimeError> {
        let mut all = Vec::new();
        loop {
            let chunk = self.request(kind, all.len() as i64, "", "")?;
            let done = chunk.data.is_empty();
            all.extend_from_slice(&chunk.data);
            if done || all.len() as u64 >= chunk.total {
                return Ok(all);
            }
        }
    }
}

/// A request the worker took, to answer with [`Taken::answer`].
pub struct Taken {
    pub slot: usize,
    pub claim: i64,
    pub kind: Option<Kind>,
    pub number: i64,
    pub text1: String,
    pub text2: String,
}

/// The worker's side: the requests waiting, each moved to `WORKING`; frees abandoned slots
/// and stale claims. Cheap when nothing was requested.
pub fn take_requests(check_stale: bool) -> Vec<Taken> {
    let sh = shared();
    if !sh.pending.swap(false, Ordering::AcqRel) && !check_stale {
        return Vec::new();
    }
    let now = monotonic_ms();
    let mut out = Vec::new();
    for slot in 0..SLOTS {
        let ptr = slot_ptr(slot);
        // SAFETY: the state word is atomic; the request fields are read only after this
        // process moved the slot from REQUESTED to WORKING (the owner wrote them before its
        // release store of REQUESTED).
        unsafe {
            let s = &*ptr;
            let state = s.state.load(Ordering::Acquire);
            match state {
                ABANDONED => {
                    let _ = s.state.compare_exchange(
                        ABANDONED,
                        FREE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                CLAIMED | ANSWERED
                    if check_stale
                        && now - s.touched_ms.load(Ordering::Relaxed)
                            > STALE_AFTER.as_millis() as i64 =>
                {
                    let _ =
                        s.state
                            .compare_exchange(state, FREE, Ordering::AcqRel, Ordering::Acquire);
                }
                REQUESTED => {
                    if s.state
                        .compare_exchange(REQUESTED, WORKING, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    let text = |bytes: &[u8], len: u32| {
                        String::from_utf8_lossy(&bytes[..(len as usize).min(ARG_BYTES)])
                            .into_owned()
                    };
                    out.push(Taken {
                        slot,
                        claim: s.claim.load(Ordering::Relaxed),
                        kind: Kind::from_u32(s.kind),
                        number: s.number,
                        text1: text(&s.text1, s.text1_len),
                        text2: text(&s.text2, s.text2_len),
                    });
                }
                _ => {}
            }
        }
    }
    out
}

impl Taken {
    /// Answers the request: `Ok((count, total, chunk))` or `Err(message)`.
    pub fn answer(self, result: Result<(i64, u64, &[u8]), &str>) {
        let ptr = slot_ptr(self.slot);
        // SAFETY: WORKING: only this process writes the answer fields; the owner reads them
        // after the release store of ANSWERED. If the owner abandoned the slot meanwhile, the
        // compare-exchange fails and the slot is freed instead.
        unsafe {
            let s = &mut *ptr;
            let (failed, count, total, data) = match result {
                Ok((count, total, data)) => (0, count, total, data),
                Err(message) => (1, 0, 0, message.as_bytes()),
            };
            let len = data.len().min(CHUNK_BYTES);
            s.data[..len].copy_from_slice(&data[..len]);
            s.len = len as u32;
            s.count = count;
            s.total = total;
            s.failed.store(failed, Ordering::Relaxed);
            if s.state
                .compare_exchange(WORKING, ANSWERED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                s.state.store(FREE, Ordering::Release);
                return;
            }
            let latch = s.latch.load(Ordering::Relaxed);
            if !latch.is_null() {
                // SAFETY: a backend's latch in shared memory; setting the latch of a backend
                // that exited is harmless.
                pg_sys::SetLatch(latch);
            }
        }
    }
}

/// Whether a backend holds the slot (the worker drops what it kept for a slot that is free).
pub fn is_claimed(slot: usize) -> bool {
    // SAFETY: only the atomic state word is read.
    let state = unsafe { (*slot_ptr(slot)).state.load(Ordering::Acquire) };
    state != FREE
}
