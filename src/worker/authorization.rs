//! RLS authorization of private channels, on the worker's main thread.
//!
//! As Supabase does, the user's own policies on `realtime.messages` decide: probe rows are
//! read (SELECT policies) and inserted (INSERT policies) under the client's role and claims,
//! in a transaction that is always rolled back, so nothing is stored. Requests that arrive
//! together share one transaction, each in its own subtransaction. The read checks' statements
//! are below; the write checks are `realtime._authorize_writes` (sql/api.sql). Topics and
//! claims are parameters, never SQL text.

use super::transaction::{self, KeptPlan, with_plan};
use pgrx::PgOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use realtime_server::offset::Offset;
use realtime_server::{
    Authorization, AuthorizationPurpose, AuthorizationRequest, Claims, Payload, Refusal, Replay,
    ReplayFrom, ReplayGap, ReplayParams, Replayed,
};

const BROADCAST: &str = "broadcast";
const PRESENCE: &str = "presence";
/// A policy that runs longer than this fails the check instead of stalling the worker.
const AUTHORIZATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes of payload one replay holds at most (`realtime.replay_limit` bounds the count): past
/// it, the oldest messages are left out and the client is told.
const REPLAY_BYTES: usize = 16 * 1024 * 1024;

/// The rights on a public channel: no policy applies.
pub const PUBLIC: Authorization = Authorization {
    broadcast_read: true,
    broadcast_write: true,
    presence_read: true,
    presence_write: true,
};

/// The search_path the worker's session had before it pinned its own to `pg_catalog`: the
/// users' policies run under it, as they did before.
static POLICY_SEARCH_PATH: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

pub fn set_policy_search_path(path: String) {
    let path = std::ffi::CString::new(path).unwrap_or_default();
    let _ = POLICY_SEARCH_PATH.set(path);
}

pub(crate) fn set_policy_search_path_local() {
    if let Some(path) = POLICY_SEARCH_PATH.get() {
        crate::gucs::set_local(c"search_path", path);
    }
}

/// PostgREST's rule for the roles a token may become: an existing role, never a superuser
/// (`none` would even reset to the worker's own superuser session), and, when
/// `realtime.authenticator` is set, only a role granted to it. Checked before any of the
/// token's settings are made.
pub(crate) fn require_allowed_role(role: &str) -> Result<(), Refusal> {
    let shown: String = role.chars().take(64).collect();
    if role.is_empty() || role.eq_ignore_ascii_case("none") {
        return Err(Refusal::RoleNotAllowed(format!(
            "a token's role must name a database role, not \"{shown}\""
        )));
    }
    let name = std::ffi::CString::new(role)
        .map_err(|_| Refusal::RoleNotAllowed("the token's role contains a NUL byte".to_string()))?;
    // SAFETY: a catalog lookup with missing_ok, inside the authorization transaction; name is
    // NUL-terminated.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return Err(Refusal::RoleNotAllowed(format!(
            "role \"{shown}\" does not exist"
        )));
    }
    // SAFETY: a syscache lookup of a role that exists.
    if unsafe { pg_sys::superuser_arg(oid) } {
        return Err(Refusal::RoleNotAllowed(format!(
            "role \"{shown}\" is a superuser; a token may not become one"
        )));
    }
    if let Some(authenticator) = crate::gucs::authenticator() {
        let granted = std::ffi::CString::new(authenticator.as_str())
            // SAFETY: as above.
            .map(|a| unsafe { pg_sys::get_role_oid(a.as_ptr(), true) })
            .is_ok_and(|a| {
                // SAFETY: both roles exist; membership is read from the catalog.
                a != pg_sys::InvalidOid && unsafe { pg_sys::is_member_of_role_nosuper(a, oid) }
            });
        if !granted {
            return Err(Refusal::RoleNotAllowed(format!(
                "role \"{shown}\" is not granted to \"{authenticator}\" (realtime.authenticator)"
            )));
        }
    }
    Ok(())
}

