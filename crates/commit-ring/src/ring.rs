//! A single-consumer byte ring of variable-sized entries.
//!
//! Offsets `head` and `tail` grow forever (u64 never wraps in practice); the position in the
//! buffer is `offset % capacity`. An entry never straddles the end of the buffer: when it does
//! not fit, the rest of the buffer is marked as padding and the entry starts at position 0.
//! All-or-nothing batches matter because a transaction's messages must either all be queued or
//! the transaction must fail; a partial batch would deliver half a transaction.
//!
//! Locking is the caller's business: producers hold an exclusive lock around
//! [`RingHeader::push_batch`]; the consumer holds it across a [`RingHeader::peek`] and the
//! [`RingHeader::advance`] that follows it (one lock hold for both).

/// Bytes before each entry's body: body length, xid, database oid, reserved.
pub const ENTRY_HEADER: usize = 16;
const ALIGN: usize = 8;
const PADDING_MARK: u32 = u32::MAX;

/// The ring's bookkeeping. It lives in shared memory, next to the buffer it describes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingHeader {
    pub head: u64,
    pub tail: u64,
}

/// Returned when a batch does not fit; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Bytes the batch needed, padding included.
    pub needed: u64,
    /// Bytes that were free.
    pub free: u64,
}

/// One entry read back by the consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub xid: u32,
    pub database: u32,
    pub body: &'a [u8],
    /// The tail to pass to [`RingHeader::advance`] once the entry has been dealt with.
    pub next: u64,
}

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The space one entry with a body of `len` bytes takes, header and alignment included.
pub fn entry_size(len: usize) -> usize {
    aligned(ENTRY_HEADER + len)
}

impl RingHeader {
    /// Bytes in use, padding included.
    pub fn used(&self) -> u64 {
        self.head - self.tail
    }

    /// Appends every body as an entry stamped with `xid` and `database`, or nothing at all.
    ///
    /// `buf.len()` must be a non-zero multiple of 8 and the same on every call.
    pub fn push_batch(
        &mut self,
        buf: &mut [u8],
        xid: u32,
        database: u32,
        bodies: &[&[u8]],
    ) -> Result<(), Full> {
        let capacity = buf.len() as u64;
        debug_assert!(capacity > 0 && capacity.is_multiple_of(ALIGN as u64));
        if self.used() == 0 && !self.head.is_multiple_of(capacity) {
            // Nothing is queued: restart at position 0 so that any entry up to the capacity
            // fits. Safe because the consumer peeks and advances under the same lock hold.
            let start = self.head.next_multiple_of(capacity);
            self.head = start;
            self.tail = start;
        }
        // Plan the offsets first so that a batch that does not fit leaves no trace.
        let mut head = self.head;
        for body in bodies {
            let size = entry_size(body.len()) as u64;
            let room_to_end = capacity - head % capacity;
            if size > room_to_end {
                head += room_to_end;
            }
            head += size;
        }
        let needed = head - self.head;
        let free = capacity - self.used();
        if needed > free || bodies.iter().any(|b| entry_size(b.len()) as u64 > capacity) {
            return Err(Full { needed, free });
        }
        for body in bodies {
            let size = entry_size(body.len());
            let mut pos = (self.head % capacity) as usize;
            let room_to_end = buf.len() - pos;
            if size > room_to_end {
                buf[pos..pos + 4].copy_from_slice(&PADDING_MARK.to_le_bytes());
                self.head += room_to_end as u64;
                pos = 0;
            }
            let len = u32::try_from(body.len()).map_err(|_| Full { needed, free })?;
            buf[pos..pos + 4].copy_from_slice(&len.to_le_bytes());
            buf[pos + 4..pos + 8].copy_from_slice(&xid.to_le_bytes());
            buf[pos + 8..pos + 12].copy_from_slice(&database.to_le_bytes());
            buf[pos + 12..pos + 16].copy_from_slice(&0u32.to_le_bytes());
            buf[pos + ENTRY_HEADER..pos + ENTRY_HEADER + body.len()].copy_from_slice(body);
            self.head += size as u64;
        }
        Ok(())
    }

