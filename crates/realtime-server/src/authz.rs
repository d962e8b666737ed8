//! Private-channel authorization. The RLS checks need Postgres, which only the worker's main
//! thread may touch, so a request is handed over as an [`Event::Authorize`] and the channel
//! waits (asynchronously) for [`crate::Server::complete_authorization`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use crate::events::{
    Authorization, AuthorizationPurpose, AuthorizationRequest, Event, EventQueue, ReplayParams,
    Replayed,
};
use crate::jwt::Claims;

/// The rights, and the stored messages to replay (empty unless the join asked for replay).
pub(crate) type Answer = Result<(Authorization, Vec<Replayed>), String>;

/// Held by a join with replay until its channel has subscribed; the database dispatch waits
/// for it to be dropped (see `Dispatch::AwaitSubscription`).
pub(crate) type SubscribeBarrier = Option<oneshot::Sender<()>>;

struct Waiting {
    answer: oneshot::Sender<(Answer, SubscribeBarrier)>,
    replay: bool,
}

#[derive(Default)]
pub(crate) struct Authorizer {
    pending: Mutex<HashMap<u64, Waiting>>,
    next_id: AtomicU64,
}

pub(crate) fn unauthorized_reason(subtopic: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {subtopic}")
}

pub(crate) struct Ask<'a> {
    pub subtopic: &'a str,
    pub claims: &'a Claims,
    pub headers_json: &'a str,
    pub presence: bool,
    pub purpose: AuthorizationPurpose,
    pub replay: Option<ReplayParams>,
}

impl crate::Inner {
    /// Asks the worker under the current settings (whether private channels are authorized at
    /// all, and how long to wait).
    pub(crate) async fn authorize(&self, ask: Ask<'_>) -> (Answer, SubscribeBarrier) {
        let cfg = self.config();
        self.authz
            .authorize(
                cfg.authorize_private,
                cfg.authorization_timeout,
                &self.events,
                ask,
            )
            .await
    }
}

impl Authorizer {
    /// Asks the worker; `Err` carries a complete join error reason.
    pub(crate) async fn authorize(
        &self,
        enabled: bool,
        timeout: std::time::Duration,
        events: &EventQueue,
        ask: Ask<'_>,
    ) -> (Answer, SubscribeBarrier) {
        if !enabled {
            // Until the worker answers authorization requests, nothing private is allowed.
            return (Err(unauthorized_reason(ask.subtopic)), None);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Waiting {
                    answer: tx,
                    replay: ask.replay.is_some(),
                },
            );
        events.push(Event::Authorize(AuthorizationRequest {
            id,
            subtopic: ask.subtopic.to_string(),
            claims: ask.claims.clone(),
            headers_json: ask.headers_json.to_string(),
            presence: ask.presence,
            purpose: ask.purpose,
            replay: ask.replay,
        }));
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match answer {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => (Err(unauthorized_reason(ask.subtopic)), None),
            Err(_) => {
                log::warn!(
                    "authorization request {id} for {} timed out",
                    crate::log_excerpt(ask.subtopic)
                );
                (
                    Err("IncreaseConnectionPool: Please increase your connection pool size".into()),
                    None,
                )
            }
        }
    }

    /// Whether request `id` is a join that asked for replay.
    pub(crate) fn wants_replay(&self, id: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|w| w.replay)
    }

    /// Returns false when nobody waits for `id` any more (timed out or connection gone); the
    /// barrier is then dropped, which releases it.
    pub(crate) fn complete(&self, id: u64, answer: Answer, barrier: SubscribeBarrier) -> bool {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match waiting {
            Some(w) => w.answer.send((answer, barrier)).is_ok(),
            None => false,
        }
    }
}