thread_local! {
    /// Parsed and planned once per worker: authorization is the hot path of private joins.
    static WRITE_CHECK_PLAN: KeptPlan = const { KeptPlan::new() };
    static PROBE_INSERT_PLAN: KeptPlan = const { KeptPlan::new() };
    static PROBE_READ_PLAN: KeptPlan = const { KeptPlan::new() };
}

const WRITE_CHECK: &str = "SELECT extension, can_write \
     FROM realtime._authorize_writes($1, $2, $3, $4, $5, $6)";
/// A probe row per extension, inserted as the owner (no policy applies to it).
const PROBE_INSERT: &str = "INSERT INTO realtime.messages (topic, extension, inserted_at, updated_at) \
     VALUES ($1, $2, pg_catalog.now(), pg_catalog.now()) RETURNING id";
/// Whether the probe is visible through the SELECT policies. `inserted_at` pins the probe's
/// partition and, with `id`, its primary key: without it the planner may scan the partition,
/// which fills with the dead rows of earlier checks.
/// Its operators are qualified: it runs under the policies' search_path, which is not the
/// worker's to trust.
const PROBE_READ: &str = "SELECT 1 FROM realtime.messages AS m \
     WHERE m.id OPERATOR(pg_catalog.=) $1 \
       AND m.inserted_at OPERATOR(pg_catalog.=) pg_catalog.now()";

/// `SET LOCAL` of one of the token's settings; a bad value (a role that does not exist)
/// raises, which fails this check alone.
fn set_local(name: &std::ffi::CStr, value: &str) -> Result<(), String> {
    let value = std::ffi::CString::new(value).map_err(|_| {
        format!(
            "{} contains a NUL byte",
            if name == c"realtime.topic" {
                "the topic"
            } else {
                "a claim"
            }
        )
    })?;
    crate::gucs::set_local(name, &value);
    Ok(())
}

/// The read checks of a join or token refresh, straight from Rust (this is the hot path of
/// private joins): a probe row per extension inserted as the owner, the settings Supabase sets
/// for the token, and the probe read back through the SELECT policies. Inside a
/// (sub)transaction that is rolled back.
fn read_checks(request: &AuthorizationRequest, read: &[&str]) -> Result<Vec<Verdict>, String> {
    let error = |e: spi::SpiError| e.to_string();
    let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
    let uuid = PgOid::BuiltIn(pg_sys::BuiltinOid::UUIDOID);
    Spi::connect(|client| {
        let mut probes = Vec::with_capacity(read.len());
        for extension in read {
            let id = with_plan(
                &PROBE_INSERT_PLAN,
                client,
                PROBE_INSERT,
                &[text, text],
                |plan| {
                    let rows = client
                        .select(
                            plan,
                            None,
                            &[request.subtopic.as_str().into(), (*extension).into()],
                        )
                        .map_err(error)?;
                    let row = rows.into_iter().next();
                    row.and_then(|r| r.get::<pgrx::Uuid>(1).transpose())
                        .transpose()
                        .map_err(error)?
                        .ok_or_else(|| "the probe row got no id".to_string())
                },
            )?;
            probes.push(id);
        }
        set_local(c"realtime.topic", &request.subtopic)?;
        set_local(c"request.jwt.claims", &request.claims.json)?;
        set_local(
            c"request.jwt.claim.sub",
            request.claims.sub.as_deref().unwrap_or(""),
        )?;
        set_local(c"request.jwt.claim.role", &request.claims.role)?;
        set_local(c"request.headers", &request.headers_json)?;
        // The role last: until then the worker is the superuser it connected as, so the
        // settings above are made with superuser rights.
        set_local(c"role", &request.claims.role)?;
        let mut verdicts = Vec::with_capacity(read.len());
        for (extension, id) in read.iter().zip(probes) {
            let visible = with_plan(&PROBE_READ_PLAN, client, PROBE_READ, &[uuid], |plan| {
                let rows = client.select(plan, None, &[id.into()]).map_err(error)?;
                Ok(!rows.is_empty())
            })?;
            verdicts.push((Some(extension.to_string()), visible));
        }
        Ok(verdicts)
    })
}

