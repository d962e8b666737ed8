//! Postgres delivers its signals (SIGHUP, SIGTERM, SIGUSR1 for latches, ...) to the process and
//! expects its main thread to handle them. A network thread that picked one up would run a
//! Postgres signal handler on the wrong thread, so every thread this crate creates blocks them all.

/// Blocks every signal on the calling thread.
pub(crate) fn block_all_signals() {
    // SAFETY: sigfillset/pthread_sigmask only write the local set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Blocks every signal on the current thread until dropped, so threads spawned meanwhile
/// inherit a fully blocked mask from their very first instruction.
pub(crate) struct BlockedSignals {
    previous: libc::sigset_t,
}

impl BlockedSignals {
    pub(crate) fn new() -> Self {
        // SAFETY: as above; `previous` receives the old mask so it can be restored.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
            BlockedSignals { previous }
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new` on the same thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigterm_blocked() -> bool {
        // SAFETY: a null new set only reads this thread's mask into a local, zeroed sigset_t.
        unsafe {
            let mut current: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current);
            libc::sigismember(&current, libc::SIGTERM) == 1
        }
    }

    #[test]
    fn guard_blocks_then_restores() {
        std::thread::spawn(|| {
            assert!(!sigterm_blocked());
            {
                let _guard = BlockedSignals::new();
                assert!(sigterm_blocked());
                let inherited = std::thread::spawn(sigterm_blocked).join().unwrap();
                assert!(
                    inherited,
                    "threads spawned under the guard inherit the mask"
                );
            }
            assert!(!sigterm_blocked());
            block_all_signals();
            assert!(sigterm_blocked());
        })
        .join()
        .unwrap();
    }
}
