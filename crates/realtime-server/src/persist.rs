//! Stored client broadcasts (`persist`). realtime-js puts `{"persist": true}` or
//! `{"persist": {"ttl": N}}` in a broadcast's metadata (REST: `?persist=true`,
//! `?persist[ttl]=N`). Such a message is not fanned out by the server: it goes to the worker as
//! an [`Event::Persist`], which checks the persistence right when asked, inserts the row in its
//! own transaction and answers with [`crate::Server::complete_persist`]. The committed row comes
//! back through the commit queue like any database message, so it is delivered once, after it is
//! stored, with `meta.id`.
//!
//! `broadcast.self = false` still holds: the sender's subscription is remembered per stored row
//! id ([`Persister::take_exclude`]) and left out when that row is delivered. What may wait is
//! bounded per connection (`max_persist_per_connection`) and over the server (the event queue's
//! `max_persist_queued` messages and `max_persist_queued_bytes`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde_json::Value;
use tokio::sync::oneshot;

use crate::broker::SubId;
use crate::events::{Event, PersistRequest};
use crate::jwt::Claims;
use crate::protocol::Payload;
use crate::refusal::PersistError;

/// Stored rows whose sender must not receive them, remembered at most; past it the oldest are
/// forgotten (their senders would then receive their own message).
const MAX_EXCLUDES: usize = 10_000;

/// What `persist` asked: `None` without a ttl.
pub(crate) type Ttl = Option<u64>;

/// Reads the `persist` key of a broadcast's metadata. `Ok(None)`: not asked (no metadata, no
/// key, `false` or `null`).
pub(crate) fn from_metadata(
    metadata: Option<&[u8]>,
    max_ttl: u64,
) -> Result<Option<Ttl>, PersistError> {
    let Some(metadata) = metadata else {
        return Ok(None);
    };
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(metadata) else {
        return Ok(None);
    };
    match map.get("persist") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(None)),
        Some(Value::Object(o)) => match o.get("ttl") {
            None | Some(Value::Null) => Ok(Some(None)),
            Some(ttl) => ttl_seconds(ttl.as_u64(), max_ttl).map(|t| Some(Some(t))),
        },
        Some(_) => Err(PersistError::Malformed),
    }
}

/// Reads REST's `persist=true` / `persist[ttl]=N` query parameters.
pub(crate) fn from_query(
    query: &HashMap<String, String>,
    max_ttl: u64,
) -> Result<Option<Ttl>, PersistError> {
    if let Some(ttl) = query.get("persist[ttl]") {
        return ttl_seconds(ttl.trim().parse::<u64>().ok(), max_ttl).map(|t| Some(Some(t)));
    }
    match query.get("persist").map(|p| p.to_ascii_lowercase()) {
        None => Ok(None),
        Some(p) if p == "false" => Ok(None),
        Some(p) if p == "true" => Ok(Some(None)),
        Some(_) => Err(PersistError::Malformed),
    }
}

fn ttl_seconds(ttl: Option<u64>, max_ttl: u64) -> Result<u64, PersistError> {
    match ttl {
        Some(t) if t >= 1 && t <= max_ttl => Ok(t),
        _ => Err(PersistError::BadTtl { max: max_ttl }),
    }
}

struct Waiting {
    answer: oneshot::Sender<Result<String, PersistError>>,
    exclude: Option<SubId>,
}

#[derive(Default)]
struct Excludes {
    by_id: HashMap<String, SubId>,
    order: VecDeque<String>,
}

#[derive(Default)]
pub(crate) struct Persister {
    pending: Mutex<HashMap<u64, Waiting>>,
    next_id: AtomicU64,
    excludes: Mutex<Excludes>,
    /// `excludes`' size, read without the lock by every delivered database message.
    excluding: AtomicUsize,
}

/// What a connection or REST request asks to store.
pub(crate) struct Ask<'a> {
    pub subtopic: &'a str,
    pub claims: &'a Claims,
    pub headers_json: &'a str,
    pub check: bool,
    pub event: String,
    pub payload: Payload,
    pub ttl: Ttl,
    /// The sender's subscription, left out of the delivery (`broadcast.self` false).
    pub exclude: Option<SubId>,
}

/// Forgets a request when its asker stops waiting, however it stops.
struct Forget<'a> {
    persister: &'a Persister,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.persister.take(self.id);
    }
}