/// One extension's verdict: (extension, allowed).
type Verdict = (Option<String>, bool);

/// Runs `realtime._authorize_writes` for one request; inside a (sub)transaction that is rolled
/// back.
pub(super) fn write_checks(
    request: &AuthorizationRequest,
    write: &[&str],
) -> Result<Vec<Verdict>, String> {
    let error = |e: spi::SpiError| e.to_string();
    let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
    let texts = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTARRAYOID);
    Spi::connect(|client| {
        with_plan(
            &WRITE_CHECK_PLAN,
            client,
            WRITE_CHECK,
            &[text, text, text, text, text, texts],
            |plan| {
                let rows = client
                    .select(
                        plan,
                        None,
                        &[
                            request.subtopic.as_str().into(),
                            request.claims.role.as_str().into(),
                            (&*request.claims.json).into(),
                            request.claims.sub.as_deref().into(),
                            request.headers_json.as_str().into(),
                            write.to_vec().into(),
                        ],
                    )
                    .map_err(error)?;
                let mut out = Vec::new();
                for row in rows {
                    out.push((
                        row.get::<String>(1).map_err(error)?,
                        row.get::<bool>(2).map_err(error)?.unwrap_or(false),
                    ));
                }
                Ok(out)
            },
        )
    })
}

/// Answers requests of the socket server, in order. A role that may not be used or a policy
/// that raises refuses that request alone ([`Refusal::RoleNotAllowed`], [`Refusal::Policy`]).
pub fn answer_all(
    requests: &[AuthorizationRequest],
) -> Vec<(Result<Authorization, Refusal>, Replay)> {
    // The policies' search_path is set once for the batch, not per check: the statements run
    // before the role is switched (the probe inserts, realtime._authorize_writes up to its
    // SET ROLE) name everything with its schema, so no other schema can shadow them.
    let all_rights = transaction::rolled_back_each(
        AUTHORIZATION_TIMEOUT,
        requests,
        set_policy_search_path_local,
        |request| Ok(rights(request)),
    );
    requests
        .iter()
        .zip(all_rights)
        .map(|(request, rights)| {
            // An ERROR raised inside the check (by a policy, say) is caught as its message.
            let rights = rights.unwrap_or_else(|e| Err(Refusal::raised(e)));
            let replay = replay_for(request, &rights);
            (rights, replay)
        })
        .collect()
}

/// The checks of `requests` inside the caller's transaction (`realtime._node_authorize`, on a
/// primary, for a standby), each in a subtransaction that is rolled back.
pub fn check_in_transaction(
    requests: &[AuthorizationRequest],
) -> Vec<Result<Authorization, Refusal>> {
    transaction::each_rolled_back(None, requests, |request| Ok(rights(request)))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| Err(Refusal::raised(e))))
        .collect()
}

/// The four checks `realtime.explain_join` reports, each as a join or a first write runs it
/// but for one extension alone, so that one raising policy does not hide the others' verdicts:
/// (write?, extension, allowed or the error raised). Inside the caller's transaction, each in
/// a subtransaction that is rolled back. The caller checked the role first.
pub fn explain_checks(
    subtopic: &str,
    claims: &Claims,
) -> Vec<(bool, &'static str, Result<bool, String>)> {
    let request = AuthorizationRequest {
        id: 0,
        subtopic: subtopic.to_string(),
        claims: claims.clone(),
        headers_json: "{}".to_string(),
        presence: true,
        purpose: AuthorizationPurpose::Join,
        replay: None,
        private: true,
    };
    let checks = [
        (false, BROADCAST),
        (false, PRESENCE),
        (true, BROADCAST),
        (true, PRESENCE),
    ];
    let results = transaction::each_rolled_back(None, &checks, |(write, extension)| {
        let verdicts = if *write {
            write_checks(&request, &[extension])
        } else {
            read_checks(&request, &[extension])
        }?;
        Ok(verdicts
            .iter()
            .any(|(e, allowed)| e.as_deref() == Some(*extension) && *allowed))
    });
    checks
        .iter()
        .zip(results)
        .map(|((write, extension), result)| (*write, *extension, result))
        .collect()
}

