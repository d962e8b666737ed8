//! Partition maintenance: keeps yesterday … today+3 ahead and drops what is older than
//! `realtime.retention`.

use super::transaction;
use crate::gucs;
use pgrx::prelude::*;
use std::time::Duration;

pub fn interval() -> Duration {
    Duration::from_secs(gucs::MAINTENANCE_INTERVAL.get().max(1) as u64)
}

pub fn run() {
    let retention = gucs::RETENTION.get();
    let outcome = transaction::try_spi(move || {
        Spi::run_with_args(
            "SELECT realtime.maintain_partitions(make_interval(secs => $1))",
            &[f64::from(retention).into()],
        )
    });
    if let Err(e) = outcome {
        warning!("pg_realtime: partition maintenance failed: {e}");
    }
}
