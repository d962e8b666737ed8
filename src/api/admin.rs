//! Operations from SQL: who is connected (`realtime.connections()`, `realtime.channels()`),
//! closing connections (`realtime.disconnect`, `realtime.disconnect_user`), and why a join is
//! refused (`realtime.explain_join`). None is executable by PUBLIC (see sql/admin.sql).
//!
//! A backend is another process than the worker that holds the sockets: the first four ask the
//! worker through a few bounded shared-memory slots (`queue/commands.rs`) and wait for its
//! answer, which it gives on its main loop. `explain_join` needs no worker: it runs the checks
//! a join would run, here, in subtransactions that are rolled back.

use crate::error::RealtimeError;
use crate::queue::commands::{self, Kind};
use pgrx::datum::Inet;
use pgrx::prelude::*;
use realtime_server::{Claims, Refusal, jwt::JwtError};
use serde_json::Value;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn timestamp(unix_micros: i64) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET_MICROS).ok()
}

fn snapshot(kind: Kind) -> Vec<Value> {
    let bytes = commands::claim()
        .and_then(|mut claim| claim.snapshot(kind))
        .unwrap_or_else(|e| e.raise());
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(rows)) => rows,
        _ => RealtimeError::Internal("the worker's snapshot is not a JSON array".into()).raise(),
    }
}

fn int(row: &Value, field: &str) -> i64 {
    row.get(field)
        .and_then(Value::as_u64)
        .map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn text(row: &Value, field: &str) -> Option<String> {
    row.get(field).and_then(Value::as_str).map(str::to_string)
}

/// One row per open WebSocket connection of this node, as the worker sees it when called.
// pgrx takes the column names from the signature itself, so the type cannot be aliased.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn connections() -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(remote_addr, Option<Inet>),
        name!(remote_port, Option<i32>),
        name!(role, String),
        name!(sub, Option<String>),
        name!(protocol, String),
        name!(connected_at, Option<TimestampWithTimeZone>),
        name!(channels, Vec<String>),
        name!(messages_in, i64),
        name!(bytes_in, i64),
        name!(messages_out, i64),
        name!(bytes_out, i64),
        name!(queued_bytes, i64),
    ),
> {
    let rows = snapshot(Kind::Connections);
    TableIterator::new(rows.into_iter().map(|r| {
        let channels = r
            .get("channels")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        (
            int(&r, "id"),
            text(&r, "ip").map(Inet),
            r.get("port")
                .and_then(Value::as_u64)
                .and_then(|p| i32::try_from(p).ok()),
            text(&r, "role").unwrap_or_default(),
            text(&r, "sub"),
            text(&r, "vsn").unwrap_or_default(),
            r.get("at").and_then(Value::as_i64).and_then(timestamp),
            channels,
            int(&r, "mi"),
            int(&r, "bi"),
            int(&r, "mo"),
            int(&r, "bo"),
            int(&r, "q"),
        )
    }))
}

/// One row per topic this node's connections joined or that holds presence.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn channels() -> TableIterator<
    'static,
    (
        name!(topic, String),
        name!(private, bool),
        name!(subscribers, i64),
        name!(presence_keys, i64),
    ),
> {
    let rows = snapshot(Kind::Channels);
    TableIterator::new(rows.into_iter().map(|r| {
        (
            text(&r, "topic").unwrap_or_default(),
            r.get("private").and_then(Value::as_bool).unwrap_or(false),
            int(&r, "subscribers"),
            int(&r, "keys"),
        )
    }))
}

fn disconnect_request(kind: Kind, number: i64, sub: &str, reason: Option<&str>) -> i64 {
    commands::claim()
        .and_then(|mut claim| claim.request(kind, number, sub, reason.unwrap_or("")))
        .map(|answer| answer.count)
        .unwrap_or_else(|e| e.raise())
}

/// Closes connection `connection_id`: each of its channels gets a `system` message with
/// `reason`, then the socket is closed. Returns how many connections were closed (0 or 1).
#[pg_extern(volatile, parallel_unsafe)]
fn disconnect(connection_id: i64, reason: default!(Option<&str>, "NULL")) -> i64 {
    disconnect_request(Kind::Disconnect, connection_id, "", reason)
}

