//! Coalesces `presence_diff`s per topic over a short window, so a room where N members join
//! at once costs about N × (window count) frames instead of N². Merging is safe for
//! phoenix.js / realtime-js: every meta has a unique `phx_ref`, joins are applied before
//! leaves, a join replaces a meta with the same ref, and a leave of an unknown ref is ignored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::topic::TopicKey;

/// Long enough to merge a burst, short enough that nobody notices.
pub(crate) const WINDOW: Duration = Duration::from_millis(20);

pub(crate) struct Pending {
    /// The client topic the diff goes out on.
    pub topic: String,
    pub joins: Map<String, Value>,
    pub leaves: Map<String, Value>,
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
    pub(crate) fn add(&self, key: &TopicKey, diff: &Value) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(key.clone()).or_insert_with(|| Pending {
            topic: key.full_topic(),
            joins: Map::new(),
            leaves: Map::new(),
        });
        merge(&mut entry.joins, diff.get("joins"));
        merge(&mut entry.leaves, diff.get("leaves"));
        drop(pending);
        self.ready.notify_one();
    }

    /// Resolves when a diff was added since the last call.
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// The merged diffs so far, per topic.
    pub(crate) fn take(&self) -> HashMap<TopicKey, Pending> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
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
            &key,
            &json!({"joins": {"a": {"metas": [{"phx_ref": "1"}]}}, "leaves": {}}),
        );
        d.add(
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
