//! Which topics somebody on this node has joined, as committers see it: a fixed table of
//! counters in shared memory, one per bucket of topics, that the worker raises when a topic
//! gets its first subscriber and lowers when it loses its last one.
//!
//! A committing backend wakes the worker only when one of its messages falls in a bucket with
//! a count (or when something else needs the worker at once, see the staging code). Messages for
//! topics nobody has joined are taken on the worker's next regular look instead, a few
//! milliseconds later: their offsets and statistics do not need the worker sooner, and under a
//! stream of them the worker wakes a hundred times a second instead of once per commit.
//!
//! Collisions only cost a wake-up that was not needed; a missed count is impossible because
//! the worker raises a bucket before the subscription can receive anything, and a commit that
//! read the count just before it was raised is taken by the worker's next look (as any message
//! published before a join, it then reaches the new subscriber if it was not replayed to it).

use std::sync::atomic::{AtomicU32, Ordering};

/// Buckets in the table (4 KiB of shared memory); a bucket number fits in a `u16`.
pub const BUCKETS: u16 = 1024;

/// The bucket of a topic (`private` channels are a namespace of their own, as in the broker).
/// FNV-1a: it is stable across processes and builds, which a per-process seeded hash is not.
pub fn bucket(private: bool, topic: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in std::iter::once(u8::from(private)).chain(topic.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // The remainder is below BUCKETS, so it fits.
    (hash % u32::from(BUCKETS)) as u16
}

/// The counters themselves; lives in shared memory, zeroed at start.
#[repr(C)]
pub struct WatchedTopics {
    counts: [AtomicU32; BUCKETS as usize],
}

impl Default for WatchedTopics {
    fn default() -> Self {
        WatchedTopics {
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl WatchedTopics {
    /// A topic got its first subscriber (`on`) or lost its last one.
    pub fn set(&self, private: bool, topic: &str, on: bool) {
        let count = &self.counts[usize::from(bucket(private, topic))];
        if on {
            count.fetch_add(1, Ordering::SeqCst);
        } else {
            // Never below zero, even if a start-up reset raced a removal.
            let _ = count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1));
        }
    }

    /// Whether anyone may have joined a topic of `bucket`.
    pub fn is_watched(&self, bucket: u16) -> bool {
        self.counts
            .get(usize::from(bucket))
            .is_some_and(|c| c.load(Ordering::SeqCst) > 0)
    }

    /// Forgets every topic: a new worker starts with no subscribers.
    pub fn clear(&self) {
        for c in &self.counts {
            c.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_watched_from_the_first_subscriber_to_the_last() {
        let w = WatchedTopics::default();
        let room = bucket(false, "room");
        assert!(!w.is_watched(room));
        w.set(false, "room", true);
        w.set(false, "room", true);
        assert!(w.is_watched(room));
        w.set(false, "room", false);
        assert!(
            w.is_watched(room),
            "one topic of the bucket is still joined"
        );
        w.set(false, "room", false);
        assert!(!w.is_watched(room));
        w.set(false, "room", false);
        assert!(!w.is_watched(room), "never below zero");
        w.set(false, "room", true);
        w.clear();
        assert!(!w.is_watched(room));
    }

    #[test]
    fn buckets_are_stable_and_private_topics_are_their_own() {
        // Backends and the worker compute buckets in different processes: the value must not
        // depend on a per-process seed.
        assert_eq!(bucket(false, "room"), bucket(false, "room"));
        assert!(bucket(false, "room") < BUCKETS);
        let differ = (0..64)
            .filter(|i| bucket(true, &format!("t{i}")) != bucket(false, &format!("t{i}")))
            .count();
        assert!(
            differ > 48,
            "{differ} of 64 topics differ between namespaces"
        );
        // Spread: 10,000 topics touch most buckets.
        let mut seen = [false; BUCKETS as usize];
        for i in 0..10_000 {
            seen[usize::from(bucket(false, &format!("user:{i}")))] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > usize::from(BUCKETS) * 9 / 10);
        assert!(
            !WatchedTopics::default().is_watched(BUCKETS),
            "out of range is unwatched"
        );
    }
}