/// On a standby: the checks run on the primary (`forwarded` are their answers), the replay
/// reads this node's own copy of the stored messages, completed for a resume by the messages
/// this node delivered whose offsets have not reached its copy yet (`delivered`).
pub fn with_local_replay(
    requests: &[AuthorizationRequest],
    forwarded: Vec<Result<Authorization, Refusal>>,
    delivered: &super::offset_writer::DeliveredOffsets,
) -> Vec<(Result<Authorization, Refusal>, Replay)> {
    requests
        .iter()
        .zip(forwarded)
        .map(|(request, rights)| {
            let mut replay = replay_for(request, &rights);
            if let (Ok(r), Some(params)) = (&rights, request.replay)
                && let ReplayFrom::After(after) = params.from
                && r.broadcast_read
            {
                // This node's copy may not show the offset of a message it just delivered.
                if replay.gap == Some(ReplayGap::UnknownOffset)
                    && delivered.contains(&request.subtopic, after)
                {
                    replay.gap = None;
                }
                let pending = delivered.after(&request.subtopic, request.private, after);
                if let Err(e) = add_unstored(
                    &mut replay,
                    &request.subtopic,
                    request.private,
                    pending,
                    params.limit,
                ) {
                    log!("pg_realtime: replay for {} failed: {e}", request.subtopic);
                }
            }
            (rights, replay)
        })
        .collect()
}

/// Adds to a resume the messages of `pending` (delivered here, offsets known) that its query
/// did not find because their offsets are not in this node's copy yet; keeps the newest
/// `limit`, oldest first.
fn add_unstored(
    replay: &mut Replay,
    topic: &str,
    private: bool,
    pending: Vec<(String, Offset)>,
    limit: i64,
) -> Result<(), String> {
    let have: std::collections::HashSet<&str> =
        replay.messages.iter().map(|m| m.id.as_str()).collect();
    let wanted: std::collections::HashMap<String, Offset> = pending
        .into_iter()
        .filter(|(id, _)| !have.contains(id.as_str()))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = wanted.keys().cloned().collect();
    let found = transaction::rolled_back(AUTHORIZATION_TIMEOUT, || {
        Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT id::text, event, payload::text, binary_payload
                       FROM realtime.messages
                      WHERE id = ANY($1::text[]::uuid[]) AND topic = $2 AND private = $3
                        AND extension = 'broadcast' AND event IS NOT NULL
                        AND (expires_at IS NULL OR expires_at > now())",
                    None,
                    &[ids.into(), topic.into(), private.into()],
                )
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for row in rows {
                let (id, event, payload) = stored_message(&row)?;
                let offset = wanted.get(&id).copied();
                out.push(Replayed {
                    id,
                    event,
                    payload,
                    offset,
                });
            }
            Ok(out)
        })
    })?;
    replay.messages.extend(found);
    replay.messages.sort_by_key(|m| m.offset);
    let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
    if replay.messages.len() > limit {
        let cut = replay.messages.len() - limit;
        replay.messages.drain(..cut);
        replay.gap.get_or_insert(ReplayGap::Limit {
            limit: limit as i64,
        });
    }
    Ok(())
}

