//! Giving memory back to the operating system once a burst is over.
//!
//! The worker lives inside the database server's memory budget, so what a burst took (a join
//! flood, a fan-out spike) must not stay held once the worker is idle again. The program frees
//! it; glibc's malloc keeps it: each thread allocates from its own arena, and an arena other
//! than the main one returns only a heap's top to the kernel, never the free pages in its
//! middle. After a fan-out burst on the network threads, most of the peak stayed resident.
//!
//! [`give_back_when_idle`], called from the main loop, runs `malloc_trim(0)` once the whole
//! process (network threads included) has been nearly idle for a second after being busy: it
//! returns every free page of every arena (`madvise(MADV_DONTNEED)` inside heaps, not just
//! their tops). It walks all arenas under their locks, so it runs only when idle and at most
//! every [`MIN_TRIM_INTERVAL`]. glibc's own allocator is kept: Postgres and the C code in the
//! worker use it anyway, and a Rust allocator of our own (mimalloc was measured) purges a
//! thread's free pages only when that thread allocates again, so idle network threads kept
//! their peak. docs/memory.md has the measurements behind this choice.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often the process's CPU time is read.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Below this share of one core over [`CHECK_INTERVAL`] the process counts as idle: a few
/// heartbeats and presence expiry cost far less, a burst far more.
const IDLE_CPU_SHARE: f64 = 0.05;
const MIN_TRIM_INTERVAL: Duration = Duration::from_secs(5);

struct Idle {
    /// When the CPU time was last read, and its value then.
    checked: (Instant, Duration),
    /// Busy since the last trim: there may be something to give back.
    dirty: bool,
    last_trim: Instant,
}

thread_local! {
    static IDLE: Cell<Option<Idle>> = const { Cell::new(None) };
}

/// Trims the C heap once the process has gone idle after work. The main loop calls it once a
/// second; it reads the process's CPU time (`getrusage`) and trims only after a busy stretch.
pub fn give_back_when_idle() {
    let now = Instant::now();
    IDLE.with(|cell| {
        let mut idle = cell.take().unwrap_or(Idle {
            checked: (now, process_cpu()),
            dirty: true,
            last_trim: now,
        });
        let elapsed = now.duration_since(idle.checked.0);
        if elapsed >= CHECK_INTERVAL {
            let cpu = process_cpu();
            let busy = cpu.saturating_sub(idle.checked.1).as_secs_f64()
                > IDLE_CPU_SHARE * elapsed.as_secs_f64();
            idle.checked = (now, cpu);
            if busy {
                idle.dirty = true;
            } else if idle.dirty && now.duration_since(idle.last_trim) >= MIN_TRIM_INTERVAL {
                // SAFETY: malloc_trim takes the arenas' own locks; any thread may call it.
                unsafe { libc::malloc_trim(0) };
                idle.dirty = false;
                idle.last_trim = Instant::now();
            }
        }
        cell.set(Some(idle));
    });
}

/// CPU time (user + system) of the whole process, all threads.
fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}
