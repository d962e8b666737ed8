//! A single-consumer byte ring of transaction records, read back in commit order.
//!
//! A committing transaction reserves one record, holding all of its messages, at pre-commit
//! (while it can still fail), stamped with a *floor*: the WAL insert position read under the
//! ring's lock, so floors grow in ring order. Once the transaction has committed, its own
//! backend stores the end of its commit record (its commit LSN) in the record's state word,
//! or `ABORTED` if it rolled back: one atomic store, which cannot fail, in the commit or abort
//! callback. Nothing serializes the committers, so they share WAL flushes.
//!
//! The consumer delivers records in commit-LSN order, which is the order of the commit records
//! in the WAL. A committed record is safe to deliver once no other transaction can still commit
//! before it: every transaction that has not finished yet will write its commit record after
//! its own floor, and floors grow in ring order, so a committed record is ready when its commit
//! LSN is below the floor of the first unfinished record (or no record is unfinished). That
//! keeps causality too: a transaction that saw another's commit reserves after that commit.
//!
//! Offsets `head` and `tail` grow forever (u64 never wraps in practice); the position in the
//! buffer is `offset % capacity`. A record never straddles the end of the buffer: when it does
//! not fit, the rest of the buffer is marked as padding and the record starts at position 0.
//! Producers hold an exclusive lock around [`RingHeader::reserve`], and the consumer around
//! [`RingHeader::take_ready`]; only the state words are written without it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes before a record's messages: body length, xid, database oid, message count, floor,
/// state word.
pub const RECORD_HEADER: usize = 32;
const ALIGN: usize = 8;
const PADDING_MARK: u32 = u32::MAX;
const STATE_AT: usize = 24;

/// The transaction has not finished; everything behind it waits.
pub const PENDING: u64 = 0;
/// The transaction rolled back: its messages are dropped.
pub const ABORTED: u64 = 1;
/// Delivered, but not yet at the tail, so its space is not free yet.
const TAKEN: u64 = 2;
/// The smallest state that means "committed, at this commit LSN".
pub const FIRST_COMMIT_LSN: u64 = 3;

/// The ring's bookkeeping. It lives in shared memory, next to the buffer it describes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingHeader {
    pub head: u64,
    pub tail: u64,
}

/// Returned when a record does not fit; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Bytes the record needed, padding included.
    pub needed: u64,
    /// Bytes that were free.
    pub free: u64,
}

/// One committed transaction's messages, handed to the consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub xid: u32,
    pub database: u32,
    pub commit_lsn: u64,
    count: u32,
    body: &'a [u8],
}

impl<'a> Record<'a> {
    /// The message bodies, in the order the transaction sent them.
    pub fn messages(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.body;
        (0..self.count).map_while(move |_| {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let message = rest.get(4..4 + len)?;
            rest = &rest[4 + len..];
            Some(message)
        })
    }

    pub fn message_count(&self) -> u32 {
        self.count
    }
}

/// The first record whose transaction has not finished, which holds back delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub xid: u32,
    /// Where its state word is, for [`finish`].
    pub position: usize,
    pub floor: u64,
}

/// What [`RingHeader::take_ready`] found.
#[derive(Debug, Default)]
pub struct Ready<'a> {
    /// Records safe to deliver, in commit order.
    pub records: Vec<Record<'a>>,
    /// The unfinished record delivery waits for, if any.
    pub pending: Option<Pending>,
    /// Messages of rolled-back transactions whose space was freed by this call.
    pub aborted_messages: u64,
}

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The space a record with messages of these lengths takes, header and alignment included.
pub fn record_size<'b>(bodies: impl IntoIterator<Item = &'b [u8]>) -> usize {
    aligned(RECORD_HEADER + bodies.into_iter().map(|b| 4 + b.len()).sum::<usize>())
}