fn replay_for(request: &AuthorizationRequest, rights: &Result<Authorization, Refusal>) -> Replay {
    match (rights, request.replay) {
        (Ok(r), Some(params)) if r.broadcast_read => {
            match replay(&request.subtopic, request.private, params) {
                Ok(replay) => replay,
                Err(e) => {
                    // Joining still works; the client only misses the history.
                    log!("pg_realtime: replay for {} failed: {e}", request.subtopic);
                    Replay::default()
                }
            }
        }
        _ => Replay::default(),
    }
}

/// The stored broadcasts of a topic a join asked for, oldest first. `since` (Supabase's
/// Broadcast Replay): the newest `limit` stored since then. `offset` (resume): the newest
/// `limit` stored after it, in commit order, and whether any are missing. Read as the owner:
/// the read check already passed. Expired messages (a `ttl` ran out) are not replayed.
fn replay(topic: &str, private: bool, params: ReplayParams) -> Result<Replay, String> {
    transaction::rolled_back(AUTHORIZATION_TIMEOUT, || {
        Spi::connect(|client| {
            // The newest `limit` messages after the start, then, newest first, as many as fit in
            // REPLAY_BYTES; `fetched` (one more than the limit at most) tells whether anything
            // was left out. The bound is applied in SQL, so the worker never holds more.
            let (start, order) = match params.from {
                ReplayFrom::Since(_) => (
                    "inserted_at >= to_timestamp($3::float8 / 1000::float8)
                     AND inserted_at < now() + interval '1 minute' AND $4::int4 IS NOT NULL",
                    "inserted_at, commit_lsn, commit_index",
                ),
                ReplayFrom::After(_) => (
                    "commit_lsn IS NOT NULL
                     AND (commit_lsn, commit_index) > ($3::text::pg_lsn, $4::int4)",
                    "commit_lsn, commit_index",
                ),
            };
            let descending = order.replace(',', " DESC,") + " DESC";
            let query = format!(
                "SELECT id::text, event, payload::text, binary_payload,
                        (commit_lsn - '0/0'::pg_lsn)::int8, commit_index, fetched FROM (
                     SELECT *, count(*) OVER () AS fetched,
                            row_number() OVER (ORDER BY {descending}) AS n,
                            sum(coalesce(octet_length(payload::text), octet_length(binary_payload), 0))
                                OVER (ORDER BY {descending}) AS bytes
                       FROM (SELECT id, event, payload, binary_payload, inserted_at, commit_lsn, commit_index
                               FROM realtime.messages
                              WHERE topic = $1 AND private = $2 AND extension = 'broadcast'
                                AND event IS NOT NULL AND {start}
                                AND (expires_at IS NULL OR expires_at > now())
                              ORDER BY {descending} LIMIT $5 + 1) AS newest) AS sized
                  WHERE n <= $5 AND bytes <= $6
                  ORDER BY {order}"
            );
            let (since_ms, lsn, index) = match params.from {
                ReplayFrom::Since(ms) => (ms, String::new(), 0),
                ReplayFrom::After(o) => {
                    (0, o.lsn_text(), i32::try_from(o.index).unwrap_or(i32::MAX))
                }
            };
            let lsn_or_since: pgrx::datum::DatumWithOid<'_> = match params.from {
                ReplayFrom::Since(_) => since_ms.into(),
                ReplayFrom::After(_) => lsn.into(),
            };
            let rows = client
                .select(
                    &query,
                    None,
                    &[
                        topic.into(),
                        private.into(),
                        lsn_or_since,
                        index.into(),
                        params.limit.into(),
                        (REPLAY_BYTES as i64).into(),
                    ],
                )
                .map_err(|e| e.to_string())?;
            let mut fetched = 0i64;
            let mut messages = Vec::new();
            for row in rows {
                let (id, event, payload) = stored_message(&row)?;
                let lsn = row.get::<i64>(5).map_err(|e| e.to_string())?;
                let index = row.get::<i32>(6).map_err(|e| e.to_string())?;
                fetched = row.get::<i64>(7).map_err(|e| e.to_string())?.unwrap_or(0);
                let offset = lsn
                    .zip(index)
                    .map(|(lsn, index)| Offset::new(lsn as u64, index as u32));
                messages.push(Replayed {
                    id,
                    event,
                    payload,
                    offset,
                });
            }
            // Only a resume promises everything after a point; `since` asks for the newest.
            let ReplayFrom::After(after) = params.from else {
                return Ok(Replay {
                    messages,
                    gap: None,
                });
            };
            let lost_through = client
                .select(
                    "SELECT (lost_through - '0/0'::pg_lsn)::int8 FROM realtime.replay_horizon",
                    Some(1),
                    &[],
                )
                .map_err(|e| e.to_string())?
                .first()
                .get::<i64>(1)
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            // Above the horizon the offset must name a stored message: a message whose
            // transaction committed without waiting for the disk may have been delivered and
            // then lost in a crash, and WAL written after the restart reuses its positions. The
            // zero offset ("from the start") names no message and needs none.
            let anchored = || -> Result<bool, String> {
                client
                    .select(
                        "SELECT EXISTS (SELECT FROM realtime.messages
                                         WHERE topic = $1 AND commit_lsn = $2::text::pg_lsn
                                           AND commit_index = $3)",
                        Some(1),
                        &[
                            topic.into(),
                            after.lsn_text().into(),
                            (after.index as i32).into(),
                        ],
                    )
                    .map_err(|e| e.to_string())?
                    .first()
                    .get::<bool>(1)
                    .map(|found| found.unwrap_or(false))
                    .map_err(|e| e.to_string())
            };
            // Messages that may be gone weigh more than messages left out by the limit.
            let gap = if after.lsn < lost_through as u64 {
                Some(ReplayGap::NotKept)
            } else if after.lsn > 0 && !anchored()? {
                Some(ReplayGap::UnknownOffset)
            } else if fetched > messages.len() as i64 {
                Some(ReplayGap::Limit {
                    limit: messages.len() as i64,
                })
            } else {
                None
            };
            Ok(Replay { messages, gap })
        })
    })
}

