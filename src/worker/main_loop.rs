//! The worker's main loop: sleep until something happens, then deliver committed messages,
//! answer the socket server, expire SQL presence and maintain partitions. It chooses how long
//! to sleep: woken per commit when traffic is light, polling the ring when it is heavy.

use super::queue_reader::{self, Stall};
use super::server_link::ServerLink;
use super::{maintenance, presence};
use crate::queue::shmem;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// While a transaction is unfinished, look again this often even without a wake-up (its
/// backend wakes the worker at commit or abort; this only bounds a lost wake-up).
const BLOCKED_POLL: Duration = Duration::from_millis(50);
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Under a very heavy stream of commits the worker looks at the ring this often without being
/// woken, until the rate has stayed below [`BUSY_RATE`] for [`BUSY_LINGER`]: that spares every
/// committer a wake-up signal (a cross-CPU interrupt) and the worker a wake-up per commit.
/// Below [`BUSY_RATE`] it is woken per commit instead, so a message never waits for the next
/// poll: polling from 2,000 messages/s added about 0.8 ms to the median at 5,000 single-message
/// commits/s, for about 6 % of a core saved (BENCHMARKS.md, "Performance, round 2").
const BUSY_POLL: Duration = Duration::from_millis(1);
const BUSY_LINGER: Duration = Duration::from_millis(50);
/// While messages flow, the worker also looks at the ring this often by itself, so that
/// commits for topics nobody here has joined need not wake it (`commit_ring::watched`); it
/// stops looking [`LOOK_LINGER`] after the last message. Those messages wait at most this long,
/// and nobody is waiting for them: their offsets are stored within 100 ms anyway.
const LOOK_INTERVAL: Duration = Duration::from_millis(10);
const LOOK_LINGER: Duration = Duration::from_secs(1);
/// Messages per [`RATE_WINDOW`] from which the worker polls (20,000 messages/s).
const BUSY_RATE: u64 = 200;
const RATE_WINDOW: Duration = Duration::from_millis(10);
/// How often presence tracked from SQL with a ttl is checked for expiry, `realtime.stats()`'s
/// gauges are published and the allocator is asked whether to give memory back.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// A standby has no commit to be woken by: it looks at its replayed WAL for the bus this
/// often, and more often while envelopes keep arriving (see `bus_reader`).
const BUS_POLL_IDLE: Duration = Duration::from_millis(4);
const BUS_POLL_BUSY: Duration = Duration::from_millis(1);
/// How long after the last envelope the standby keeps polling at [`BUS_POLL_BUSY`].
const BUS_LINGER: Duration = Duration::from_millis(100);

/// While presence rows wait for their batch, the loop comes back at least this often.
const PRESENCE_EVENTS_POLL: Duration = Duration::from_millis(100);

/// Runs until SIGTERM, serving `database_name` (the extension exists there).
pub fn run(database_name: &str) {
    let mut main_loop = MainLoop::start(database_name);
    // A standby's tables are the primary's: only the primary maintains them.
    let standby = main_loop.link.is_standby();
    let mut next_maintenance = if standby {
        Instant::now() + Duration::from_secs(24 * 3600)
    } else {
        Instant::now() + maintenance::run()
    };
    while !BackgroundWorker::sigterm_received() {
        let timeout = next_maintenance
            .saturating_duration_since(Instant::now())
            .min(main_loop.poll_interval());
        main_loop.wait(timeout);
        main_loop.handle_server_events();
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the worker's main thread, between transactions, as the postmaster's
            // own processes do it.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            main_loop.link.reload();
            // A shorter interval applies now, not after the old one runs out.
            next_maintenance = next_maintenance.min(Instant::now() + maintenance::interval());
        }
        main_loop.deliver();
        main_loop.link.store_offsets_if_due();
        main_loop.pump_bus();
        if Instant::now() >= next_maintenance && !standby {
            next_maintenance = Instant::now() + maintenance::run();
        }
    }
    // Transactions that committed before the shutdown still reach the standbys' clients,
    // which stay connected while this node restarts.
    main_loop.deliver_ready();
    main_loop.pump_bus();
    main_loop.link.shutdown();
}

struct MainLoop {
    database: u32,
    link: ServerLink,
    /// An unfinished transaction holds back the ring.
    blocked: bool,
    /// A commit woke us while we were held back: somebody may wait for what is behind.
    waited_for: bool,
    /// Every commit wakes us until we get past the unfinished transaction (shared memory's
    /// `worker_blocked`).
    holding: bool,
    /// Polling the ring until then (see [`BUSY_POLL`]).
    busy_until: Option<Instant>,
    /// Looking at the ring by itself until then (see [`LOOK_INTERVAL`]).
    looking_until: Option<Instant>,
    /// Messages delivered since the start of the current rate window.
    rate_window: (Instant, u64),
    /// Latch, server wake-up fd and postmaster death, created once: `WaitLatchOrSocket` would
    /// build and tear down an epoll set on every wait.
    waits: *mut pg_sys::WaitEventSet,
    stall: Stall,
    last_tick: Instant,
    /// The last expiry failed (logged once until one succeeds).
    expiry_failing: bool,
    /// On a standby: when the bus last brought an envelope.
    bus_active: Option<Instant>,
}

