//! The bounded per-connection outbound queue. Producers (fan-out, replies) never wait: a frame
//! that does not fit marks the connection as a slow consumer, and its task closes it.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::broadcast::Frame;

pub(crate) struct ConnHandle {
    tx: mpsc::Sender<Frame>,
    overflowed: AtomicBool,
    overflow: Notify,
}

impl ConnHandle {
    pub(crate) fn new(capacity: usize) -> (ConnHandle, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            ConnHandle {
                tx,
                overflowed: AtomicBool::new(false),
                overflow: Notify::new(),
            },
            rx,
        )
    }

    /// Queues a frame; returns false if it was not queued.
    pub(crate) fn push(&self, frame: Frame) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::AcqRel) {
                    // notify_one stores a permit, so the connection task sees it even if it is
                    // busy right now.
                    self.overflow.notify_one();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub(crate) async fn overflowed(&self) {
        self.overflow.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_signalled_once_and_sticks() {
        let (h, mut rx) = ConnHandle::new(2);
        assert!(h.push(Frame::Text("a".into())));
        assert!(h.push(Frame::Text("b".into())));
        assert!(!h.push(Frame::Text("c".into())));
        h.overflowed().await;
        assert!(rx.recv().await.is_some());
        // Once a slow consumer, always one: the connection is about to be closed.
        assert!(!h.push(Frame::Text("d".into())));
    }
}
