//! Log records from the network threads reach the server log through the main thread.
//!
//! Only the main thread may call `ereport`, so the `log` facade's records are queued here and
//! written by [`flush`] each time the main loop wakes up (at least once a second).

use pgrx::prelude::*;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Records kept while the main thread is busy; older ones are dropped and counted.
const CAPACITY: usize = 1000;

struct Queue {
    records: VecDeque<(::log::Level, String)>,
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    records: VecDeque::new(),
    dropped: 0,
});

struct Forwarder;

impl ::log::Log for Forwarder {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        metadata.level() <= ::log::Level::Info
    }

    fn log(&self, record: &::log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Ok(mut queue) = QUEUE.lock() else { return };
        if queue.records.len() >= CAPACITY {
            queue.records.pop_front();
            queue.dropped += 1;
        }
        queue
            .records
            .push_back((record.level(), format!("pg_realtime: {}", record.args())));
    }

    fn flush(&self) {}
}

static FORWARDER: Forwarder = Forwarder;

pub fn install() {
    if ::log::set_logger(&FORWARDER).is_ok() {
        ::log::set_max_level(::log::LevelFilter::Info);
    }
}

/// Writes queued records to the server log. Main thread only.
pub fn flush() {
    let (records, dropped) = match QUEUE.lock() {
        Ok(mut queue) => (
            std::mem::take(&mut queue.records),
            std::mem::take(&mut queue.dropped),
        ),
        Err(_) => return,
    };
    if dropped > 0 {
        warning!("pg_realtime: {dropped} log records from the network threads were dropped");
    }
    for (level, message) in records {
        match level {
            ::log::Level::Error | ::log::Level::Warn => warning!("{message}"),
            _ => log!("{message}"),
        }
    }
}