    /// The oldest entry, if any, skipping padding.
    pub fn peek<'a>(&self, buf: &'a [u8]) -> Option<Entry<'a>> {
        let capacity = buf.len() as u64;
        let mut tail = self.tail;
        while tail < self.head {
            let pos = (tail % capacity) as usize;
            let len = read_u32(buf, pos);
            if len == PADDING_MARK {
                tail += capacity - pos as u64;
                continue;
            }
            let len = len as usize;
            return Some(Entry {
                xid: read_u32(buf, pos + 4),
                database: read_u32(buf, pos + 8),
                body: &buf[pos + ENTRY_HEADER..pos + ENTRY_HEADER + len],
                next: tail + entry_size(len) as u64,
            });
        }
        None
    }

    /// Frees everything before `next`, as returned by [`RingHeader::peek`].
    pub fn advance(&mut self, next: u64) {
        debug_assert!(next <= self.head && next >= self.tail);
        self.tail = next.min(self.head);
    }
}

fn read_u32(buf: &[u8], pos: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[pos..pos + 4]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(h: &mut RingHeader, buf: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(e) = h.peek(buf) {
            out.push((e.xid, e.body.to_vec()));
            let next = e.next;
            h.advance(next);
        }
        out
    }

    #[test]
    fn entries_come_back_in_order() {
        let mut buf = vec![0u8; 256];
        let mut h = RingHeader::default();
        h.push_batch(&mut buf, 7, 1, &[b"one", b"two"]).unwrap();
        h.push_batch(&mut buf, 8, 1, &[b"three"]).unwrap();
        let got = drain(&mut h, &buf);
        assert_eq!(
            got,
            vec![
                (7, b"one".to_vec()),
                (7, b"two".to_vec()),
                (8, b"three".to_vec())
            ]
        );
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn a_batch_that_does_not_fit_writes_nothing() {
        let mut buf = vec![0u8; 64];
        let mut h = RingHeader::default();
        h.push_batch(&mut buf, 1, 1, &[&[1u8; 20]]).unwrap();
        let before = h;
        let err = h
            .push_batch(&mut buf, 2, 1, &[&[2u8; 8], &[3u8; 20]])
            .unwrap_err();
        assert!(err.needed > err.free);
        assert_eq!(h, before);
        assert_eq!(drain(&mut h, &buf), vec![(1, vec![1u8; 20])]);
    }

    #[test]
    fn an_entry_as_large_as_the_ring_fits_when_empty() {
        let mut buf = vec![0u8; 64];
        let mut h = RingHeader::default();
        h.push_batch(&mut buf, 1, 1, &[&[1u8; 8]]).unwrap();
        drain(&mut h, &buf);
        h.push_batch(&mut buf, 2, 1, &[&[2u8; 48]]).unwrap();
        assert_eq!(drain(&mut h, &buf), vec![(2, vec![2u8; 48])]);
    }

    #[test]
    fn an_entry_larger_than_the_ring_is_refused() {
        let mut buf = vec![0u8; 64];
        let mut h = RingHeader::default();
        assert!(h.push_batch(&mut buf, 1, 1, &[&[0u8; 64]]).is_err());
        assert_eq!(h.used(), 0);
    }

    #[test]
    fn entries_wrap_around_without_straddling() {
        let mut buf = vec![0u8; 96];
        let mut h = RingHeader::default();
        for round in 0u32..50 {
            let body = vec![round as u8; (round as usize * 7) % 40];
            h.push_batch(&mut buf, round, 1, &[&body]).unwrap();
            let got = drain(&mut h, &buf);
            assert_eq!(got, vec![(round, body)]);
        }
        assert!(h.head > buf.len() as u64, "the test must have wrapped");
    }

    #[test]
    fn fills_exactly_then_frees_space() {
        let mut buf = vec![0u8; 64];
        let mut h = RingHeader::default();
        h.push_batch(&mut buf, 1, 1, &[&[0u8; 16], &[0u8; 16]])
            .unwrap();
        assert_eq!(h.used(), 64);
        assert!(h.push_batch(&mut buf, 2, 1, &[b""]).is_err());
        let e = h.peek(&buf).unwrap();
        let next = e.next;
        h.advance(next);
        h.push_batch(&mut buf, 2, 1, &[&[9u8; 8]]).unwrap();
        let got = drain(&mut h, &buf);
        assert_eq!(got, vec![(1, vec![0u8; 16]), (2, vec![9u8; 8])]);
    }
}