/// A stored message's id, event and payload: the first four columns of a replay query
/// (`id::text, event, payload::text, binary_payload`).
fn stored_message(row: &spi::SpiHeapTupleData<'_>) -> Result<(String, String, Payload), String> {
    let get_text = |i: usize| row.get::<String>(i).map_err(|e| e.to_string());
    let id = get_text(1)?.unwrap_or_default();
    let event = get_text(2)?.unwrap_or_default();
    let json = get_text(3)?;
    let binary = row.get::<Vec<u8>>(4).map_err(|e| e.to_string())?;
    let payload = match (json, binary) {
        (_, Some(bytes)) => Payload::Binary(bytes.into()),
        (Some(text), None) => Payload::Json(text.into()),
        (None, None) => Payload::Json(bytes::Bytes::from_static(b"{}")),
    };
    Ok((id, event, payload))
}

fn rights(request: &AuthorizationRequest) -> Result<Authorization, Refusal> {
    if !request.private {
        return Ok(PUBLIC);
    }
    // Reads at join, writes at the first write (as Supabase): most subscribers never write.
    let extensions = if request.presence {
        vec![BROADCAST, PRESENCE]
    } else {
        vec![BROADCAST]
    };
    let writes = request.purpose == AuthorizationPurpose::Write;
    require_allowed_role(&request.claims.role)?;
    let verdicts = if writes {
        write_checks(request, &extensions)
    } else {
        read_checks(request, &extensions)
    }
    .map_err(Refusal::Policy)?;
    let mut answer = Authorization::default();
    for (extension, allowed) in verdicts {
        let (read, write) = match extension.as_deref() {
            Some(BROADCAST) => (&mut answer.broadcast_read, &mut answer.broadcast_write),
            Some(PRESENCE) => (&mut answer.presence_read, &mut answer.presence_write),
            _ => continue,
        };
        *(if writes { write } else { read }) = allowed;
    }
    Ok(answer)
}
