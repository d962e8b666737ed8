//! Stored client broadcasts (`persist`), on the worker's main thread.
//!
//! The requests that wait in one turn of the main loop share one transaction. Each whose
//! persistence right is not known yet is checked first, as a write check is: a probe row with
//! `extension = 'persistence'` through the user's INSERT policies, under the token's role and
//! claims (`realtime._authorize_writes`), in a subtransaction that is rolled back. Each allowed
//! message is then inserted, as the owner, in a subtransaction of its own, so that a row a
//! trigger or constraint refuses fails alone. The transaction commits; the rows reach the
//! commit queue through the table's trigger and are delivered by the normal drain. Every
//! request is answered, stored or not, after the commit.

use super::{authorization, transaction};
use pgrx::prelude::*;
use realtime_server::{
    AuthorizationPurpose, AuthorizationRequest, Payload, PersistError, PersistRequest, Refusal,
};
use std::time::Duration;

/// The persistence check and the insert of one message may each take this long.
const ITEM_TIMEOUT: Duration = Duration::from_secs(5);
/// The extension the persistence probe row carries.
const PERSISTENCE: &str = "persistence";

/// Every operator and function is qualified: the statement runs under the search_path the
/// users' triggers expect, which is not the worker's to trust.
const INSERT: &str = "INSERT INTO realtime.messages \
       (topic, extension, event, payload, binary_payload, private, expires_at) \
     VALUES ($1, 'broadcast', $2, CAST($3 AS pg_catalog.jsonb), $4, true, \
       pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $5)) \
     RETURNING id::text";

/// Stores the messages of `requests` (a standby refuses them all: it cannot write).
pub fn store_all(requests: &[PersistRequest], standby: bool) -> Vec<Result<String, PersistError>> {
    if standby {
        return requests
            .iter()
            .map(|_| Err(PersistError::Standby))
            .collect();
    }
    if requests.is_empty() {
        return Vec::new();
    }
    let stored = transaction::try_run(ITEM_TIMEOUT, || {
        // Only channels whose persistence right is not known yet are checked: a cached right
        // costs no subtransaction.
        let unchecked: Vec<&PersistRequest> = requests.iter().filter(|r| r.check).collect();
        let mut checks =
            transaction::each_rolled_back(Some(ITEM_TIMEOUT), &unchecked, |r| Ok(allowed(r)))
                .into_iter();
        let verdicts: Vec<Result<(), PersistError>> = requests
            .iter()
            .map(|r| {
                if !r.check {
                    return Ok(());
                }
                checks
                    .next()
                    .unwrap_or_else(|| Ok(Err(PersistError::Policy("not checked".into()))))
                    .unwrap_or_else(|e| Err(PersistError::Policy(e)))
            })
            .collect();
        // The inserts run with the search_path sessions get, as the users' triggers expect.
        authorization::set_policy_search_path_local();
        let allowed: Vec<&PersistRequest> = requests
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_ok())
            .map(|(r, _)| r)
            .collect();
        let mut inserted =
            transaction::each_kept(ITEM_TIMEOUT, &allowed, |r| insert(r)).into_iter();
        verdicts
            .into_iter()
            .map(|verdict| {
                verdict?;
                inserted
                    .next()
                    .unwrap_or_else(|| Err("not inserted".to_string()))
                    .map_err(PersistError::StoreFailed)
            })
            .collect::<Vec<_>>()
    });
    match stored {
        Ok(answers) => answers,
        // The commit failed (the commit queue is full, say): nothing was stored.
        Err(e) => {
            log!(
                "pg_realtime: storing {} messages failed: {e}",
                requests.len()
            );
            requests
                .iter()
                .map(|_| Err(PersistError::StoreFailed(e.clone())))
                .collect()
        }
    }
}

/// The persistence right, checked as the write checks are (realtime._authorize_writes).
fn allowed(r: &PersistRequest) -> Result<(), PersistError> {
    let request = AuthorizationRequest {
        id: r.id,
        subtopic: r.subtopic.clone(),
        claims: r.claims.clone(),
        headers_json: r.headers_json.clone(),
        presence: false,
        purpose: AuthorizationPurpose::Write,
        replay: None,
        private: true,
    };
    authorization::require_allowed_role(&r.claims.role).map_err(|e| match e {
        Refusal::RoleNotAllowed(why) | Refusal::Policy(why) => PersistError::Policy(why),
        other => PersistError::Policy(other.to_string()),
    })?;
    authorization::set_policy_search_path_local();
    let verdicts =
        authorization::write_checks(&request, &[PERSISTENCE]).map_err(PersistError::Policy)?;
    if verdicts
        .iter()
        .any(|(e, ok)| e.as_deref() == Some(PERSISTENCE) && *ok)
    {
        Ok(())
    } else {
        Err(PersistError::Denied {
            subtopic: r.subtopic.clone(),
        })
    }
}

/// Inserts one message as the owner; its id.
fn insert(r: &PersistRequest) -> Result<String, String> {
    let (json, binary): (Option<String>, Option<Vec<u8>>) = match &r.payload {
        Payload::Json(b) => (
            Some(String::from_utf8(b.to_vec()).map_err(|_| "the payload is not UTF-8")?),
            None,
        ),
        Payload::Binary(b) => (None, Some(b.to_vec())),
    };
    // PostgreSQL text cannot hold a NUL (a binary payload may).
    if r.event.contains('\0') || json.as_deref().is_some_and(|j| j.contains('\0')) {
        return Err("the event or payload contains a NUL character".into());
    }
    let ttl: Option<f64> = r.ttl_seconds.map(|t| t as f64);
    Spi::get_one_with_args::<String>(
        INSERT,
        &[
            r.subtopic.as_str().into(),
            r.event.as_str().into(),
            json.into(),
            binary.into(),
            ttl.into(),
        ],
    )
    .map_err(|e| e.to_string())?
    .ok_or_else(|| "the stored row got no id".to_string())
}