/// Closes every connection whose newest token has this `sub`, as [`disconnect`] does.
#[pg_extern(volatile, parallel_unsafe)]
fn disconnect_user(sub: &str, reason: default!(Option<&str>, "NULL")) -> i64 {
    if sub.is_empty() {
        return 0;
    }
    disconnect_request(Kind::DisconnectUser, 0, sub, reason)
}

/// The checks a join of `topic` with a token carrying `claims` runs, one row each:
/// the token's claims, the role rule, the read and write checks of broadcast and presence
/// (private channels), and the join's verdict with the reason its error reply would give.
/// Declared in sql/admin.sql: its first column is named `check`, a reserved word the
/// generated declaration would not quote.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn explain_join(
    topic: Option<&str>,
    claims: Option<pgrx::JsonB>,
    private: default!(Option<bool>, "true"),
) -> TableIterator<
    'static,
    (
        name!(check, String),
        name!(allowed, bool),
        name!(reason, Option<String>),
    ),
> {
    let Some(topic) = topic.filter(|t| !t.is_empty()) else {
        RealtimeError::ExplainArgument("topic must not be NULL or empty").raise();
    };
    let Some(pgrx::JsonB(claims)) = claims else {
        RealtimeError::ExplainArgument("claims must not be NULL").raise();
    };
    let private = private.unwrap_or(true);
    TableIterator::new(explain(topic, &claims, private))
}

type Row = (String, bool, Option<String>);

fn row(check: &str, verdict: Result<(), String>) -> Row {
    match verdict {
        Ok(()) => (check.to_string(), true, None),
        Err(reason) => (check.to_string(), false, Some(reason)),
    }
}

/// The token as a join sees it, from its claims: `role` and `exp` are required, an expired or
/// `none` role is refused, with the texts a join gets.
fn token(claims: &Value) -> Result<Claims, String> {
    let refused = |e: JwtError| Refusal::Token(e).to_string();
    let role = claims.get("role").and_then(Value::as_str);
    let exp = claims.get("exp").and_then(Value::as_i64);
    let (Some(role), Some(exp)) = (role, exp) else {
        return Err(refused(JwtError::MissingClaims));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    if exp <= now {
        return Err(refused(JwtError::Expired {
            seconds_ago: now - exp,
        }));
    }
    if role.is_empty() || role.eq_ignore_ascii_case("none") {
        return Err(refused(JwtError::RoleNotAllowed));
    }
    Ok(Claims {
        role: role.to_string(),
        sub: claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string),
        exp,
        json: claims.to_string().into(),
    })
}

fn explain(topic: &str, claims: &Value, private: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let token = token(claims);
    rows.push(row("token", token.as_ref().map(drop).map_err(Clone::clone)));
    if !private {
        let verdict = match &token {
            Err(reason) => Err(reason.clone()),
            Ok(_) if crate::gucs::server_config().private_only => {
                Err(Refusal::PrivateOnly.to_string())
            }
            Ok(_) => Ok(()),
        };
        rows.push(row("join", verdict));
        return rows;
    }
    let claims = match token {
        Ok(claims) => claims,
        Err(reason) => {
            rows.push(row("join", Err(reason)));
            return rows;
        }
    };
    let role = crate::worker::authorization::require_allowed_role(&claims.role);
    rows.push(row(
        "role",
        role.clone().map_err(|refusal| refusal.to_string()),
    ));
    if let Err(refusal) = role {
        rows.push(row("join", Err(refusal.to_string())));
        return rows;
    }
    let mut join = None;
    for (write, extension, result) in crate::worker::authorization::explain_checks(topic, &claims) {
        let check = format!("{} {extension}", if write { "write" } else { "read" });
        let verdict = match result {
            Ok(true) => Ok(()),
            Ok(false) if write => Err(realtime_server::write_denied(topic)),
            Ok(false) => Err(Refusal::ReadDenied {
                subtopic: topic.to_string(),
            }
            .to_string()),
            Err(error) => Err(Refusal::raised(error).to_string()),
        };
        // A join without presence runs the broadcast read check alone; its reply says this.
        if !write && extension == "broadcast" {
            join = Some(verdict.clone());
        }
        rows.push(row(&check, verdict));
    }
    rows.push(row("join", join.unwrap_or(Ok(()))));
    rows
}

pgrx::extension_sql_file!(
    "../../sql/admin.sql",
    name = "admin",
    requires = ["schema", connections, channels, disconnect, disconnect_user]
);