/// The state word of the record at `position`.
///
/// `buf` must start 8-byte aligned (shared memory is), and `position` must come from
/// [`RingHeader::reserve`] or [`Pending`].
pub fn state_cell(buf: &[u8], position: usize) -> &AtomicU64 {
    let bytes = &buf[position + STATE_AT..position + STATE_AT + 8];
    let ptr = bytes.as_ptr().cast::<AtomicU64>();
    assert!(ptr.is_aligned(), "ring buffer is not 8-byte aligned");
    // SAFETY: in bounds, aligned, and this word is only ever accessed atomically.
    unsafe { &*ptr }
}

/// Records how the record's transaction ended: its commit LSN, or [`ABORTED`]. Called once,
/// by the transaction's own backend, without the ring's lock; cannot fail.
pub fn finish(buf: &[u8], position: usize, outcome: u64) {
    state_cell(buf, position).store(outcome, Ordering::Release);
}

/// The state word for a commit whose commit record ends at `lsn`.
pub fn committed_at(lsn: u64) -> u64 {
    lsn.max(FIRST_COMMIT_LSN)
}

impl RingHeader {
    /// Bytes in use, padding included.
    pub fn used(&self) -> u64 {
        self.head - self.tail
    }

    /// Appends one transaction's messages as a pending record, or nothing at all; returns the
    /// record's position, for [`finish`].
    ///
    /// `buf.len()` must be a non-zero multiple of 8 and the same on every call; `floor` must
    /// not be lower than any floor reserved before.
    pub fn reserve(
        &mut self,
        buf: &mut [u8],
        xid: u32,
        database: u32,
        floor: u64,
        bodies: &[&[u8]],
    ) -> Result<usize, Full> {
        let capacity = buf.len() as u64;
        debug_assert!(capacity > 0 && capacity.is_multiple_of(ALIGN as u64));
        if self.used() == 0 && !self.head.is_multiple_of(capacity) {
            // Nothing is queued: restart at position 0 so that any record up to the capacity
            // fits. Safe because the consumer reads under the same lock.
            let start = self.head.next_multiple_of(capacity);
            self.head = start;
            self.tail = start;
        }
        let size = record_size(bodies.iter().copied()) as u64;
        let room_to_end = capacity - self.head % capacity;
        let needed = if size > room_to_end {
            size + room_to_end
        } else {
            size
        };
        let free = capacity - self.used();
        let body_len = u32::try_from(size as usize - RECORD_HEADER);
        let count = u32::try_from(bodies.len());
        let (Ok(body_len), Ok(count)) = (body_len, count) else {
            return Err(Full { needed, free });
        };
        if needed > free || size > capacity {
            return Err(Full { needed, free });
        }
        let mut pos = (self.head % capacity) as usize;
        if size > room_to_end {
            buf[pos..pos + 4].copy_from_slice(&PADDING_MARK.to_le_bytes());
            self.head += room_to_end;
            pos = 0;
        }
        buf[pos..pos + 4].copy_from_slice(&body_len.to_le_bytes());
        buf[pos + 4..pos + 8].copy_from_slice(&xid.to_le_bytes());
        buf[pos + 8..pos + 12].copy_from_slice(&database.to_le_bytes());
        buf[pos + 12..pos + 16].copy_from_slice(&count.to_le_bytes());
        buf[pos + 16..pos + 24].copy_from_slice(&floor.to_le_bytes());
        let mut at = pos + RECORD_HEADER;
        for body in bodies {
            buf[at..at + 4].copy_from_slice(&(body.len() as u32).to_le_bytes());
            buf[at + 4..at + 4 + body.len()].copy_from_slice(body);
            at += 4 + body.len();
        }
        state_cell(buf, pos).store(PENDING, Ordering::Release);
        self.head += size;
        Ok(pos)
    }

