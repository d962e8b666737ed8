//! A standby's link to the primary: one ordinary PostgreSQL connection on which this node's
//! envelopes go to `realtime._node_relay` and private channels' checks to
//! `realtime._node_authorize` (a standby cannot insert the probe rows the checks need).
//! Reconnects by itself; after each (re)connect it says hello, so the other nodes and this one
//! exchange their members again.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::replicated::ReplicatedBroker;
use crate::events::{Authorization, AuthorizationPurpose, AuthorizationRequest};
use crate::jwt::Claims;
use crate::refusal::Refusal;

/// Bytes of frames sent in one call.
const BATCH_BYTES: usize = 1 << 20;
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Connection and statement timeout of the link.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks forwarded to the primary, answered in order.
pub(crate) struct Forwarded {
    pub requests: String,
    pub answer: oneshot::Sender<Result<String, String>>,
}

/// The connection settings of the link: `conninfo` (`primary_conninfo` or the
/// `realtime.primary_conninfo` override, `key=value` or a URI) with `dbname` set to the
/// worker's database. Keys only libpq knows (`passfile`, `sslsni`, `gssencmode`, ...) are left
/// out; TLS is not used by the link.
pub fn link_config(conninfo: &str, dbname: &str) -> Result<tokio_postgres::Config, String> {
    let trimmed = conninfo.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let mut config: tokio_postgres::Config = trimmed.parse().map_err(|e| format!("{e}"))?;
        config.dbname(dbname);
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        return Ok(config);
    }
    let mut config = tokio_postgres::Config::new();
    let mut password_file = None;
    for (key, value) in parse_conninfo(trimmed)? {
        match key.as_str() {
            "host" | "hostaddr" => {
                config.host(&value);
            }
            "port" => {
                for p in value.split(',') {
                    config.port(p.trim().parse().map_err(|_| format!("bad port \"{p}\""))?);
                }
            }
            "user" => {
                config.user(&value);
            }
            "password" => {
                config.password(value);
            }
            "passfile" => password_file = Some(value),
            "connect_timeout" => {
                if let Ok(s) = value.parse::<u64>() {
                    config.connect_timeout(Duration::from_secs(s.max(1)));
                }
            }
            _ => {}
        }
    }
    if config.get_password().is_none()
        && let Some(file) = password_file
        && let Some(pw) = password_from_file(&file, &config, dbname)
    {
        config.password(pw);
    }
    config.dbname(dbname);
    config.application_name("pg_realtime node link");
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(LINK_TIMEOUT);
    }
    Ok(config)
}

/// `key=value` pairs of a libpq connection string (values may be single-quoted, with `\`
/// escapes).
fn parse_conninfo(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after \"{key}\" in the connection string"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value in the connection string".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// The password of a `.pgpass`-format file line matching host, port, database and user.
fn password_from_file(path: &str, config: &tokio_postgres::Config, dbname: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.splitn(5, ':').collect();
        if fields.len() != 5 {
            continue;
        }
        let ok = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if ok(fields[0], &host)
            && ok(fields[1], &port)
            && ok(fields[2], dbname)
            && ok(fields[3], user)
        {
            return Some(fields[4].to_string());
        }
    }
    None
}