impl crate::Inner {
    /// Hands the message to the worker and waits for the stored row's id.
    pub(crate) async fn persist(&self, ask: Ask<'_>) -> Result<String, PersistError> {
        let cfg = self.config();
        if !cfg.authorize_private {
            return Err(PersistError::Unavailable);
        }
        let persister = &self.persister;
        let id = persister.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        persister.lock().insert(
            id,
            Waiting {
                answer: tx,
                exclude: ask.exclude,
            },
        );
        let _forget = Forget { persister, id };
        let request = PersistRequest {
            id,
            subtopic: ask.subtopic.to_string(),
            claims: ask.claims.clone(),
            headers_json: ask.headers_json.to_string(),
            check: ask.check,
            event: ask.event,
            payload: ask.payload,
            ttl_seconds: ask.ttl,
        };
        if !self.events.push_persist(
            request,
            cfg.max_persist_queued,
            cfg.max_persist_queued_bytes,
        ) {
            return Err(PersistError::TooManyWaiting);
        }
        match tokio::time::timeout(cfg.authorization_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(PersistError::Unavailable),
            Err(_) => {
                log::warn!(
                    "storing a message on {} timed out",
                    crate::log_excerpt(ask.subtopic)
                );
                Err(PersistError::Timeout)
            }
        }
    }
}

impl Persister {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, id: u64) -> Option<Waiting> {
        self.lock().remove(&id)
    }

    /// Whether somebody still waits for request `id`.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Answers request `id` (after the row committed); returns false when nobody waits any
    /// more. A stored row's sender is remembered so that its delivery leaves it out.
    pub(crate) fn complete(&self, id: u64, answer: Result<String, PersistError>) -> bool {
        let Some(w) = self.take(id) else {
            return false;
        };
        if let (Ok(row), Some(sub)) = (&answer, w.exclude) {
            let mut ex = self.excludes.lock().unwrap_or_else(|p| p.into_inner());
            if ex.by_id.insert(row.clone(), sub).is_none() {
                ex.order.push_back(row.clone());
            }
            while ex.order.len() > MAX_EXCLUDES {
                if let Some(old) = ex.order.pop_front() {
                    ex.by_id.remove(&old);
                }
            }
            self.excluding.store(ex.by_id.len(), Ordering::Release);
        }
        w.answer.send(answer).is_ok()
    }

    /// The subscription to leave out of the delivery of stored row `id`, once.
    pub(crate) fn take_exclude(&self, id: &str) -> Option<SubId> {
        if self.excluding.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut ex = self.excludes.lock().unwrap_or_else(|p| p.into_inner());
        let sub = ex.by_id.remove(id)?;
        if let Some(at) = ex.order.iter().position(|r| r == id) {
            ex.order.remove(at);
        }
        self.excluding.store(ex.by_id.len(), Ordering::Release);
        Some(sub)
    }
}

/// Drops queued requests nobody waits for any more (their asker timed out or went away).
pub(crate) fn still_wanted(persister: &Persister, event: &Event) -> bool {
    match event {
        Event::Persist(r) => persister.is_pending(r.id),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_persist_values_are_read_strictly() {
        let m = |s: &str| from_metadata(Some(s.as_bytes()), 100);
        assert_eq!(from_metadata(None, 100), Ok(None));
        assert_eq!(m(r#"{"persist":false}"#), Ok(None));
        assert_eq!(m(r#"{"other":1}"#), Ok(None));
        assert_eq!(m(r#"{"persist":true}"#), Ok(Some(None)));
        assert_eq!(m(r#"{"persist":{"ttl":100}}"#), Ok(Some(Some(100))));
        assert_eq!(m(r#"{"persist":{}}"#), Ok(Some(None)));
        assert_eq!(m(r#"{"persist":5}"#), Err(PersistError::Malformed));
        assert_eq!(m(r#"{"persist":"yes"}"#), Err(PersistError::Malformed));
        for bad in [
            r#"{"persist":{"ttl":"x"}}"#,
            r#"{"persist":{"ttl":0}}"#,
            r#"{"persist":{"ttl":101}}"#,
            r#"{"persist":{"ttl":1.5}}"#,
            r#"{"persist":{"ttl":-3}}"#,
        ] {
            assert_eq!(m(bad), Err(PersistError::BadTtl { max: 100 }), "{bad}");
        }
    }

    #[test]
    fn rest_persist_parameters() {
        let q = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            from_query(&map, 60)
        };
        assert_eq!(q(&[]), Ok(None));
        assert_eq!(q(&[("persist", "true")]), Ok(Some(None)));
        assert_eq!(q(&[("persist", "false")]), Ok(None));
        assert_eq!(q(&[("persist[ttl]", "60")]), Ok(Some(Some(60))));
        assert_eq!(
            q(&[("persist[ttl]", "61")]),
            Err(PersistError::BadTtl { max: 60 })
        );
        assert_eq!(q(&[("persist", "1")]), Err(PersistError::Malformed));
    }

    #[test]
    fn a_stored_row_excludes_its_sender_once() {
        let p = Persister::default();
        let (tx, _rx) = oneshot::channel();
        p.lock().insert(
            1,
            Waiting {
                answer: tx,
                exclude: Some(7),
            },
        );
        assert!(p.take_exclude("row").is_none());
        p.complete(1, Ok("row".into()));
        assert_eq!(p.take_exclude("row"), Some(7));
        assert_eq!(p.take_exclude("row"), None);
        assert!(!p.complete(1, Ok("row".into())), "answered once");
    }
}