    /// Takes up to `max` committed records that can no longer be overtaken, in commit order,
    /// and frees the space of everything finished at the tail.
    pub fn take_ready<'a>(&mut self, buf: &'a [u8], max: usize) -> Ready<'a> {
        let mut ready = Ready::default();
        // Looking at every record each time would make a long backlog quadratic; look at a
        // window, widened only when nothing in it can go yet.
        let mut window = max.max(1).saturating_mul(4);
        let candidates = loop {
            let scan = self.scan(buf, window);
            ready.pending = scan.pending;
            let mut ok: Vec<(u64, usize)> = scan
                .committed
                .into_iter()
                .filter(|(lsn, _)| *lsn < scan.bound)
                .collect();
            if ok.is_empty() && scan.truncated {
                window = window.saturating_mul(2);
                continue;
            }
            ok.sort_unstable();
            ok.truncate(max);
            break ok;
        };
        for (lsn, pos) in candidates {
            let body_len = read_u32(buf, pos) as usize;
            ready.records.push(Record {
                xid: read_u32(buf, pos + 4),
                database: read_u32(buf, pos + 8),
                count: read_u32(buf, pos + 12),
                commit_lsn: lsn,
                body: &buf[pos + RECORD_HEADER..pos + RECORD_HEADER + body_len],
            });
            state_cell(buf, pos).store(TAKEN, Ordering::Relaxed);
        }
        ready.aborted_messages = self.free_finished(buf);
        ready
    }

    /// Reads states from the tail until the first pending record, the head, or `window`
    /// records, whichever comes first.
    fn scan(&self, buf: &[u8], window: usize) -> Scan {
        let capacity = buf.len() as u64;
        let mut scan = Scan {
            committed: Vec::new(),
            bound: u64::MAX,
            pending: None,
            truncated: false,
        };
        let mut offset = self.tail;
        let mut seen = 0;
        while offset < self.head {
            let pos = (offset % capacity) as usize;
            let len = read_u32(buf, pos);
            if len == PADDING_MARK {
                offset += capacity - pos as u64;
                continue;
            }
            let floor = read_u64(buf, pos + 16);
            if seen == window {
                // Whatever lies beyond commits after this floor at the earliest.
                scan.bound = floor;
                scan.truncated = true;
                break;
            }
            seen += 1;
            match state_cell(buf, pos).load(Ordering::Acquire) {
                PENDING => {
                    scan.bound = floor;
                    scan.pending = Some(Pending {
                        xid: read_u32(buf, pos + 4),
                        position: pos,
                        floor,
                    });
                    break;
                }
                ABORTED | TAKEN => {}
                lsn => scan.committed.push((lsn, pos)),
            }
            offset += (RECORD_HEADER + len as usize) as u64;
        }
        scan
    }

    /// Moves the tail over taken and aborted records; returns the aborted messages freed.
    fn free_finished(&mut self, buf: &[u8]) -> u64 {
        let capacity = buf.len() as u64;
        let mut aborted = 0;
        while self.tail < self.head {
            let pos = (self.tail % capacity) as usize;
            let len = read_u32(buf, pos);
            if len == PADDING_MARK {
                self.tail += capacity - pos as u64;
                continue;
            }
            match state_cell(buf, pos).load(Ordering::Acquire) {
                TAKEN => {}
                ABORTED => aborted += u64::from(read_u32(buf, pos + 12)),
                _ => break,
            }
            self.tail += (RECORD_HEADER + len as usize) as u64;
        }
        aborted
    }
}

struct Scan {
    committed: Vec<(u64, usize)>,
    bound: u64,
    pending: Option<Pending>,
    truncated: bool,
}

fn read_u32(buf: &[u8], pos: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[pos..pos + 4]);
    u32::from_le_bytes(bytes)
}