/// Keeps the link up and moves envelopes and checks over it, until shutdown.
pub(crate) async fn run(
    config: tokio_postgres::Config,
    broker: Arc<ReplicatedBroker>,
    mut forwarded: mpsc::Receiver<Forwarded>,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = RETRY_FIRST;
    // Logged once per distinct error: a link that keeps failing the same way (the primary is
    // down, pg_hba refuses, the user may not call the functions) does not flood the log.
    let mut last_error: Option<String> = None;
    loop {
        let connected = tokio::select! {
            c = config.connect(tokio_postgres::NoTls) => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let error = match connected {
            Err(e) => format!("cannot reach the primary: {e}"),
            Ok((client, connection)) => {
                let conn_task = tokio::spawn(connection);
                let timeout = format!("SET statement_timeout = {}", LINK_TIMEOUT.as_millis());
                let failed = match client.batch_execute(&timeout).await {
                    Err(e) => Some(e),
                    Ok(()) => {
                        broker.hello();
                        let mut link = Health {
                            last_error: &mut last_error,
                            retry: &mut retry,
                            ready: &ready,
                        };
                        serve(&client, &broker, &mut forwarded, &mut stop, &mut link).await
                    }
                };
                conn_task.abort();
                match failed {
                    None => return,
                    Some(e) => format!("the link to the primary failed: {e}"),
                }
            }
        };
        if last_error.as_deref() != Some(error.as_str()) {
            log::warn!("realtime: {error} (retrying; logged again when the error changes)");
            last_error = Some(error.clone());
        }
        // Checks cannot wait for the primary: refuse them now, with the reason.
        while let Ok(f) = forwarded.try_recv() {
            let _ = f.answer.send(Err(error.clone()));
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// How the link fared: the error last logged, and the next delay before reconnecting.
struct Health<'a> {
    last_error: &'a mut Option<String>,
    retry: &'a mut Duration,
    /// Told once the primary took this node's hello: the node may serve.
    ready: &'a watch::Sender<bool>,
}

impl Health<'_> {
    /// A call on the link succeeded.
    fn works(&mut self) {
        self.ready.send_if_modified(|r| !std::mem::replace(r, true));
        *self.retry = RETRY_FIRST;
        if self.last_error.take().is_some() {
            log::info!("realtime: the link to the primary works again");
        }
    }
}

/// Sends envelopes and checks until the connection fails (Some) or shutdown (None).
async fn serve(
    client: &tokio_postgres::Client,
    broker: &ReplicatedBroker,
    forwarded: &mut mpsc::Receiver<Forwarded>,
    stop: &mut watch::Receiver<bool>,
    health: &mut Health<'_>,
) -> Option<tokio_postgres::Error> {
    loop {
        while let Some(envelope) = broker.take_envelope(BATCH_BYTES) {
            let bytes = envelope.encode();
            if let Err(e) = client
                .execute("SELECT realtime._node_relay($1)", &[&bytes])
                .await
            {
                return Some(e);
            }
            health.works();
        }
        let next = tokio::select! {
            _ = broker.outbox.ready.notified() => None,
            f = forwarded.recv() => Some(f),
            _ = stop.wait_for(|s| *s) => return None,
        };
        let Some(f) = next else { continue };
        let f = f?;
        let answer = client
            .query_one("SELECT realtime._node_authorize($1)", &[&f.requests])
            .await
            .and_then(|row| row.try_get::<_, String>(0));
        match answer {
            Ok(a) => {
                health.works();
                let _ = f.answer.send(Ok(a));
            }
            Err(e) => {
                let _ = f
                    .answer
                    .send(Err(format!("the primary could not check: {e}")));
                if client.is_closed() {
                    return Some(e);
                }
            }
        }
    }
}

/// One forwarded check, as `realtime._node_authorize` reads it.
#[derive(Serialize, Deserialize)]
struct WireRequest {
    subtopic: String,
    role: String,
    sub: Option<String>,
    exp: i64,
    claims: String,
    headers: String,
    presence: bool,
    write: bool,
    refresh: bool,
}

/// One answer of `realtime._node_authorize`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireAnswer {
    Allowed {
        broadcast_read: bool,
        broadcast_write: bool,
        presence_read: bool,
        presence_write: bool,
    },
    RoleNotAllowed(String),
    Policy(String),
}

/// The checks of `requests` as the text `realtime._node_authorize` takes.
pub fn encode_requests(requests: &[AuthorizationRequest]) -> String {
    let wire: Vec<WireRequest> = requests
        .iter()
        .map(|r| WireRequest {
            subtopic: r.subtopic.clone(),
            role: r.claims.role.clone(),
            sub: r.claims.sub.clone(),
            exp: r.claims.exp,
            claims: r.claims.json.to_string(),
            headers: r.headers_json.clone(),
            presence: r.presence,
            write: r.purpose == AuthorizationPurpose::Write,
            refresh: r.purpose == AuthorizationPurpose::TokenRefresh,
        })
        .collect();
    serde_json::to_string(&wire).unwrap_or_else(|_| "[]".into())
}

/// The requests sent by [`encode_requests`] (on the primary). Ids are positions.
pub fn decode_requests(text: &str) -> Result<Vec<AuthorizationRequest>, String> {
    let wire: Vec<WireRequest> =
        serde_json::from_str(text).map_err(|e| format!("not a list of checks: {e}"))?;
    Ok(wire
        .into_iter()
        .enumerate()
        .map(|(i, w)| AuthorizationRequest {
            id: i as u64,
            subtopic: w.subtopic,
            claims: Claims {
                role: w.role,
                sub: w.sub,
                exp: w.exp,
                json: Arc::from(w.claims),
            },
            headers_json: w.headers,
            presence: w.presence,
            purpose: if w.write {
                AuthorizationPurpose::Write
            } else if w.refresh {
                AuthorizationPurpose::TokenRefresh
            } else {
                AuthorizationPurpose::Join
            },
            replay: None,
            private: true,
        })
        .collect())
}

/// The answers, as `realtime._node_authorize` returns them.
pub fn encode_answers(answers: &[Result<Authorization, Refusal>]) -> String {
    let wire: Vec<WireAnswer> = answers
        .iter()
        .map(|a| match a {
            Ok(a) => WireAnswer::Allowed {
                broadcast_read: a.broadcast_read,
                broadcast_write: a.broadcast_write,
                presence_read: a.presence_read,
                presence_write: a.presence_write,
            },
            Err(Refusal::RoleNotAllowed(t)) => WireAnswer::RoleNotAllowed(t.clone()),
            Err(other) => WireAnswer::Policy(other.policy_text()),
        })
        .collect();
    serde_json::to_string(&wire).unwrap_or_else(|_| "[]".into())
}

/// The answers for `count` forwarded checks; an unreadable or short answer refuses the rest.
pub fn decode_answers(text: &str, count: usize) -> Vec<Result<Authorization, Refusal>> {
    let wire: Vec<WireAnswer> = serde_json::from_str(text).unwrap_or_default();
    let mut out: Vec<Result<Authorization, Refusal>> = wire
        .into_iter()
        .take(count)
        .map(|w| match w {
            WireAnswer::Allowed {
                broadcast_read,
                broadcast_write,
                presence_read,
                presence_write,
            } => Ok(Authorization {
                broadcast_read,
                broadcast_write,
                presence_read,
                presence_write,
            }),
            WireAnswer::RoleNotAllowed(t) => Err(Refusal::RoleNotAllowed(t)),
            WireAnswer::Policy(t) => Err(Refusal::Policy(t)),
        })
        .collect();
    while out.len() < count {
        out.push(Err(Refusal::Policy(
            "the primary gave no answer for this check".into(),
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_written_by_pg_basebackup_becomes_a_link_config() {
        let c = link_config(
            "user=postgres passfile='/nonexistent/.pgpass' channel_binding=prefer \
             host=127.0.0.1 port=5433 sslmode=prefer sslsni=1 gssencmode=prefer \
             krbsrvname=postgres target_session_attrs=any password='it\\'s'",
            "app",
        );
        let c = c.expect("parses");
        assert_eq!(c.get_user(), Some("postgres"));
        assert_eq!(c.get_dbname(), Some("app"));
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_password(), Some(&b"it's"[..]));
        assert!(link_config("host", "x").is_err());
        assert!(link_config("host='unterminated", "x").is_err());
        let q = parse_conninfo(r"a='x y\' z' b=c\ d").expect("parses");
        assert_eq!(
            q,
            vec![("a".into(), "x y' z".into()), ("b".into(), "c d".into())]
        );
    }

    #[test]
    fn checks_and_answers_survive_the_wire() {
        let req = AuthorizationRequest {
            id: 9,
            subtopic: "room".into(),
            claims: Claims {
                role: "authenticated".into(),
                sub: Some("u1".into()),
                exp: 42,
                json: Arc::from(r#"{"role":"authenticated"}"#),
            },
            headers_json: "{}".into(),
            presence: true,
            purpose: AuthorizationPurpose::Write,
            replay: None,
            private: true,
        };
        let back = decode_requests(&encode_requests(&[req])).expect("decodes");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].purpose, AuthorizationPurpose::Write);
        assert_eq!(back[0].claims.sub.as_deref(), Some("u1"));
        let answers = vec![
            Ok(Authorization {
                broadcast_read: true,
                ..Authorization::default()
            }),
            Err(Refusal::Policy("boom".into())),
        ];
        let got = decode_answers(&encode_answers(&answers), 3);
        assert_eq!(got[0], answers[0]);
        assert_eq!(
            got[1].as_ref().err().map(|r| r.to_string()),
            Some("Unauthorized: boom".into())
        );
        assert!(got[2].is_err(), "a missing answer refuses");
    }
}
