//! The extension's trigger functions fire only on the tables they were written for.
//!
//! PostgreSQL checks EXECUTE on a trigger function when a trigger is created, not when it
//! fires, and the functions trust the layout of the rows they read. So besides being revoked
//! from PUBLIC, each one checks the relation it fired on: `realtime.<table>` itself or one of
//! its partitions, never a look-alike table someone attached it to.

use crate::error::RealtimeError;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::CStr;

// catalog/partition.h is not in pgrx's bindings. Raises only when a partition has no parent,
// so it is called through pgrx's guard, which turns that ERROR into a Rust unwind.
unsafe extern "C-unwind" {
    fn get_partition_parent(relid: pg_sys::Oid, even_if_detached: bool) -> pg_sys::Oid;
}

thread_local! {
    /// Relations already found to be partitions of an extension table: the partition check
    /// reads pg_inherits, the namespace check below is a cheap syscache hit.
    static PARTITIONS: RefCell<HashSet<pg_sys::Oid>> = RefCell::new(HashSet::new());
    /// `realtime_table` as last looked up, per table: the two catalog lookups were an eighth
    /// of the trigger's time on every row. An entry is a guess only, checked against the
    /// relation at every row, and looked up again when it does not fit (the extension was
    /// dropped and created again).
    static LOOKED_UP: RefCell<Vec<(&'static CStr, (pg_sys::Oid, pg_sys::Oid))>> =
        const { RefCell::new(Vec::new()) };
}

/// The OIDs of schema `realtime` and of `realtime.<table>`, or None if either is missing.
fn realtime_table(table: &CStr) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: a catalog lookup with missing_ok, inside the trigger's transaction.
    let schema = unsafe { pg_sys::get_namespace_oid(c"realtime".as_ptr(), true) };
    if schema == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: a syscache lookup; table is NUL-terminated.
    let relid = unsafe { pg_sys::get_relname_relid(table.as_ptr(), schema) };
    (relid != pg_sys::InvalidOid).then_some((schema, relid))
}

/// Whether `relid` is a partition (at any depth) of `root`.
fn is_partition_of(relid: pg_sys::Oid, root: pg_sys::Oid) -> bool {
    if PARTITIONS.with_borrow(|known| known.contains(&relid)) {
        return true;
    }
    let mut current = relid;
    // Partition trees of realtime.messages are one level deep; the bound only guards the loop.
    for _ in 0..8 {
        // SAFETY: a syscache lookup that returns false for a missing relation.
        if !unsafe { pg_sys::get_rel_relispartition(current) } {
            return false;
        }
        current =
            // SAFETY: current is a partition (checked above); an ERROR is turned into a Rust panic
            // by the guard.
            unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| get_partition_parent(current, true)) };
        if current == root {
            PARTITIONS.with_borrow_mut(|known| known.insert(relid));
            return true;
        }
    }
    false
}

/// Returns the OID of `realtime.<table>` when `trigger` (running `function`) fired on it or on
/// one of its partitions; otherwise the trigger-protocol error naming both relations.
pub fn require_table(
    trigger: &PgTrigger<'_>,
    function: &'static str,
    table: &'static CStr,
) -> Result<pg_sys::Oid, RealtimeError> {
    let relation = trigger
        .relation()
        .map_err(|e| RealtimeError::Internal(e.to_string()))?;
    let relid = relation.oid();
    // The table itself (in the schema, by its name: an OID alone could have been reused), or
    // one of its partitions.
    let fits = |(schema, expected): (pg_sys::Oid, pg_sys::Oid)| {
        relation.namespace_oid() == schema
            && ((relid == expected && relation.name().as_bytes() == table.to_bytes())
                || is_partition_of(relid, expected))
    };
    let remembered = LOOKED_UP.with_borrow(|known| {
        known
            .iter()
            .find(|(name, _)| *name == table)
            .map(|(_, oids)| *oids)
    });
    if let Some(oids) = remembered
        && fits(oids)
    {
        return Ok(oids.1);
    }
    if let Some(oids) = realtime_table(table) {
        LOOKED_UP.with_borrow_mut(|known| {
            known.retain(|(name, _)| *name != table);
            known.push((table, oids));
        });
        if fits(oids) {
            return Ok(oids.1);
        }
    }
    Err(RealtimeError::WrongTriggerTable {
        function,
        table: table.to_string_lossy().into_owned(),
        relation: relation.name().to_string(),
    })
}