fn read_u64(buf: &[u8], pos: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[pos..pos + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8-byte-aligned buffer, as shared memory is.
    struct Buf(Vec<u64>);

    impl Buf {
        fn new(bytes: usize) -> Buf {
            Buf(vec![0; bytes / 8])
        }
        fn bytes(&mut self) -> &mut [u8] {
            let len = self.0.len() * 8;
            // SAFETY: a Vec<u64> is a valid, aligned run of len bytes.
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
        }
    }

    fn take_all(h: &mut RingHeader, buf: &[u8]) -> Vec<(u32, Vec<Vec<u8>>)> {
        h.take_ready(buf, usize::MAX)
            .records
            .iter()
            .map(|r| (r.xid, r.messages().map(<[u8]>::to_vec).collect()))
            .collect()
    }

    fn commit(buf: &[u8], pos: usize, lsn: u64) {
        finish(buf, pos, committed_at(lsn));
    }

    #[test]
    fn committed_records_come_back_whole_in_commit_order() {
        let mut b = Buf::new(512);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let one = h.reserve(buf, 7, 1, 100, &[b"one", b"two"]).unwrap();
        let two = h.reserve(buf, 8, 1, 110, &[b"three"]).unwrap();
        // The later reservation committed first.
        commit(buf, two, 150);
        commit(buf, one, 160);
        let got = take_all(&mut h, buf);
        assert_eq!(
            got,
            vec![
                (8, vec![b"three".to_vec()]),
                (7, vec![b"one".to_vec(), b"two".to_vec()])
            ]
        );
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn a_pending_record_holds_back_only_what_may_commit_after_it() {
        let mut b = Buf::new(512);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let early = h.reserve(buf, 1, 1, 100, &[b"early"]).unwrap();
        let slow = h.reserve(buf, 2, 1, 200, &[b"slow"]).unwrap();
        let fast = h.reserve(buf, 3, 1, 300, &[b"fast"]).unwrap();
        // `early` committed before `slow` reserved: nothing can overtake it.
        commit(buf, early, 150);
        // `fast` committed while `slow` is unfinished; `slow` may still commit before it.
        commit(buf, fast, 350);
        let ready = h.take_ready(buf, usize::MAX);
        assert_eq!(ready.records.len(), 1);
        assert_eq!(ready.records[0].xid, 1);
        assert_eq!(ready.pending.map(|p| p.xid), Some(2));
        // `slow` committed last after all: `fast` goes first.
        commit(buf, slow, 400);
        assert_eq!(
            take_all(&mut h, buf),
            vec![(3, vec![b"fast".to_vec()]), (2, vec![b"slow".to_vec()])]
        );
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn a_committed_record_waits_for_an_earlier_pending_one() {
        let mut b = Buf::new(512);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let first = h.reserve(buf, 1, 1, 100, &[b"a"]).unwrap();
        let second = h.reserve(buf, 2, 1, 110, &[b"b"]).unwrap();
        commit(buf, second, 120);
        let ready = h.take_ready(buf, usize::MAX);
        assert!(ready.records.is_empty());
        assert_eq!(ready.pending.map(|p| p.position), Some(first));
        commit(buf, first, 130);
        let got: Vec<u32> = take_all(&mut h, buf).iter().map(|r| r.0).collect();
        assert_eq!(got, vec![2, 1]);
    }

    #[test]
    fn aborted_records_are_skipped_and_counted() {
        let mut b = Buf::new(512);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let gone = h.reserve(buf, 1, 1, 100, &[b"x", b"y"]).unwrap();
        let kept = h.reserve(buf, 2, 1, 110, &[b"z"]).unwrap();
        finish(buf, gone, ABORTED);
        commit(buf, kept, 120);
        let ready = h.take_ready(buf, usize::MAX);
        assert_eq!(ready.aborted_messages, 2);
        assert_eq!(ready.records.len(), 1);
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn at_most_max_records_are_taken_smallest_lsn_first() {
        let mut b = Buf::new(1024);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let positions: Vec<usize> = (0..6)
            .map(|i| h.reserve(buf, i, 1, 100 + i as u64, &[b"m"]).unwrap())
            .collect();
        for (i, pos) in positions.iter().enumerate() {
            commit(buf, *pos, 1000 - i as u64);
        }
        let mut order = Vec::new();
        loop {
            let ready = h.take_ready(buf, 2);
            if ready.records.is_empty() {
                break;
            }
            assert!(ready.records.len() <= 2);
            order.extend(ready.records.iter().map(|r| r.commit_lsn));
        }
        assert_eq!(order, vec![995, 996, 997, 998, 999, 1000]);
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn a_window_of_late_commits_widens_instead_of_stalling() {
        let mut b = Buf::new(4096);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        // Ten records, all committed after the last one reserved (floor 200).
        let positions: Vec<usize> = (0..10)
            .map(|i| h.reserve(buf, i, 1, 100 + i as u64 * 10, &[b"m"]).unwrap())
            .collect();
        for (i, pos) in positions.iter().enumerate() {
            commit(buf, *pos, 500 + i as u64);
        }
        // A window of 4 stops at a floor (140) below every commit LSN; it must widen.
        let ready = h.take_ready(buf, 1);
        assert_eq!(ready.records.len(), 1);
        assert_eq!(ready.records[0].commit_lsn, 500);
    }

    #[test]
    fn a_record_that_does_not_fit_writes_nothing() {
        let mut b = Buf::new(128);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        h.reserve(buf, 1, 1, 1, &[&[1u8; 40]]).unwrap();
        let before = h;
        let err = h
            .reserve(buf, 2, 1, 2, &[&[2u8; 8], &[3u8; 40]])
            .unwrap_err();
        assert!(err.needed > err.free);
        assert_eq!(h, before);
    }

    #[test]
    fn a_record_as_large_as_the_ring_fits_when_empty() {
        let mut b = Buf::new(128);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let p = h.reserve(buf, 1, 1, 1, &[&[1u8; 8]]).unwrap();
        commit(buf, p, 10);
        take_all(&mut h, buf);
        let p = h.reserve(buf, 2, 1, 20, &[&[2u8; 92]]).unwrap();
        commit(buf, p, 30);
        assert_eq!(take_all(&mut h, buf), vec![(2, vec![vec![2u8; 92]])]);
    }

    #[test]
    fn a_record_larger_than_the_ring_is_refused() {
        let mut b = Buf::new(128);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        assert!(h.reserve(buf, 1, 1, 1, &[&[0u8; 93]]).is_err());
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn records_wrap_around_without_straddling() {
        let mut b = Buf::new(256);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let mut keep = None;
        for round in 0u32..60 {
            // One record stays queued so the ring cannot restart at position 0.
            let body = vec![round as u8; (round as usize * 7) % 40];
            let p = h
                .reserve(buf, round, 1, round as u64 * 10, &[&body])
                .unwrap();
            if let Some(prev) = keep.replace(p) {
                // Committed before this round's record reserved, so nothing can overtake it.
                commit(buf, prev, round as u64 * 10 - 1);
                let got = take_all(&mut h, buf);
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].0, round - 1);
            }
        }
        assert!(h.head > buf.len() as u64 * 2, "the test must have wrapped");
    }

    #[test]
    fn a_full_ring_frees_space_once_the_tail_is_taken() {
        let mut b = Buf::new(128);
        let buf = b.bytes();
        let mut h = RingHeader::default();
        let first = h.reserve(buf, 1, 1, 1, &[&[0u8; 28]]).unwrap();
        let second = h.reserve(buf, 2, 1, 2, &[&[0u8; 28]]).unwrap();
        assert_eq!(h.used(), 128);
        assert!(h.reserve(buf, 3, 1, 3, &[b""]).is_err());
        // The second is taken first; its space frees only once the first is gone too.
        commit(buf, second, 5);
        let ready = h.take_ready(buf, usize::MAX);
        assert!(
            ready.records.is_empty(),
            "the pending first may commit before it"
        );
        commit(buf, first, 6);
        assert_eq!(take_all(&mut h, buf).len(), 2);
        assert_eq!(h.used(), 0);
        h.reserve(buf, 3, 1, 7, &[&[9u8; 8]]).unwrap();
    }
}
