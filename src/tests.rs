//! In-backend tests (`cargo pgrx test`): each runs inside a transaction that is rolled back,
//! so they cover the SQL surface as one session sees it, never delivery (see pgrx-tests/).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn send_injects_an_id_and_sets_the_topic() {
        Spi::run(r#"SELECT realtime.send('{"text":"hi"}', 'message', 'room-1', false)"#).unwrap();
        let same = Spi::get_one::<bool>(
            "SELECT payload->>'id' = id::text AND topic = 'room-1' AND NOT private FROM realtime.messages",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        // send leaves realtime.topic set for the rest of the transaction, as Supabase does.
        assert_eq!(
            Spi::get_one::<String>("SELECT realtime.topic()")
                .unwrap()
                .as_deref(),
            Some("room-1")
        );
    }

    #[pg_test]
    fn send_binary_stores_the_bytes() {
        Spi::run(r"SELECT realtime.send_binary('\x0001ff', 'bin', 'room-1')").unwrap();
        let row = Spi::get_two::<Vec<u8>, bool>(
            "SELECT binary_payload, payload IS NULL FROM realtime.messages",
        )
        .unwrap();
        assert_eq!(row, (Some(vec![0, 1, 255]), Some(true)));
    }

    #[pg_test(
        error = "invalid request from another pg_realtime node: a standby's envelope may not carry database messages or SQL presence"
    )]
    fn a_relayed_envelope_cannot_carry_database_messages() {
        use realtime_server::bus::{Envelope, Frame};
        let forged = Envelope {
            node: 1,
            frames: vec![Frame::Database {
                topic: "room".into(),
                private: true,
                event: "e".into(),
                id: "x".into(),
                binary: false,
                payload: b"{}".to_vec(),
            }],
        };
        Spi::run_with_args("SELECT realtime._node_relay($1)", &[forged.encode().into()]).unwrap();
    }

    #[pg_test(
        error = "invalid request from another pg_realtime node: not a pg_realtime bus envelope: Hit the end of buffer, expected more data"
    )]
    fn a_relayed_envelope_must_decode() {
        Spi::run(r"SELECT realtime._node_relay('\x01')").unwrap();
    }

    #[pg_test]
    fn node_functions_are_not_for_public() {
        let public = Spi::get_one::<bool>(
            "SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE'))
               FROM pg_proc p WHERE p.proname IN ('_node_relay', '_node_authorize')",
        )
        .unwrap();
        assert_eq!(public, Some(false));
    }

    #[pg_test]
    fn topic_is_null_when_unset() {
        assert_eq!(
            Spi::get_one::<String>("SELECT realtime.topic()").unwrap(),
            None
        );
    }

    #[pg_test(error = "realtime.send payload must be a JSON object, not array")]
    fn send_refuses_a_non_object_payload() {
        Spi::run("SELECT realtime.send('[1]', 'e', 't')").unwrap();
    }

    #[pg_test(error = "Failed to process the row: Unexpected operation type: MERGE")]
    fn broadcast_changes_refuses_unknown_operations() {
        Spi::run(
            "SELECT realtime.broadcast_changes('t', 'e', 'MERGE', 'x', 'public', NULL::record, NULL::record)",
        )
        .unwrap();
    }

    #[pg_test]
    fn every_public_function_has_a_comment() {
        let missing = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'realtime' AND obj_description(p.oid, 'pg_proc') IS NULL",
        )
        .unwrap();
        assert_eq!(missing, Some(0));
    }

    #[pg_test]
    fn stats_start_at_zero_failures() {
        assert_eq!(
            Spi::get_one::<i64>("SELECT failed_sends FROM realtime.stats()").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn sql_presence_tracks_updates_and_untracks() {
        Spi::run(r#"SELECT realtime.track('room-1', 'job', '{"a":1}')"#).unwrap();
        Spi::run(r#"SELECT realtime.track('room-1', 'job', '{"a":2}', false, interval '1 hour')"#)
            .unwrap();
        let row = Spi::get_two::<String, bool>(
            "SELECT payload->>'a', expires_at > now() FROM realtime.presence('room-1')
              WHERE key = 'job' AND origin = 'sql'",
        )
        .unwrap();
        assert_eq!(row, (Some("2".into()), Some(true)));
        assert_eq!(
            Spi::get_two::<i64, i64>("SELECT keys, connections FROM realtime.occupancy('room-1')")
                .unwrap(),
            (Some(1), Some(0))
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT realtime.untrack('room-1', 'job')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM realtime.presence('room-1')").unwrap(),
            Some(0)
        );
    }

    #[pg_test(error = "presence payload must be a JSON object")]
    fn sql_presence_payload_must_be_an_object() {
        Spi::run("SELECT realtime.track('room-1', 'k', '[1]')").unwrap();
    }

    #[pg_test(error = "presence key must not be empty")]
    fn sql_presence_key_must_not_be_empty() {
        Spi::run("SELECT realtime.track('room-1', '', '{}')").unwrap();
    }
}
