//! Topic names. Clients join `realtime:<subtopic>`; the database, REST, the worker and the
//! broker speak of the subtopic. This is the one place that knows the prefix and the limits.

/// What every client topic starts with.
const PREFIX: &str = "realtime:";

/// Longest topic `realtime.messages` stores: with the prefix, a full topic must fit the
/// one-byte length field of the binary wire format.
pub const MAX_STORED_TOPIC_BYTES: usize = 255 - PREFIX.len();

/// Longest subtopic a join or REST send may name; longer ones are refused before anything
/// copies them. It is above [`MAX_STORED_TOPIC_BYTES`], so no topic the database can store is
/// refused here.
pub(crate) const MAX_SUBTOPIC_BYTES: usize = 255;

/// The subtopic of a client topic, or None when it is not a `realtime:` topic.
pub(crate) fn subtopic(topic: &str) -> Option<&str> {
    topic.strip_prefix(PREFIX)
}

/// The client topic of a subtopic: `realtime:<subtopic>`.
pub(crate) fn full(subtopic: &str) -> String {
    let mut topic = String::with_capacity(PREFIX.len() + subtopic.len());
    topic.push_str(PREFIX);
    topic.push_str(subtopic);
    topic
}

/// A topic as the broker keys it. Public and private channels with the same name are separate
/// namespaces, as in Supabase.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TopicKey {
    pub private: bool,
    pub subtopic: String,
}

impl TopicKey {
    /// The client topic subscribers of this key joined.
    pub(crate) fn full_topic(&self) -> String {
        full(&self.subtopic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip() {
        assert_eq!(subtopic("realtime:room"), Some("room"));
        assert_eq!(subtopic("realtime:"), Some(""));
        assert_eq!(subtopic("phoenix"), None);
        assert_eq!(full("room"), "realtime:room");
        let key = TopicKey {
            private: true,
            subtopic: "a".into(),
        };
        assert_eq!(key.full_topic(), "realtime:a");
    }
}
