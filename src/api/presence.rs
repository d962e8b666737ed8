//! Presence from SQL (`sql/presence.sql`): the trigger that tells the worker, through the
//! commit queue, that a topic's SQL-tracked presence changed. Only committed changes reach
//! sockets; a rolled-back `realtime.track` is never seen.

use crate::queue::staging;
use pgrx::prelude::*;

/// `AFTER INSERT OR UPDATE OR DELETE` row trigger on `realtime.presence_tracked`.
#[pg_trigger]
fn queue_presence_sync<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, crate::error::RealtimeError> {
    let datum =
        |e: pgrx::datum::TryFromDatumError| crate::error::RealtimeError::Internal(e.to_string());
    if let Err(e) = crate::queue::guard::require_table(
        trigger,
        "realtime.queue_presence_sync()",
        c"presence_tracked",
    ) {
        e.raise();
    }
    for row in [trigger.old(), trigger.new()].into_iter().flatten() {
        let topic: String = row.get_by_name("topic").map_err(datum)?.unwrap_or_default();
        let private: bool = row.get_by_name("private").map_err(datum)?.unwrap_or(false);
        // Raised here rather than returned: pgrx reports a returned error without its SQLSTATE.
        if let Err(e) = staging::stage_presence_sync(&topic, private) {
            e.raise();
        }
    }
    Ok(None)
}

pgrx::extension_sql_file!(
    "../../sql/presence.sql",
    name = "presence",
    requires = ["schema", queue_presence_sync]
);
