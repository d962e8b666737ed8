//! The SQL side of presence, on the worker's main thread: mirrors socket presence into
//! `realtime.presence_sockets`, feeds presence tracked from SQL (`realtime.presence_tracked`)
//! to the sockets, and expires entries whose ttl ran out.

use super::transaction;
use pgrx::prelude::*;
use realtime_server::{PresenceChange, Server};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// The mirror and expiry run on the worker's main thread between deliveries: a row lock held
/// by someone's open transaction must not hold them (and delivery) for long.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sockets do not outlive the worker, so neither does their mirror.
pub fn forget_sockets() {
    if let Err(e) = transaction::try_spi(PRESENCE_TIMEOUT, || {
        Spi::run("TRUNCATE realtime.presence_sockets")
    }) {
        log!("pg_realtime: cannot empty realtime.presence_sockets: {e}");
    }
}

/// Hands every topic's SQL-tracked presence to a freshly started server.
pub fn load_all(server: &Server) {
    let topics = transaction::try_spi(PRESENCE_TIMEOUT, || {
        Spi::connect(|client| {
            let mut topics = BTreeSet::new();
            let rows = client.select(
                "SELECT DISTINCT topic, private FROM realtime.presence_tracked",
                None,
                &[],
            )?;
            for row in rows {
                if let (Some(topic), Some(private)) = (row.get::<String>(1)?, row.get::<bool>(2)?) {
                    topics.insert((topic, private));
                }
            }
            Ok(topics)
        })
    });
    match topics {
        Ok(topics) => sync(server, topics),
        Err(e) => log!("pg_realtime: cannot load SQL presence: {e}"),
    }
}

/// Re-reads the SQL-tracked presence of each (topic, private) and gives it to the server,
/// which tells subscribers what changed.
pub fn sync(server: &Server, topics: BTreeSet<(String, bool)>) {
    if topics.is_empty() {
        return;
    }
    let members = transaction::try_spi(PRESENCE_TIMEOUT, || {
        Spi::connect(|client| {
            let mut out = Vec::new();
            for (topic, private) in &topics {
                let rows = client.select(
                    "SELECT key, payload::text FROM realtime.presence_tracked
                      WHERE topic = $1 AND private = $2
                        AND (expires_at IS NULL OR expires_at > now())",
                    None,
                    &[topic.as_str().into(), (*private).into()],
                )?;
                let mut members = Vec::new();
                for row in rows {
                    if let (Some(key), Some(meta)) = (row.get::<String>(1)?, row.get::<String>(2)?)
                    {
                        members.push((key, meta));
                    }
                }
                out.push((topic.clone(), *private, members));
            }
            Ok(out)
        })
    });
    match members {
        Ok(all) => {
            for (topic, private, members) in all {
                server.sync_sql_presence(&topic, private, members);
            }
        }
        Err(e) => log!("pg_realtime: cannot read SQL presence: {e}"),
    }
}

/// Applies a batch of socket presence changes to the mirror: the last change per channel wins,
/// then one upsert and one delete.
pub fn mirror(changes: Vec<PresenceChange>) {
    if changes.is_empty() {
        return;
    }
    let mut last: HashMap<u64, PresenceChange> = HashMap::new();
    for change in changes {
        let owner = match &change {
            PresenceChange::Tracked { owner, .. } | PresenceChange::Untracked { owner, .. } => {
                *owner
            }
        };
        last.insert(owner, change);
    }
    let (mut ids, mut topics, mut privates, mut keys, mut refs, mut metas) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut gone: Vec<i64> = vec![];
    for change in last.into_values() {
        match change {
            PresenceChange::Tracked {
                topic,
                private,
                key,
                owner,
                phx_ref,
                meta_json,
                ..
            } => {
                // PostgreSQL text and jsonb cannot hold NUL: one such member must not fail the
                // whole batch (everyone else's changes), so it is left out of the mirror.
                if [&topic, &key, &phx_ref].iter().any(|t| t.contains('\0'))
                    || meta_json.contains("\\u0000")
                {
                    gone.push(owner as i64);
                    continue;
                }
                ids.push(owner as i64);
                topics.push(topic);
                privates.push(private);
                keys.push(key);
                refs.push(phx_ref);
                metas.push(meta_json);
            }
            PresenceChange::Untracked { owner, .. } => gone.push(owner as i64),
        }
    }
    let result = transaction::try_spi(PRESENCE_TIMEOUT, move || -> Result<(), spi::SpiError> {
        if !gone.is_empty() {
            Spi::run_with_args(
                "DELETE FROM realtime.presence_sockets WHERE connection_id = ANY ($1)",
                &[gone.into()],
            )?;
        }
        if !ids.is_empty() {
            Spi::run_with_args(
                "INSERT INTO realtime.presence_sockets
                        (connection_id, topic, private, key, presence_ref, payload)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::text[],
                                      $5::text[], $6::jsonb[])
                 ON CONFLICT (connection_id) DO UPDATE
                    SET key = excluded.key, presence_ref = excluded.presence_ref,
                        payload = excluded.payload, updated_at = now()",
                &[
                    ids.into(),
                    topics.into(),
                    privates.into(),
                    keys.into(),
                    refs.into(),
                    metas.into(),
                ],
            )?;
        }
        Ok(())
    });
    if let Err(e) = result {
        log!("pg_realtime: cannot mirror socket presence: {e}");
    }
}

/// Removes SQL presence whose ttl ran out; the trigger queues the resulting leaves. Returns
/// the error, if any, for the caller to judge (the extension may have been dropped).
pub fn expire() -> Result<(), String> {
    transaction::try_spi(PRESENCE_TIMEOUT, || {
        Spi::run("SELECT realtime._expire_presence()")
    })
}
