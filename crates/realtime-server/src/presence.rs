//! Phoenix Presence semantics per topic (reference section 4): one meta per tracking channel,
//! grouped by presence key, each meta carrying a unique `phx_ref`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use crate::registry::TopicKey;

struct Entry {
    owner: u64,
    phx_ref: String,
    /// User fields only; `phx_ref`/`phx_ref_prev` are added when rendered.
    meta: Map<String, Value>,
}

#[derive(Default)]
pub(crate) struct Presence {
    topics: Mutex<HashMap<TopicKey, HashMap<String, Vec<Entry>>>>,
    counter: AtomicU64,
    owners: AtomicU64,
}

fn render(e: &Entry, prev: Option<&str>) -> Value {
    let mut m = e.meta.clone();
    m.insert("phx_ref".into(), Value::String(e.phx_ref.clone()));
    if let Some(prev) = prev {
        m.insert("phx_ref_prev".into(), Value::String(prev.to_string()));
    }
    Value::Object(m)
}

fn one(key: &str, meta: Value) -> Value {
    let mut m = Map::new();
    m.insert(key.to_string(), json!({ "metas": [meta] }));
    Value::Object(m)
}

impl Presence {
    /// Identifies one joined channel as the owner of at most one meta.
    pub(crate) fn new_owner(&self) -> u64 {
        self.owners.fetch_add(1, Ordering::Relaxed)
    }

    /// Unique per process run; realtime-js only compares refs for equality.
    fn next_ref(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        format!("{t:x}{n:x}")
    }

    /// A fresh presence key for joins that did not choose one (Supabase uses a new UUID).
    pub(crate) fn generate_key(&self) -> String {
        let a = self.next_ref();
        let h = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write(a.as_bytes());
            h.finish()
        };
        let hex = format!("{:016x}{:016x}", h, h.rotate_left(29) ^ (a.len() as u64));
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }

    /// Tracks or updates `owner`'s meta; returns the `presence_diff` payload, or None when the
    /// meta did not change.
    pub(crate) fn track(
        &self,
        topic: &TopicKey,
        owner: u64,
        key: &str,
        meta: Map<String, Value>,
    ) -> Option<Value> {
        let phx_ref = self.next_ref();
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let keys = topics.entry(topic.clone()).or_default();
        let entries = keys.entry(key.to_string()).or_default();
        if let Some(existing) = entries.iter_mut().find(|e| e.owner == owner) {
            if existing.meta == meta {
                return None;
            }
            let old = render(existing, None);
            let prev = std::mem::replace(&mut existing.phx_ref, phx_ref);
            existing.meta = meta;
            let joined = render(existing, Some(&prev));
            return Some(json!({"joins": one(key, joined), "leaves": one(key, old)}));
        }
        let entry = Entry {
            owner,
            phx_ref,
            meta,
        };
        let joined = render(&entry, None);
        entries.push(entry);
        Some(json!({"joins": one(key, joined), "leaves": {}}))
    }

    /// Removes `owner`'s meta; returns the leave diff if there was one.
    pub(crate) fn untrack(&self, topic: &TopicKey, owner: u64) -> Option<Value> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let keys = topics.get_mut(topic)?;
        let mut diff = None;
        keys.retain(|key, entries| {
            if let Some(pos) = entries.iter().position(|e| e.owner == owner) {
                let e = entries.remove(pos);
                diff = Some(json!({"joins": {}, "leaves": one(key, render(&e, None))}));
            }
            !entries.is_empty()
        });
        if keys.is_empty() {
            topics.remove(topic);
        }
        diff
    }

    /// The `presence_state` payload for a topic.
    pub(crate) fn state(&self, topic: &TopicKey) -> Value {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Map::new();
        if let Some(keys) = topics.get(topic) {
            for (key, entries) in keys {
                let metas: Vec<Value> = entries.iter().map(|e| render(e, None)).collect();
                out.insert(key.clone(), json!({ "metas": metas }));
            }
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> TopicKey {
        TopicKey {
            private: false,
            subtopic: "room".into(),
        }
    }

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn track_update_untrack() {
        let p = Presence::default();
        let d = p
            .track(&topic(), 1, "alice", meta(json!({"u": 1})))
            .unwrap();
        let r1 = d["joins"]["alice"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(d["joins"]["alice"]["metas"][0]["u"], json!(1));
        assert_eq!(d["leaves"], json!({}));
        assert!(
            p.track(&topic(), 1, "alice", meta(json!({"u": 1})))
                .is_none()
        );

        let d = p
            .track(&topic(), 1, "alice", meta(json!({"u": 2})))
            .unwrap();
        assert_eq!(d["joins"]["alice"]["metas"][0]["phx_ref_prev"], json!(r1));
        assert_eq!(d["leaves"]["alice"]["metas"][0]["phx_ref"], json!(r1));
        assert_eq!(d["leaves"]["alice"]["metas"][0]["u"], json!(1));

        p.track(&topic(), 2, "alice", meta(json!({"u": 3})));
        assert_eq!(
            p.state(&topic())["alice"]["metas"]
                .as_array()
                .unwrap()
                .len(),
            2
        );

        let d = p.untrack(&topic(), 1).unwrap();
        assert_eq!(d["leaves"]["alice"]["metas"][0]["u"], json!(2));
        assert!(p.untrack(&topic(), 1).is_none());
        p.untrack(&topic(), 2);
        assert_eq!(p.state(&topic()), json!({}));
        assert!(p.topics.lock().unwrap().is_empty());
    }

    #[test]
    fn generated_keys_are_unique_uuid_shaped() {
        let p = Presence::default();
        let a = p.generate_key();
        let b = p.generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
