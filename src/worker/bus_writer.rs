//! On the primary: every bus envelope — the committed database messages in commit order, this
//! node's client broadcasts and presence, and the envelopes standbys relayed — is written into
//! the WAL as a non-transactional logical message and flushed, so that streaming replication
//! carries it to every standby, whose worker reads it back (`bus_reader`).
//!
//! The worker does not wait for the disk after each batch: it asks the WAL writer to flush
//! (as an asynchronous commit does), and under a stream of commits the committers' own flushes
//! carry the bus along. Only when nothing flushed it within [`FLUSH_GRACE`] does the worker
//! flush itself, so a lone client broadcast still reaches the standbys promptly and a
//! commit-heavy primary never pays an extra fsync per batch on its delivery thread.
//!
//! A logical message is an ordinary WAL record: a standby without pg_realtime replays it as a
//! no-op, and `wal_level = replica` is enough. Nothing is written while no standby's worker
//! has been heard from for [`FORGET_AFTER`], so a single node pays nothing for the bus.

use super::transaction;
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::Server;
use realtime_server::bus::WAL_PREFIX;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long the primary goes on writing the bus after the last standby was heard from (also
/// across its own restarts, through `realtime.nodes`): a standby that restarts or loses its
/// link for a while misses nothing.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often a standby's row in `realtime.nodes` is refreshed.
const RECORD_EVERY: Duration = Duration::from_secs(30);
const NODES_TIMEOUT: Duration = Duration::from_secs(5);
/// How long written envelopes may wait for someone else's flush before the worker flushes.
pub const FLUSH_GRACE: Duration = Duration::from_millis(2);

// `replication/message.h` is not in pgrx's bindings; calls go through the FFI guard.
unsafe extern "C-unwind" {
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

struct Standby {
    name: String,
    heard: Instant,
    written: Option<Instant>,
}

pub struct BusWriter {
    /// When a standby's worker was last heard from.
    last_heard: Option<Instant>,
    /// Standbys heard from: name, when last heard from, when their row was last written.
    recorded: HashMap<u64, Standby>,
    /// The end of the last envelope written and when, until it is known to be flushed.
    unflushed: Option<(pg_sys::XLogRecPtr, Instant)>,
}

impl BusWriter {
    /// Starts writing at once if a standby was heard from recently, before this start.
    pub fn start(server: &Server) -> BusWriter {
        let recent = transaction::try_spi(NODES_TIMEOUT, || {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM realtime.nodes
                                 WHERE last_seen > now() - make_interval(secs => $1))",
                &[(FORGET_AFTER.as_secs() as f64).into()],
            )
        });
        let recent = match recent {
            Ok(found) => found.unwrap_or(false),
            Err(e) => {
                log!("pg_realtime: cannot read realtime.nodes: {e}");
                false
            }
        };
        set_relaying(server, recent);
        BusWriter {
            last_heard: recent.then(Instant::now),
            recorded: HashMap::new(),
            unflushed: None,
        }
    }

    /// Whether the bus is written. A standby's first relay call turns it on at once (through
    /// shared memory), before its envelope is even taken off the commit queue.
    pub fn relaying(&mut self, server: &Server) -> bool {
        if self.last_heard.is_none()
            && crate::queue::shmem::stats()
                .standby_heard
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            log!(
                "pg_realtime: a standby's worker reached this primary; writing the bus into the WAL"
            );
            self.last_heard = Some(Instant::now());
            set_relaying(server, true);
        }
        self.last_heard.is_some()
    }

    /// A standby's envelope arrived: write the bus from now on (it says hello first).
    pub fn heard_from(&mut self, server: &Server, node: u64, name: Option<&str>) {
        if self.last_heard.is_none() {
            log!(
                "pg_realtime: a standby's worker reached this primary; writing the bus into the WAL"
            );
        }
        self.last_heard = Some(Instant::now());
        set_relaying(server, true);
        let entry = self.recorded.entry(node).or_insert_with(|| Standby {
            name: String::new(),
            heard: Instant::now(),
            written: None,
        });
        entry.heard = Instant::now();
        if let Some(name) = name {
            entry.name = name.to_string();
        }
    }

    /// Writes `envelopes` into the WAL in order; they are flushed (and so sent to the
    /// standbys) by the WAL writer, a commit, or [`BusWriter::flush_if_late`].
    pub fn write(&mut self, envelopes: &[Vec<u8>]) {
        if envelopes.is_empty() {
            return;
        }
        let prefix = std::ffi::CString::new(WAL_PREFIX).unwrap_or_default();
        let mut last = 0;
        for e in envelopes {
            // SAFETY: prefix is NUL-terminated and e is a live byte buffer of e.len() bytes;
            // the worker is connected to its database (the message carries its id).
            last = unsafe {
                pg_sys::ffi::pg_guard_ffi_boundary(|| {
                    LogLogicalMessage(prefix.as_ptr(), e.as_ptr().cast(), e.len(), false)
                })
            };
        }
        // SAFETY: asks the WAL writer to flush up to a position this process just inserted.
        unsafe { pg_sys::XLogSetAsyncXactLSN(last) };
        let since = self.unflushed.map_or_else(Instant::now, |(_, t)| t);
        self.unflushed = Some((last, since));
    }

    /// Written envelopes wait for a flush: the worker should come back within [`FLUSH_GRACE`].
    pub fn waiting_for_flush(&self) -> bool {
        self.unflushed.is_some()
    }

    /// Flushes what was written if nobody else did within [`FLUSH_GRACE`].
    pub fn flush_if_late(&mut self) {
        let Some((lsn, since)) = self.unflushed else {
            return;
        };
        // SAFETY: reads shared WAL state.
        if unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) } >= lsn {
            self.unflushed = None;
        } else if since.elapsed() >= FLUSH_GRACE {
            // SAFETY: flushing WAL up to a position this process inserted.
            unsafe { pg_sys::XLogFlush(lsn) };
            self.unflushed = None;
        }
    }

    /// Once a second: stop writing after [`FORGET_AFTER`] without a standby, and keep
    /// `realtime.nodes` current.
    pub fn tick(&mut self, server: &Server) {
        if self.last_heard.is_some_and(|t| t.elapsed() > FORGET_AFTER) {
            log!(
                "pg_realtime: no standby's worker was heard from for {FORGET_AFTER:?}; no longer writing the bus"
            );
            self.last_heard = None;
            self.recorded.clear();
            set_relaying(server, false);
            return;
        }
        self.recorded
            .retain(|_, s| s.heard.elapsed() < FORGET_AFTER);
        self.record(false);
    }

    /// At a clean stop: the standbys heard from since their rows were last written are
    /// recorded now, so that the next start writes the bus from its first message even when
    /// a standby joined less than a tick before this stop.
    pub fn record_before_stop(&mut self) {
        self.record(true);
    }

    /// Writes the rows of `realtime.nodes` that are due (all those heard from since their last
    /// write when `now`).
    fn record(&mut self, now: bool) {
        let due: Vec<(i64, String)> = self
            .recorded
            .iter()
            .filter(|(_, s)| now || s.written.is_none_or(|t| t.elapsed() >= RECORD_EVERY))
            .filter(|(_, s)| s.written.is_none_or(|t| s.heard > t))
            .map(|(id, s)| (*id as i64, s.name.clone()))
            .collect();
        if due.is_empty() {
            return;
        }
        let (ids, names): (Vec<i64>, Vec<String>) = due.into_iter().unzip();
        let written = ids.clone();
        let result = transaction::try_spi(NODES_TIMEOUT, move || {
            Spi::run_with_args(
                "INSERT INTO realtime.nodes AS n (id, name, last_seen)
                 SELECT * , now() FROM unnest($1::bigint[], $2::text[])
                 ON CONFLICT (id) DO UPDATE SET last_seen = now(),
                     name = CASE WHEN excluded.name = '' THEN n.name ELSE excluded.name END",
                &[ids.into(), names.into()],
            )?;
            // Nodes are new at each start: old rows only say when a standby was last seen.
            Spi::run("DELETE FROM realtime.nodes WHERE last_seen < now() - interval '1 day'")
        });
        match result {
            Ok(()) => {
                for id in written {
                    if let Some(entry) = self.recorded.get_mut(&(id as u64)) {
                        entry.written = Some(Instant::now());
                    }
                }
            }
            Err(e) => log!("pg_realtime: cannot record standbys in realtime.nodes: {e}"),
        }
    }
}

/// Turns the bus on or off for the server and for committers: while standbys listen, every
/// commit wakes the worker, since their sockets' topics are not in this node's watch table.
fn set_relaying(server: &Server, on: bool) {
    server.set_relaying(on);
    crate::queue::shmem::set_standbys_listen(on);
}
