//! Phoenix Presence semantics per topic: one meta per tracking channel,
//! grouped by presence key, each meta carrying a unique `phx_ref`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use crate::events::{Event, EventQueue, PresenceChange};
use crate::protocol::json_string;
use crate::registry::TopicKey;

/// The owner of entries tracked from SQL (`realtime.track`): at most one meta per key.
const SQL_OWNER: u64 = u64::MAX;

struct Entry {
    owner: u64,
    phx_ref: String,
    /// User fields only, as compact JSON object text (a tree of `Value`s costs many times its
    /// text); `phx_ref`/`phx_ref_prev` are added when rendered.
    meta: Box<str>,
}

#[derive(Default)]
struct Topic {
    keys: HashMap<String, Vec<Entry>>,
    /// Key and meta bytes of every entry, for `max_presence_bytes_per_topic`.
    bytes: usize,
    /// The rendered `presence_state`, until the next change: joins (and re-join storms) copy
    /// it instead of rendering the whole room again.
    state: Option<Arc<str>>,
}

fn entry_bytes(key: &str, meta: &str) -> usize {
    key.len() + meta.len()
}

/// Bounds of one topic's presence (from [`crate::Config`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub metas_per_key: usize,
    pub keys_per_topic: usize,
    pub bytes_per_topic: usize,
}

impl Limits {
    pub(crate) fn of(cfg: &crate::Config) -> Limits {
        Limits {
            metas_per_key: cfg.max_presence_metas_per_key,
            keys_per_topic: cfg.max_presence_keys_per_topic,
            bytes_per_topic: cfg.max_presence_bytes_per_topic,
        }
    }
}

/// Why a track was refused; its text is [`crate::refusal::ReplyError`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TrackError {
    TooManyMetas,
    TooManyKeys,
    TopicFull,
}

#[derive(Default)]
pub(crate) struct Presence {
    topics: Mutex<HashMap<TopicKey, Topic>>,
    counter: AtomicU64,
    owners: AtomicU64,
    /// Where socket presence changes are reported, so the worker can mirror them for SQL.
    mirror: Option<Arc<EventQueue>>,
}

/// A meta as stored: the user's object without `phx_ref`/`phx_ref_prev` (the server sets
/// those), as compact JSON text.
pub(crate) fn stored_meta(mut meta: Map<String, Value>) -> Box<str> {
    meta.remove("phx_ref");
    meta.remove("phx_ref_prev");
    Value::Object(meta).to_string().into_boxed_str()
}

/// Whether a JSON value holds a NUL character anywhere (PostgreSQL's jsonb cannot).
pub(crate) fn contains_nul(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => {
                for (k, v) in o {
                    if k.contains('\0') {
                        return true;
                    }
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    false
}

/// The meta as clients see it: `{"phx_ref":..,["phx_ref_prev":..,] <user fields>}`.
fn render_text(e: &Entry, prev: Option<&str>) -> String {
    let mut out = String::with_capacity(e.meta.len() + 64);
    out.push_str("{\"phx_ref\":");
    out.push_str(&json_string(&e.phx_ref));
    if let Some(prev) = prev {
        out.push_str(",\"phx_ref_prev\":");
        out.push_str(&json_string(prev));
    }
    // The stored text is a compact object: `{}` or `{"k":v,...}`.
    let fields = e.meta.get(1..).unwrap_or("}");
    if !fields.starts_with('}') {
        out.push(',');
    }
    out.push_str(fields);
    out
}

/// One meta for a diff (a single meta, bounded by the meta size limit).
fn render(e: &Entry, prev: Option<&str>) -> Value {
    serde_json::from_str(&render_text(e, prev)).unwrap_or_else(|_| json!({}))
}

fn one(key: &str, meta: Value) -> Value {
    let mut m = Map::new();
    m.insert(key.to_string(), json!({ "metas": [meta] }));
    Value::Object(m)
}

fn render_state(topic: &Topic) -> String {
    let mut out = String::from("{");
    for (i, (key, entries)) in topic.keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(key));
        out.push_str(":{\"metas\":[");
        for (j, e) in entries.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&render_text(e, None));
        }
        out.push_str("]}");
    }
    out.push('}');
    out
}

impl Presence {
    pub(crate) fn mirrored(events: Arc<EventQueue>) -> Self {
        Presence {
            mirror: Some(events),
            ..Presence::default()
        }
    }