impl MainLoop {
    fn start(database_name: &str) -> MainLoop {
        let link = ServerLink::start(database_name);
        // SAFETY: the set lives in TopMemoryContext for the worker's lifetime; MyLatch is this
        // process's latch and the server's wake fd stays open until shutdown.
        let waits = unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            let none = std::ptr::null_mut();
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                link.wake_fd(),
                std::ptr::null_mut(),
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                none,
            );
            set
        };
        MainLoop {
            // SAFETY: set once when the worker connected to its database.
            database: u32::from(unsafe { pg_sys::MyDatabaseId }),
            link,
            blocked: false,
            waited_for: false,
            holding: false,
            busy_until: None,
            looking_until: None,
            rate_window: (Instant::now(), 0),
            waits,
            stall: Stall::default(),
            last_tick: Instant::now(),
            expiry_failing: false,
            bus_active: None,
        }
    }

    fn poll_interval(&self) -> Duration {
        let mut own = self.own_poll_interval();
        if self.link.presence_events_waiting() {
            own = own.min(PRESENCE_EVENTS_POLL);
        }
        if let Some(due) = self.link.offsets_due_in() {
            own = own.min(due);
        }
        if !self.link.is_standby() {
            return self.link.bus_poll().map_or(own, |flush| own.min(flush));
        }
        let bus = if self.bus_active.is_some_and(|t| t.elapsed() < BUS_LINGER) {
            BUS_POLL_BUSY
        } else {
            BUS_POLL_IDLE
        };
        own.min(bus)
    }

    fn own_poll_interval(&self) -> Duration {
        if self.link.has_work() {
            // More requests wait: come straight back after delivering.
            Duration::ZERO
        } else if self.busy_until.is_some() {
            BUSY_POLL
        } else if self.looking_until.is_some() {
            LOOK_INTERVAL
        } else if self.blocked {
            BLOCKED_POLL
        } else {
            IDLE_POLL
        }
    }

    /// Sleeps until the latch is set, the server has news, or `timeout` passes.
    fn wait(&mut self, timeout: Duration) {
        // SAFETY: `waits` was built in `start` and is only used from this thread.
        unsafe {
            let mut event = pg_sys::WaitEvent::default();
            pg_sys::WaitEventSetWait(
                self.waits,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                &mut event,
                1,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }

    /// Answers the server; once a second, also the housekeeping that needs no sooner turn.
    fn handle_server_events(&mut self) {
        self.link.handle_events();
        let tick = self.last_tick.elapsed() >= HOUSEKEEPING_INTERVAL;
        self.link.serve_admin(tick);
        if tick {
            self.last_tick = Instant::now();
            if !self.link.is_standby() {
                self.expire_presence();
            }
            self.link.bus_tick();
            let worker = super::usage::publish(&self.link.usage());
            self.link.set_worker_stats(worker);
            super::allocator::give_back_when_idle();
            // A client backend reports its statistics when it goes idle; the worker never
            // does, so its transactions and row changes (stored offsets, persisted messages,
            // presence) would not show in pg_stat_database and pg_stat_user_tables.
            // SAFETY: the worker's main thread, between transactions.
            unsafe { pg_sys::pgstat_report_stat(false) };
        }
    }

    /// Expires SQL presence whose ttl ran out.
    fn expire_presence(&mut self) {
        match presence::expire() {
            Ok(()) => self.expiry_failing = false,
            Err(e) => {
                super::exit_if_extension_dropped();
                // Once per streak of failures: it is retried every second.
                if !std::mem::replace(&mut self.expiry_failing, true) {
                    log!("pg_realtime: cannot expire SQL presence (retrying quietly): {e}");
                }
            }
        }
    }

    /// Moves the bus between this node and the others (see `server_link`).
    fn pump_bus(&mut self) {
        if self.link.pump_bus() {
            self.bus_active = Some(Instant::now());
        }
    }

    /// Delivers whatever is ready, and decides whether to poll.
    fn deliver(&mut self) {
        let now = Instant::now();
        let delivered = self.deliver_ready();
        let (since, count) = &mut self.rate_window;
        *count += delivered;
        if now.duration_since(*since) >= RATE_WINDOW {
            if *count >= BUSY_RATE {
                if self.busy_until.is_none() {
                    shmem::set_worker_polling(true);
                }
                self.busy_until = Some(now + BUSY_LINGER);
            }
            self.rate_window = (now, 0);
        }
        if delivered > 0 {
            if self.looking_until.is_none() {
                shmem::set_worker_looking(true);
            }
            self.looking_until = Some(now + LOOK_LINGER);
        }
        if self.busy_until.is_some_and(|until| now >= until) {
            self.busy_until = None;
            shmem::set_worker_polling(false);
            // A commit may have skipped the wake-up while we were still polling.
            self.rate_window.1 += self.deliver_ready();
        }
        if self.looking_until.is_some_and(|until| now >= until) {
            self.looking_until = None;
            shmem::set_worker_looking(false);
            // A commit may have skipped the wake-up while we were still looking.
            self.rate_window.1 += self.deliver_ready();
        }
    }

    /// Delivers every ready transaction; returns how many messages went out.
    fn deliver_ready(&mut self) -> u64 {
        let mut total = 0;
        loop {
            let (messages, pending) = queue_reader::drain(self.database);
            let blocked = pending.is_some();
            // Stopped at an unfinished transaction after a commit woke us: that commit's
            // messages may be behind it, so every commit wakes us until we are past it. The
            // transaction may commit before it sees the flag, without waking us: after raising
            // the flag, look once more.
            let woken = shmem::take_commit_wake();
            if !blocked {
                self.waited_for = false;
            } else if woken {
                self.waited_for = true;
            }
            let hold = blocked && self.waited_for;
            let newly_held = hold && !self.holding;
            if hold != self.holding {
                shmem::set_worker_blocked(hold);
                self.holding = hold;
            }
            self.blocked = blocked;
            self.stall.observe(pending);
            let n = messages.len() as u64;
            let dropped = self.link.publish(messages);
            let stats = shmem::stats();
            stats.delivered.fetch_add(n - dropped, Ordering::Relaxed);
            stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            total += n;
            if !newly_held && (n == 0 || blocked) {
                return total;
            }
        }
    }
}
