//! On a standby: reads the bus back from this node's own copy of the WAL. The primary's worker
//! writes each envelope as a logical message (`bus_writer`); streaming replication brings it
//! here and the startup process replays it (as a no-op). This reader follows the replay
//! position with PostgreSQL's own WAL reader and hands over the envelopes of this database, in
//! WAL order — the primary's delivery order — so database messages reach every node's sockets
//! in the same commit order, and a standby that lost the primary for a while resumes where its
//! WAL left off.

use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::bus::WAL_PREFIX;
use std::cell::Cell;

/// `xl_logical_message` (replication/message.h): dbId, transactional, prefix_size,
/// message_size, then the prefix (with its NUL) and the message.
const MESSAGE_HEADER: usize = 24;
const XLOG_LOGICAL_MESSAGE: u8 = 0x00;
const XLR_INFO_MASK: u8 = 0x0F;

// The WAL reader calls these back from C: the plain C functions are needed, not pgrx's
// guarded Rust wrappers of them.
unsafe extern "C-unwind" {
    #[link_name = "read_local_xlog_page_no_wait"]
    fn page_read(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        cur_page: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    #[link_name = "wal_segment_open"]
    fn segment_open(
        state: *mut pg_sys::XLogReaderState,
        next_seg: pg_sys::XLogSegNo,
        tli: *mut pg_sys::TimeLineID,
    );
    #[link_name = "wal_segment_close"]
    fn segment_close(state: *mut pg_sys::XLogReaderState);
}

pub struct BusReader {
    /// Where the next record starts, once known.
    next: pg_sys::XLogRecPtr,
    /// `next` is a record's start (not just a position to search from).
    aligned: bool,
    database: pg_sys::Oid,
}

impl BusReader {
    /// Starts at the current replay position: what was replayed before belongs to clients that
    /// were connected before this worker started.
    pub fn start() -> BusReader {
        BusReader {
            // SAFETY: reads shared recovery state.
            next: unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) },
            aligned: false,
            // SAFETY: set once when the worker connected to its database.
            database: unsafe { pg_sys::MyDatabaseId },
        }
    }

    /// Whether WAL past what was read has been replayed.
    pub fn has_news(&self) -> bool {
        // SAFETY: reads shared recovery state.
        unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) > self.next }
    }

    /// The envelopes replayed since the last call, oldest first.
    pub fn read(&mut self) -> Vec<Vec<u8>> {
        if !self.has_news() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let reader: Cell<*mut pg_sys::XLogReaderState> = Cell::new(std::ptr::null_mut());
        let run = std::panic::AssertUnwindSafe(|| self.read_records(&reader, &mut out));
        let result: Result<(), String> = PgTryBuilder::new(move || {
            let mut run = run;
            (run.0)();
            Ok(())
        })
        .catch_others(|caught| {
            let message = match caught {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    r.message().to_string()
                }
            };
            Err(message)
        })
        .execute();
        let r = reader.get();
        if !r.is_null() {
            // SAFETY: allocated by read_records and not freed yet (it frees and clears it).
            unsafe { pg_sys::XLogReaderFree(r) };
        }
        if let Err(e) = result {
            // Messages between here and the replay position are lost to this node's clients:
            // say so, and go on from the replay position.
            log!(
                "pg_realtime: cannot read the bus from the WAL, skipping to the replay position: {e}"
            );
            // SAFETY: reads shared recovery state.
            self.next = unsafe { pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()) };
            self.aligned = false;
        }
        out
    }

    fn read_records(
        &mut self,
        reader: &Cell<*mut pg_sys::XLogReaderState>,
        out: &mut Vec<Vec<u8>>,
    ) {
        // SAFETY: PostgreSQL's WAL reader used as pg_walinspect uses it: allocated with the
        // local page reader that never waits (it stops at the replay position on a standby),
        // positioned at a record start, read record by record, freed by the caller. Errors
        // raise and are caught by the caller.
        unsafe {
            let private: *mut pg_sys::ReadLocalXLogPageNoWaitPrivate =
                pg_sys::palloc0(size_of::<pg_sys::ReadLocalXLogPageNoWaitPrivate>()).cast();
            let mut routine = pg_sys::XLogReaderRoutine {
                page_read: Some(page_read),
                segment_open: Some(segment_open),
                segment_close: Some(segment_close),
            };
            let r = pg_sys::XLogReaderAllocate(
                pg_sys::wal_segment_size,
                std::ptr::null(),
                &mut routine,
                private.cast(),
            );
            if r.is_null() {
                error!("out of memory while allocating a WAL reader");
            }
            reader.set(r);
            let start = if self.aligned {
                self.next
            } else {
                pg_sys::XLogFindNextRecord(r, self.next)
            };
            if start == 0 {
                return;
            }
            pg_sys::XLogBeginRead(r, start);
            loop {
                let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
                let record = pg_sys::XLogReadRecord(r, &mut error);
                if record.is_null() {
                    if !(*private).end_of_wal && !error.is_null() {
                        let text = std::ffi::CStr::from_ptr(error).to_string_lossy();
                        error!("{text}");
                    }
                    break;
                }
                self.next = (*r).EndRecPtr;
                self.aligned = true;
                if let Some(envelope) = self.envelope_of((*r).record) {
                    out.push(envelope);
                }
            }
        }
    }

    /// The envelope a decoded record carries, if it is one of this database's bus messages.
    ///
    /// # Safety
    /// `record` is the reader's current decoded record.
    unsafe fn envelope_of(&self, record: *const pg_sys::DecodedXLogRecord) -> Option<Vec<u8>> {
        // SAFETY: the caller's record, whose main data holds main_data_len bytes.
        let (rmid, info, data) = unsafe {
            let d = &*record;
            let data = if d.main_data.is_null() {
                &[][..]
            } else {
                std::slice::from_raw_parts(d.main_data.cast::<u8>(), d.main_data_len as usize)
            };
            (d.header.xl_rmid, d.header.xl_info, data)
        };
        if u32::from(rmid) != pg_sys::RmgrIds::RM_LOGICALMSG_ID
            || info & !XLR_INFO_MASK != XLOG_LOGICAL_MESSAGE
            || data.len() < MESSAGE_HEADER
        {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            usize::try_from(u64::from_ne_bytes(b)).ok()
        };
        let database = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
        let transactional = data[4] != 0;
        let (prefix_size, message_size) = (u64_at(8)?, u64_at(16)?);
        let prefix_end = MESSAGE_HEADER.checked_add(prefix_size)?;
        let end = prefix_end.checked_add(message_size)?;
        if database != u32::from(self.database) || transactional || end > data.len() {
            return None;
        }
        let prefix = &data[MESSAGE_HEADER..prefix_end];
        if prefix.strip_suffix(b"\0") != Some(WAL_PREFIX.as_bytes()) {
            return None;
        }
        Some(data[prefix_end..end].to_vec())
    }
}
