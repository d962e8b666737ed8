//! Coalesces `presence_diff`s per topic over a short window, so a room where N members join
//! at once costs about N × (window count) frames instead of N². Merging is safe for
//! phoenix.js / realtime-js: every meta has a unique `phx_ref`, joins are applied before
//! leaves, a join replaces a meta with the same ref, and a leave of an unknown ref is ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::Inner;
use crate::broadcast::{Body, Outgoing};
use crate::registry::{Kind, TopicKey};

/// Long enough to merge a burst, short enough that nobody notices.
pub(crate) const WINDOW: Duration = Duration::from_millis(20);

struct Pending {
    topic: String,
    joins: Map<String, Value>,
    leaves: Map<String, Value>,
}

#[derive(Default)]
pub(crate) struct PresenceDiffs {
    pending: Mutex<HashMap<TopicKey, Pending>>,
    ready: Notify,
}

/// Appends `from`'s `{key: {"metas": [...]}}` entries to `into`.
fn merge(into: &mut Map<String, Value>, from: Option<&Value>) {
    let Some(Value::Object(from)) = from else {
        return;
    };
    for (key, presence) in from {
        let Some(metas) = presence.get("metas").and_then(Value::as_array) else {
            continue;
        };
        let slot = into
            .entry(key.clone())
            .or_insert_with(|| serde_json::json!({"metas": []}));
        if let Some(existing) = slot.get_mut("metas").and_then(Value::as_array_mut) {
            existing.extend(metas.iter().cloned());
        }
    }
}

impl PresenceDiffs {
    /// Queues one diff (`{"joins": .., "leaves": ..}`) for the subscribers of `key`.
    pub(crate) fn add(&self, topic: &str, key: &TopicKey, diff: &Value) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(key.clone()).or_insert_with(|| Pending {
            topic: topic.to_string(),
            joins: Map::new(),
            leaves: Map::new(),
        });
        merge(&mut entry.joins, diff.get("joins"));
        merge(&mut entry.leaves, diff.get("leaves"));
        drop(pending);
        self.ready.notify_one();
    }

    fn take(&self) -> HashMap<TopicKey, Pending> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Sends the merged diffs once per window while there are any.
pub(crate) async fn flush_loop(inner: Arc<Inner>) {
    let mut stop = inner.shutdown.clone();
    loop {
        tokio::select! {
            _ = inner.presence_diffs.ready.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(WINDOW).await;
        for (key, p) in inner.presence_diffs.take() {
            let payload = serde_json::json!({"joins": p.joins, "leaves": p.leaves});
            let out = Outgoing::new(
                p.topic,
                Body::Event {
                    event: "presence_diff",
                    payload: Bytes::from(payload.to_string()),
                },
            );
            inner.registry.fanout(&key, &out, None, Kind::Presence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diffs_of_one_topic_merge_per_key() {
        let d = PresenceDiffs::default();
        let key = TopicKey {
            private: false,
            subtopic: "room".into(),
        };
        d.add(
            "realtime:room",
            &key,
            &json!({"joins": {"a": {"metas": [{"phx_ref": "1"}]}}, "leaves": {}}),
        );
        d.add(
            "realtime:room",
            &key,
            &json!({"joins": {"a": {"metas": [{"phx_ref": "2", "phx_ref_prev": "1"}]},
                              "b": {"metas": [{"phx_ref": "3"}]}},
                    "leaves": {"a": {"metas": [{"phx_ref": "1"}]}}}),
        );
        let taken = d.take();
        let p = &taken[&key];
        assert_eq!(p.topic, "realtime:room");
        assert_eq!(
            Value::Object(p.joins.clone()),
            json!({"a": {"metas": [{"phx_ref": "1"}, {"phx_ref": "2", "phx_ref_prev": "1"}]},
                   "b": {"metas": [{"phx_ref": "3"}]}})
        );
        assert_eq!(
            Value::Object(p.leaves.clone()),
            json!({"a": {"metas": [{"phx_ref": "1"}]}})
        );
        assert!(d.take().is_empty());
    }
}
