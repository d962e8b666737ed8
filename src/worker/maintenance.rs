//! Partition maintenance: keeps yesterday … today+3 ahead and drops what is older than
//! `realtime.retention`.

use super::transaction;
use crate::gucs;
use pgrx::prelude::*;
use std::time::Duration;

/// Creating or dropping a partition locks `realtime.messages`; with the worker's lock timeout a
/// round that meets a long reader (a dump, an idle transaction) gives up instead of making
/// every send wait, and this bounds the rest of the round.
const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon a round that failed is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);

pub fn interval() -> Duration {
    gucs::maintenance_interval()
}

/// Runs one round; returns how long until the next one.
pub fn run() -> Duration {
    let retention = gucs::retention().as_secs_f64();
    let outcome = transaction::try_spi(MAINTENANCE_TIMEOUT, move || {
        Spi::run_with_args(
            "SELECT realtime.maintain_partitions(make_interval(secs => $1))",
            &[retention.into()],
        )
    });
    match outcome {
        Ok(()) => interval(),
        Err(e) => {
            warning!("pg_realtime: partition maintenance failed (trying again soon): {e}");
            interval().min(RETRY_AFTER)
        }
    }
}