    /// Keys, and key and meta bytes, over all topics.
    pub(crate) fn totals(&self) -> (usize, usize) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.values().fold((0, 0), |(keys, bytes), t| {
            (keys + t.keys.len(), bytes + t.bytes)
        })
    }

    /// Keys per topic.
    pub(crate) fn keys_by_topic(&self) -> Vec<(TopicKey, usize)> {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .iter()
            .map(|(k, t)| (k.clone(), t.keys.len()))
            .collect()
    }

    fn report(&self, change: PresenceChange) {
        if let Some(events) = &self.mirror {
            events.push(Event::Presence(change));
        }
    }

    fn report_tracked(&self, topic: &TopicKey, key: &str, e: &Entry, updated: bool) {
        self.report(PresenceChange::Tracked {
            updated,
            topic: topic.subtopic.clone(),
            private: topic.private,
            key: key.to_string(),
            owner: e.owner,
            phx_ref: e.phx_ref.clone(),
            meta_json: e.meta.to_string(),
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

    /// Tracks or updates `owner`'s meta (see [`stored_meta`]); returns the `presence_diff`
    /// payload, or None when the meta did not change, or why it was refused.
    pub(crate) fn track(
        &self,
        topic: &TopicKey,
        owner: u64,
        key: &str,
        meta: Box<str>,
        limits: Limits,
    ) -> Result<Option<Value>, TrackError> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let t = topics.entry(topic.clone()).or_default();
        let existing = t
            .keys
            .get(key)
            .and_then(|entries| entries.iter().find(|e| e.owner == owner));
        if existing.is_some_and(|e| e.meta == meta) {
            return Ok(None);
        }
        let freed = existing.map_or(0, |e| entry_bytes(key, &e.meta));
        let refused = if existing.is_none() {
            match t.keys.get(key) {
                Some(entries) if entries.len() >= limits.metas_per_key.max(1) => {
                    Some(TrackError::TooManyMetas)
                }
                None if t.keys.len() >= limits.keys_per_topic.max(1) => {
                    Some(TrackError::TooManyKeys)
                }
                _ => None,
            }
        } else {
            None
        };
        let bytes = t.bytes - freed + entry_bytes(key, &meta);
        let refused = refused.or((bytes > limits.bytes_per_topic).then_some(TrackError::TopicFull));
        if let Some(e) = refused {
            if t.keys.is_empty() {
                topics.remove(topic);
            }
            return Err(e);
        }
        t.bytes = bytes;
        t.state = None;
        let phx_ref = self.next_ref();
        let entries = t.keys.entry(key.to_string()).or_default();
        if let Some(existing) = entries.iter_mut().find(|e| e.owner == owner) {
            let old = render(existing, None);
            let prev = std::mem::replace(&mut existing.phx_ref, phx_ref);
            existing.meta = meta;
            let joined = render(existing, Some(&prev));
            self.report_tracked(topic, key, existing, true);
            return Ok(Some(
                json!({"joins": one(key, joined), "leaves": one(key, old)}),
            ));
        }
        let entry = Entry {
            owner,
            phx_ref,
            meta,
        };
        let joined = render(&entry, None);
        self.report_tracked(topic, key, &entry, false);
        entries.push(entry);
        Ok(Some(json!({"joins": one(key, joined), "leaves": {}})))
    }

    /// Makes the SQL-tracked members of `topic` exactly `members` (key → meta, see
    /// [`stored_meta`]); returns the `presence_diff` payload, or None when nothing changed.
    /// The database bounds these, so the topic limits do not apply to them.
    pub(crate) fn sync_sql(
        &self,
        topic: &TopicKey,
        members: HashMap<String, Box<str>>,
    ) -> Option<Value> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let t = topics.entry(topic.clone()).or_default();
        let (mut joins, mut leaves) = (Map::new(), Map::new());
        let add = |side: &mut Map<String, Value>, key: &str, meta: Value| {
            let slot = side
                .entry(key.to_string())
                .or_insert_with(|| json!({"metas": []}));
            if let Some(metas) = slot.get_mut("metas").and_then(Value::as_array_mut) {
                metas.push(meta);
            }
        };
        let mut bytes = t.bytes;
        for (key, entries) in t.keys.iter_mut() {
            let Some(pos) = entries.iter().position(|e| e.owner == SQL_OWNER) else {
                continue;
            };
            match members.get(key) {
                None => {
                    let e = entries.remove(pos);
                    bytes -= entry_bytes(key, &e.meta);
                    add(&mut leaves, key, render(&e, None));
                }
                Some(meta) if entries[pos].meta != *meta => {
                    let e = &mut entries[pos];
                    add(&mut leaves, key, render(e, None));
                    bytes = bytes - entry_bytes(key, &e.meta) + entry_bytes(key, meta);
                    let prev = std::mem::replace(&mut e.phx_ref, self.next_ref());
                    e.meta = meta.clone();
                    add(&mut joins, key, render(e, Some(&prev)));
                }
                Some(_) => {}
            }
        }
        t.keys.retain(|_, entries| !entries.is_empty());
        for (key, meta) in members {
            let entries = t.keys.entry(key.clone()).or_default();
            if entries.iter().any(|e| e.owner == SQL_OWNER) {
                continue;
            }
            bytes += entry_bytes(&key, &meta);
            let e = Entry {
                owner: SQL_OWNER,
                phx_ref: self.next_ref(),
                meta,
            };
            add(&mut joins, &key, render(&e, None));
            entries.push(e);
        }
        t.bytes = bytes;
        let changed = !joins.is_empty() || !leaves.is_empty();
        if changed {
            t.state = None;
        }
        if t.keys.is_empty() {
            topics.remove(topic);
        }
        changed.then(|| json!({"joins": joins, "leaves": leaves}))
    }

    /// Removes `owner`'s meta; returns the leave diff if there was one.
    pub(crate) fn untrack(&self, topic: &TopicKey, owner: u64) -> Option<Value> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let t = topics.get_mut(topic)?;
        let mut diff = None;
        let mut freed = 0;
        let mut left_key = None;
        t.keys.retain(|key, entries| {
            if let Some(pos) = entries.iter().position(|e| e.owner == owner) {
                let e = entries.remove(pos);
                freed += entry_bytes(key, &e.meta);
                left_key = Some(key.clone());
                diff = Some(json!({"joins": {}, "leaves": one(key, render(&e, None))}));
            }
            !entries.is_empty()
        });
        if diff.is_some() {
            t.bytes -= freed;
            t.state = None;
        }
        if t.keys.is_empty() {
            topics.remove(topic);
        }
        if let Some(key) = left_key {
            self.report(PresenceChange::Untracked {
                topic: topic.subtopic.clone(),
                private: topic.private,
                key,
                owner,
            });
        }
        diff
    }

    /// The `presence_state` payload for a topic, rendered once per change of the topic.
    pub(crate) fn state(&self, topic: &TopicKey) -> Arc<str> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = topics.get_mut(topic) else {
            return Arc::from("{}");
        };
        if let Some(state) = &t.state {
            return state.clone();
        }
        let state: Arc<str> = render_state(t).into();
        t.state = Some(state.clone());
        state
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

    fn meta(v: Value) -> Box<str> {
        stored_meta(v.as_object().unwrap().clone())
    }

    const NO_LIMITS: Limits = Limits {
        metas_per_key: usize::MAX,
        keys_per_topic: usize::MAX,
        bytes_per_topic: usize::MAX,
    };

    fn track(p: &Presence, owner: u64, key: &str, m: Value) -> Option<Value> {
        p.track(&topic(), owner, key, meta(m), NO_LIMITS).unwrap()
    }

    fn state(p: &Presence) -> Value {
        serde_json::from_str(&p.state(&topic())).unwrap()
    }

    #[test]
    fn reported_changes_say_join_update_and_which_key_left() {
        let events = Arc::new(EventQueue::new(crate::wake::WakeFd::new().unwrap()));
        let p = Presence::mirrored(events.clone());
        track(&p, 1, "alice", json!({"u": 1}));
        track(&p, 1, "alice", json!({"u": 2}));
        p.untrack(&topic(), 1);
        let changes: Vec<(bool, bool, String)> = events
            .drain()
            .into_iter()
            .map(|e| match e {
                Event::Presence(PresenceChange::Tracked { updated, key, .. }) => {
                    (true, updated, key)
                }
                Event::Presence(PresenceChange::Untracked { key, .. }) => (false, false, key),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            changes,
            [
                (true, false, "alice".to_string()),
                (true, true, "alice".to_string()),
                (false, false, "alice".to_string()),
            ]
        );
    }

    #[test]
    fn track_update_untrack() {
        let p = Presence::default();
        let d = track(&p, 1, "alice", json!({"u": 1})).unwrap();
        let r1 = d["joins"]["alice"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(d["joins"]["alice"]["metas"][0]["u"], json!(1));
        assert_eq!(d["leaves"], json!({}));
        assert!(track(&p, 1, "alice", json!({"u": 1})).is_none());

        let d = track(&p, 1, "alice", json!({"u": 2})).unwrap();
        assert_eq!(d["joins"]["alice"]["metas"][0]["phx_ref_prev"], json!(r1));
        assert_eq!(d["leaves"]["alice"]["metas"][0]["phx_ref"], json!(r1));
        assert_eq!(d["leaves"]["alice"]["metas"][0]["u"], json!(1));

        track(&p, 2, "alice", json!({"u": 3}));
        assert_eq!(state(&p)["alice"]["metas"].as_array().unwrap().len(), 2);

        let d = p.untrack(&topic(), 1).unwrap();
        assert_eq!(d["leaves"]["alice"]["metas"][0]["u"], json!(2));
        assert!(p.untrack(&topic(), 1).is_none());
        p.untrack(&topic(), 2);
        assert_eq!(state(&p), json!({}));
        assert!(p.topics.lock().unwrap().is_empty());
    }

    #[test]
    fn sql_members_join_update_and_leave_beside_sockets() {
        let p = Presence::default();
        track(&p, 1, "bot", json!({"socket": true}));
        let members = |v: Value| -> HashMap<String, Box<str>> {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, m)| (k.clone(), meta(m.clone())))
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
        assert_eq!(state(&p)["bot"]["metas"].as_array().unwrap().len(), 2);
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
        assert_eq!(state(&p)["bot"]["metas"].as_array().unwrap().len(), 1);
        assert!(state(&p).get("job").is_none());
    }

    #[test]
    fn caps_refuse_and_leave_the_topic_as_it_was() {
        let p = Presence::default();
        let limits = Limits {
            metas_per_key: 2,
            keys_per_topic: 2,
            bytes_per_topic: 100,
        };
        let t = |owner, key: &str, m: Value| p.track(&topic(), owner, key, meta(m), limits);
        assert!(t(1, "a", json!({})).is_ok());
        assert!(t(2, "a", json!({})).is_ok());
        assert_eq!(t(3, "a", json!({})), Err(TrackError::TooManyMetas));
        assert!(t(3, "b", json!({})).is_ok());
        assert_eq!(t(4, "c", json!({})), Err(TrackError::TooManyKeys));
        // An update of a meta that is there is not a new meta.
        assert!(t(1, "a", json!({"x": 1})).is_ok());
        let big = "x".repeat(100);
        assert_eq!(t(1, "a", json!({"big": big})), Err(TrackError::TopicFull));
        assert_eq!(state(&p)["a"]["metas"][0]["x"], json!(1));
        p.untrack(&topic(), 1);
        p.untrack(&topic(), 2);
        p.untrack(&topic(), 3);
        assert!(p.topics.lock().unwrap().is_empty());
        assert_eq!(t(4, "c", json!({})).map(|d| d.is_some()), Ok(true));
    }

    #[test]
    fn state_is_rendered_once_per_change() {
        let p = Presence::default();
        track(&p, 1, "a", json!({"n": 1, "phx_ref": "forged"}));
        let s1 = p.state(&topic());
        assert!(Arc::ptr_eq(&s1, &p.state(&topic())), "cached");
        let v = state(&p);
        assert_eq!(v["a"]["metas"][0]["n"], json!(1));
        assert_ne!(v["a"]["metas"][0]["phx_ref"], json!("forged"));
        track(&p, 2, "b", json!({}));
        assert!(
            !Arc::ptr_eq(&s1, &p.state(&topic())),
            "a change renders anew"
        );
        assert_eq!(state(&p)["b"]["metas"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn nul_is_found_anywhere() {
        assert!(contains_nul(&json!({"a": ["x", {"b": "\u{0}"}]})));
        assert!(contains_nul(&json!({"a\u{0}": 1})));
        assert!(!contains_nul(&json!({"a": "\\u0000"})));
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
