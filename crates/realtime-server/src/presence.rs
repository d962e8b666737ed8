//! Phoenix Presence semantics per topic (reference section 4): one meta per tracking channel,
//! grouped by presence key, each meta carrying a unique `phx_ref`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use crate::events::{Event, EventQueue, PresenceChange};
use crate::registry::TopicKey;

/// The owner of entries tracked from SQL (`realtime.track`): at most one meta per key.
const SQL_OWNER: u64 = u64::MAX;

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
    /// Where socket presence changes are reported, so the worker can mirror them for SQL.
    mirror: Option<Arc<EventQueue>>,
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
    pub(crate) fn mirrored(events: Arc<EventQueue>) -> Self {
        Presence {
            mirror: Some(events),
            ..Presence::default()
        }
    }

    fn report(&self, change: PresenceChange) {
        if let Some(events) = &self.mirror {
            events.push(Event::Presence(change));
        }
    }

    fn report_tracked(&self, topic: &TopicKey, key: &str, e: &Entry) {
        self.report(PresenceChange::Tracked {
            topic: topic.subtopic.clone(),
            private: topic.private,
            key: key.to_string(),
            owner: e.owner,
            phx_ref: e.phx_ref.clone(),
            meta_json: Value::Object(e.meta.clone()).to_string(),
        });
    }

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
            self.report_tracked(topic, key, existing);
            return Some(json!({"joins": one(key, joined), "leaves": one(key, old)}));
        }
        let entry = Entry {
            owner,
            phx_ref,
            meta,
        };
        let joined = render(&entry, None);
        self.report_tracked(topic, key, &entry);
        entries.push(entry);
        Some(json!({"joins": one(key, joined), "leaves": {}}))
    }

    /// Makes the SQL-tracked members of `topic` exactly `members` (key → meta); returns the
    /// `presence_diff` payload, or None when nothing changed.
    pub(crate) fn sync_sql(
        &self,
        topic: &TopicKey,
        members: HashMap<String, Map<String, Value>>,
    ) -> Option<Value> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let keys = topics.entry(topic.clone()).or_default();
        let (mut joins, mut leaves) = (Map::new(), Map::new());
        let add = |side: &mut Map<String, Value>, key: &str, meta: Value| {
            let slot = side
                .entry(key.to_string())
                .or_insert_with(|| json!({"metas": []}));
            if let Some(metas) = slot.get_mut("metas").and_then(Value::as_array_mut) {
                metas.push(meta);
            }
        };
        for (key, entries) in keys.iter_mut() {
            let Some(pos) = entries.iter().position(|e| e.owner == SQL_OWNER) else {
                continue;
            };
            match members.get(key) {
                None => add(&mut leaves, key, render(&entries.remove(pos), None)),
                Some(meta) if entries[pos].meta != *meta => {
                    let e = &mut entries[pos];
                    add(&mut leaves, key, render(e, None));
                    let prev = std::mem::replace(&mut e.phx_ref, self.next_ref());
                    e.meta = meta.clone();
                    add(&mut joins, key, render(e, Some(&prev)));
                }
                Some(_) => {}
            }
        }
        keys.retain(|_, entries| !entries.is_empty());
        for (key, meta) in members {
            let entries = keys.entry(key.clone()).or_default();
            if entries.iter().any(|e| e.owner == SQL_OWNER) {
                continue;
            }
            let e = Entry {
                owner: SQL_OWNER,
                phx_ref: self.next_ref(),
                meta,
            };
            add(&mut joins, &key, render(&e, None));
            entries.push(e);
        }
        if keys.is_empty() {
            topics.remove(topic);
        }
        (!joins.is_empty() || !leaves.is_empty()).then(|| json!({"joins": joins, "leaves": leaves}))
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
        if diff.is_some() {
            self.report(PresenceChange::Untracked {
                topic: topic.subtopic.clone(),
                private: topic.private,
                owner,
            });
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
    fn sql_members_join_update_and_leave_beside_sockets() {
        let p = Presence::default();
        p.track(&topic(), 1, "bot", meta(json!({"socket": true})));
        let members = |v: Value| -> HashMap<String, Map<String, Value>> {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, m)| (k.clone(), m.as_object().unwrap().clone()))
                .collect()
        };
        let d = p
            .sync_sql(
                &topic(),
                members(json!({"bot": {"sql": 1}, "job": {"sql": 2}})),
            )
            .unwrap();
        assert_eq!(d["joins"]["bot"]["metas"][0]["sql"], json!(1));
        assert_eq!(d["joins"]["job"]["metas"][0]["sql"], json!(2));
        assert_eq!(d["leaves"], json!({}));
        assert_eq!(
            p.state(&topic())["bot"]["metas"].as_array().unwrap().len(),
            2
        );
        assert!(
            p.sync_sql(
                &topic(),
                members(json!({"bot": {"sql": 1}, "job": {"sql": 2}}))
            )
            .is_none(),
            "no change, no diff"
        );
        let d = p
            .sync_sql(&topic(), members(json!({"bot": {"sql": 3}})))
            .unwrap();
        assert_eq!(d["joins"]["bot"]["metas"][0]["sql"], json!(3));
        assert!(d["joins"]["bot"]["metas"][0]["phx_ref_prev"].is_string());
        assert_eq!(d["leaves"]["bot"]["metas"][0]["sql"], json!(1));
        assert_eq!(d["leaves"]["job"]["metas"][0]["sql"], json!(2));
        p.sync_sql(&topic(), HashMap::new()).unwrap();
        assert_eq!(
            p.state(&topic())["bot"]["metas"].as_array().unwrap().len(),
            1
        );
        assert!(p.state(&topic()).get("job").is_none());
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
