//! Private-channel authorization. The RLS checks need Postgres, which only the worker's main
//! thread may touch, so a request is handed over as an [`Event::Authorize`] and the channel
//! waits (asynchronously) for [`crate::Server::complete_authorization`].
//!
//! Each request costs the worker's only Postgres thread a subtransaction, so what may wait is
//! bounded: per connection (see `connection/join.rs`) and here, over all of them. A request whose
//! asker went away (timed out, left, disconnected) is forgotten at once, so the worker skips it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use crate::events::{
    Authorization, AuthorizationPurpose, AuthorizationRequest, EventQueue, Replay, ReplayParams,
};
use crate::jwt::Claims;
use crate::refusal::Refusal;
use crate::registry::PendingSubscription;

/// The rights, and the stored messages to replay (empty unless the join asked for replay).
pub(crate) type Answer = Result<(Authorization, Replay), Refusal>;

/// What a join that asked for replay needs to be subscribed the moment it is answered: see
/// [`crate::Server::complete_authorization`].
pub(crate) struct PreSubscribe {
    pub key: crate::topic::TopicKey,
    pub vsn: crate::protocol::Vsn,
    pub expires: crate::registry::Expiry,
    pub queue_frames: usize,
    pub queue_bytes: usize,
}

struct Waiting {
    answer: oneshot::Sender<(Answer, Option<PendingSubscription>)>,
    subscribe: Option<PreSubscribe>,
}

#[derive(Default)]
pub(crate) struct Authorizer {
    pending: Mutex<HashMap<u64, Waiting>>,
    next_id: AtomicU64,
}

fn read_denied(subtopic: &str) -> Refusal {
    Refusal::ReadDenied {
        subtopic: subtopic.to_string(),
    }
}

pub(crate) struct Ask<'a> {
    pub subtopic: &'a str,
    pub claims: &'a Claims,
    pub headers_json: &'a str,
    pub presence: bool,
    pub purpose: AuthorizationPurpose,
    pub replay: Option<ReplayParams>,
    /// False only for a public join that asked for replay.
    pub private: bool,
    /// Only with `replay`.
    pub subscribe: Option<PreSubscribe>,
}

impl crate::Inner {
    /// Asks the worker under the current settings (whether private channels are authorized at
    /// all, how long to wait, how many may wait).
    pub(crate) async fn authorize(&self, ask: Ask<'_>) -> (Answer, Option<PendingSubscription>) {
        let cfg = self.config();
        let started = std::time::Instant::now();
        let answered = self
            .authz
            .authorize(
                cfg.authorize_private,
                cfg.authorization_timeout,
                cfg.max_pending_authorizations,
                &self.events,
                ask,
            )
            .await;
        if cfg.authorize_private {
            self.metrics.authorization_waited(started.elapsed());
        }
        answered
    }
}

/// Forgets a request when its asker stops waiting, however it stops (answer, timeout, or the
/// asking task being dropped).
struct Forget<'a> {
    authz: &'a Authorizer,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.authz.take(self.id);
    }
}

impl Authorizer {
    /// Asks the worker; `Err` says why the join is refused.
    pub(crate) async fn authorize(
        &self,
        enabled: bool,
        timeout: std::time::Duration,
        max_pending: usize,
        events: &EventQueue,
        ask: Ask<'_>,
    ) -> (Answer, Option<PendingSubscription>) {
        if !enabled {
            // Until the worker answers authorization requests, nothing private is allowed.
            return (Err(read_denied(ask.subtopic)), None);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= max_pending.max(1) {
                return (Err(Refusal::TooManyWaiting), None);
            }
            pending.insert(
                id,
                Waiting {
                    answer: tx,
                    subscribe: ask.subscribe,
                },
            );
        }
        let _forget = Forget { authz: self, id };
        let request = AuthorizationRequest {
            id,
            subtopic: ask.subtopic.to_string(),
            claims: ask.claims.clone(),
            headers_json: ask.headers_json.to_string(),
            presence: ask.presence,
            purpose: ask.purpose,
            replay: ask.replay,
            private: ask.private,
        };
        if !events.push_authorize(request, max_pending, |id| self.is_pending(id)) {
            return (Err(Refusal::TooManyWaiting), None);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => (Err(read_denied(ask.subtopic)), None),
            Err(_) => {
                log::warn!(
                    "authorization request {id} for {} timed out",
                    crate::log_excerpt(ask.subtopic)
                );
                (Err(Refusal::AuthorizationTimeout), None)
            }
        }
    }

    /// Requests somebody waits for (queued for the worker, or taken by it and not answered).
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether somebody still waits for request `id`.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    fn take(&self, id: u64) -> Option<Waiting> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// Answers request `id`; returns false when nobody waits for it any more (timed out or
    /// gone). `subscribe` makes the pre-subscription of a replaying join that may read.
    pub(crate) fn complete(
        &self,
        id: u64,
        answer: Answer,
        subscribe: impl FnOnce(&PreSubscribe, &Authorization, &Replay) -> PendingSubscription,
    ) -> bool {
        let Some(w) = self.take(id) else {
            return false;
        };
        let subscription = match (&answer, &w.subscribe) {
            (Ok((a, replay)), Some(pre)) if a.broadcast_read || a.presence_read => {
                Some(subscribe(pre, a, replay))
            }
            _ => None,
        };
        // If the asker is gone after all, dropping the subscription undoes it.
        w.answer.send((answer, subscription)).is_ok()
    }
}
