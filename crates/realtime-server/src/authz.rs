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

#[derive(Default)]
pub(crate) struct Authorizer {
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
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
    pub(crate) async fn authorize(&self, ask: Ask<'_>) -> Answer {
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
    ) -> Answer {
        if !enabled {
            // Until the worker answers authorization requests, nothing private is allowed.
            return Err(unauthorized_reason(ask.subtopic));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
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
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(unauthorized_reason(ask.subtopic)),
            Err(_) => {
                log::warn!("authorization request {id} for {} timed out", ask.subtopic);
                Err("IncreaseConnectionPool: Please increase your connection pool size".into())
            }
        }
    }

    /// Returns false when nobody waits for `id` any more (timed out or connection gone).
    pub(crate) fn complete(&self, id: u64, answer: Answer) -> bool {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match tx {
            Some(tx) => tx.send(answer).is_ok(),
            None => false,
        }
    }
}
