//! The bounded per-connection outbound queue. Producers (fan-out, replies) never wait: a frame
//! that does not fit marks the connection as a slow consumer, and its task closes it. The
//! queue is bounded in frames and in bytes, since one frame may be megabytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::broadcast::Frame;

pub(crate) struct ConnHandle {
    tx: mpsc::Sender<Frame>,
    /// Bytes of the frames queued and not yet taken by the connection's task.
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    overflowed: AtomicBool,
    overflow: Notify,
}

/// The connection task's end of the queue.
pub(crate) struct Outbound {
    rx: mpsc::Receiver<Frame>,
    bytes: Arc<AtomicUsize>,
}

impl Outbound {
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

impl ConnHandle {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> (ConnHandle, Outbound) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        (
            ConnHandle {
                tx,
                bytes: bytes.clone(),
                max_bytes: max_bytes.max(1),
                overflowed: AtomicBool::new(false),
                overflow: Notify::new(),
            },
            Outbound { rx, bytes },
        )
    }

    /// Queues a frame; returns false if it was not queued.
    pub(crate) fn push(&self, frame: Frame) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let size = frame.len();
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        // One frame larger than the whole bound still goes into an empty queue: it was
        // accepted by the frame limits, and refusing it would close a reader that keeps up.
        if before > 0 && before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            self.mark_slow();
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                self.mark_slow();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                false
            }
        }
    }

    /// Closes the connection as a slow consumer (at most one signal).
    pub(crate) fn mark_slow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            // notify_one stores a permit, so the connection task sees it even if it is
            // busy right now.
            self.overflow.notify_one();
        }
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    pub(crate) async fn overflowed(&self) {
        self.overflow.notified().await
    }

    /// Bytes queued and not yet taken by the connection's task (for [`crate::Usage`]).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Frame {
    pub(crate) fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_signalled_once_and_sticks() {
        let (h, mut rx) = ConnHandle::new(2, 1 << 20);
        assert!(h.push(Frame::Text("a".into())));
        assert!(h.push(Frame::Text("b".into())));
        assert!(!h.push(Frame::Text("c".into())));
        h.overflowed().await;
        assert!(rx.recv().await.is_some());
        // Once a slow consumer, always one: the connection is about to be closed.
        assert!(!h.push(Frame::Text("d".into())));
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_too() {
        let (h, mut rx) = ConnHandle::new(100, 10);
        assert!(h.push(Frame::Text("123456".into())));
        assert!(h.push(Frame::Text("1234".into())));
        assert_eq!(h.queued_bytes(), 10);
        assert!(rx.recv().await.is_some());
        assert_eq!(h.queued_bytes(), 4);
        assert!(h.push(Frame::Text("123456".into())));
        assert!(!h.push(Frame::Text("x".into())), "11 bytes > 10");
        h.overflowed().await;
        assert!(rx.try_recv().is_some() && rx.try_recv().is_some());
        assert_eq!(h.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn one_large_frame_fits_an_empty_queue() {
        let (h, _rx) = ConnHandle::new(100, 10);
        assert!(h.push(Frame::Text("0123456789abc".into())));
        assert!(!h.push(Frame::Text("x".into())));
    }
}
