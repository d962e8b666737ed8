//! The bounded per-connection outbound queue. Producers (fan-out, replies) never wait: a frame
//! that does not fit marks the connection as a slow consumer, and its task closes it. The
//! queue is bounded in frames and in bytes, since one frame may be megabytes.
//!
//! Most connections are idle most of the time, so an empty queue holds no memory: a tokio
//! channel allocates a block of 32 slots (1.3 KiB of frames) and its 512-byte state up front;
//! this queue allocates when a frame arrives and frees it all once drained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::broadcast::Frame;

pub(crate) struct ConnHandle {
    queue: Arc<Queue>,
    max_bytes: usize,
    overflowed: AtomicBool,
    overflow: Notify,
}

/// What the handle and the connection task's end share.
struct Queue {
    frames: Mutex<Frames>,
    /// Bytes of the frames queued and not yet taken by the connection's task.
    bytes: AtomicUsize,
    /// Most frames queued at once.
    capacity: usize,
    /// Wakes the connection's task when the queue stops being empty.
    ready: Notify,
}

#[derive(Default)]
struct Frames {
    queue: VecDeque<Frame>,
    /// The handle is gone: nothing more will come.
    sender_gone: bool,
    /// The connection's task is gone: nothing more is taken.
    receiver_gone: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self) -> Result<Frame, bool> {
        let mut frames = self.lock();
        let Some(frame) = frames.queue.pop_front() else {
            return Err(frames.sender_gone);
        };
        // Drained: an idle connection holds nothing. The next frame allocates again, which
        // costs little next to the write that drained this one.
        if frames.queue.is_empty() {
            frames.queue = VecDeque::new();
        }
        drop(frames);
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Ok(frame)
    }
}

/// The connection task's end of the queue.
pub(crate) struct Outbound {
    queue: Arc<Queue>,
}

impl Outbound {
    /// The next frame; None once the handle is gone and the queue drained. Cancel safe: a
    /// frame is taken only when returned, and a wake-up a dropped call received passes on.
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        loop {
            match self.queue.pop() {
                Ok(frame) => return Some(frame),
                Err(true) => return None,
                // A frame queued after the check stored a permit, so this does not miss it.
                Err(false) => self.queue.ready.notified().await,
            }
        }
    }

    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        self.queue.pop().ok()
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let mut frames = self.queue.lock();
        frames.receiver_gone = true;
        let dropped: usize = frames.queue.drain(..).map(|f| f.len()).sum();
        frames.queue = VecDeque::new();
        drop(frames);
        self.queue.bytes.fetch_sub(dropped, Ordering::AcqRel);
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.queue.lock().sender_gone = true;
        self.queue.ready.notify_one();
    }
}

impl ConnHandle {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> (ConnHandle, Outbound) {
        let queue = Arc::new(Queue {
            frames: Mutex::new(Frames::default()),
            bytes: AtomicUsize::new(0),
            capacity: capacity.max(1),
            ready: Notify::new(),
        });
        (
            ConnHandle {
                queue: queue.clone(),
                max_bytes: max_bytes.max(1),
                overflowed: AtomicBool::new(false),
                overflow: Notify::new(),
            },
            Outbound { queue },
        )
    }

    /// Queues a frame; returns false if it was not queued.
    pub(crate) fn push(&self, frame: Frame) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let size = frame.len();
        let bytes = &self.queue.bytes;
        let before = bytes.fetch_add(size, Ordering::AcqRel);
        // One frame larger than the whole bound still goes into an empty queue: it was
        // accepted by the frame limits, and refusing it would close a reader that keeps up.
        if before > 0 && before + size > self.max_bytes {
            bytes.fetch_sub(size, Ordering::AcqRel);
            self.mark_slow();
            return false;
        }
        let mut frames = self.queue.lock();
        if frames.receiver_gone {
            drop(frames);
            bytes.fetch_sub(size, Ordering::AcqRel);
            return false;
        }
        if frames.queue.len() >= self.queue.capacity {
            drop(frames);
            bytes.fetch_sub(size, Ordering::AcqRel);
            self.mark_slow();
            return false;
        }
        let was_empty = frames.queue.is_empty();
        frames.queue.push_back(frame);
        drop(frames);
        // The task waits only after finding the queue empty, under the same lock: a frame
        // into a non-empty queue will be found without a wake-up.
        if was_empty {
            self.queue.ready.notify_one();
        }
        true
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
        self.queue.bytes.load(Ordering::Acquire)
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
    async fn a_drained_burst_gives_its_memory_back() {
        let (h, mut rx) = ConnHandle::new(1024, 1 << 20);
        for _ in 0..100 {
            assert!(h.push(Frame::Text("x".into())));
        }
        assert!(h.queue.lock().queue.capacity() >= 100);
        while rx.try_recv().is_some() {}
        assert_eq!(h.queue.lock().queue.capacity(), 0);
        assert!(h.push(Frame::Text("y".into())));
        assert!(rx.recv().await.is_some());
        assert_eq!(h.queue.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_and_ends_with_the_handle() {
        let (h, mut rx) = ConnHandle::new(8, 1 << 20);
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await.is_some();
            let end = rx.recv().await.is_none();
            first && end
        });
        tokio::task::yield_now().await;
        assert!(h.push(Frame::Text("a".into())));
        drop(h);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn nothing_is_queued_once_the_task_is_gone() {
        let (h, rx) = ConnHandle::new(8, 1 << 20);
        assert!(h.push(Frame::Text("a".into())));
        drop(rx);
        assert_eq!(h.queued_bytes(), 0);
        assert!(!h.push(Frame::Text("b".into())));
        assert!(!h.is_slow(), "a gone connection is not a slow one");
    }

    #[tokio::test]
    async fn one_large_frame_fits_an_empty_queue() {
        let (h, _rx) = ConnHandle::new(100, 10);
        assert!(h.push(Frame::Text("0123456789abc".into())));
        assert!(!h.push(Frame::Text("x".into())));
    }
}
