//! The Postgres main thread sleeps in WaitLatchOrSocket; an eventfd is the cheapest thing it can
//! add to that wait set to learn that the network side has events for it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub(crate) struct WakeFd {
    fd: OwnedFd,
}

impl WakeFd {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(WakeFd {
            // SAFETY: fd is a freshly created descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the fd readable. Never blocks: with EFD_NONBLOCK a saturated counter returns
    /// EAGAIN, and a saturated counter is readable anyway.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                std::ptr::from_ref::<u64>(&one).cast(),
                8,
            );
        }
    }

    /// Makes the fd unreadable again (until the next `signal`).
    pub(crate) fn reset(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; EAGAIN just means it was not set.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::from_mut::<u64>(&mut value).cast(),
                8,
            );
        }
    }
}

#[cfg(test)]
pub(crate) fn is_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_and_reset() {
        let w = WakeFd::new().unwrap();
        assert!(!is_readable(w.raw()));
        w.signal();
        w.signal();
        assert!(is_readable(w.raw()));
        w.reset();
        assert!(!is_readable(w.raw()));
        w.reset();
        assert!(!is_readable(w.raw()));
    }
}
