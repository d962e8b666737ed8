//! In-backend tests (`cargo pgrx test`): each runs inside a transaction that is rolled back,
//! so they cover the SQL surface as one session sees it, never delivery (see pgrx-tests/).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn send_injects_an_id_and_sets_the_topic() {
        for _ in 0..3 {
            Spi::run(r#"SELECT realtime.send('{"text":"hi"}', 'message', 'room-1', false)"#)
                .unwrap();
        }
        // Each payload is exactly the object sent plus its own row's id.
        let same = Spi::get_one::<bool>(
            "SELECT bool_and(payload = jsonb_build_object('text', 'hi', 'id', id::text)
                             AND topic = 'room-1' AND NOT private)
                    AND count(DISTINCT id) = 3
               FROM realtime.messages",
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
                offset: None,
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

    #[pg_test]
    fn admin_functions_and_presence_events_are_not_for_public() {
        let public = Spi::get_one::<bool>(
            "SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE'))
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'realtime'
                AND p.proname IN ('connections', 'channels', 'disconnect', 'disconnect_user',
                                  'explain_join')",
        )
        .unwrap();
        assert_eq!(public, Some(false));
        let functions = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'realtime'
                AND p.proname IN ('connections', 'channels', 'disconnect', 'disconnect_user',
                                  'explain_join')",
        )
        .unwrap();
        assert_eq!(functions, Some(5));
        let readable = Spi::get_one::<bool>(
            "SELECT has_table_privilege('public', 'realtime.presence_events', 'SELECT')
                 OR has_table_privilege('public', 'realtime.presence_events', 'INSERT')",
        )
        .unwrap();
        assert_eq!(readable, Some(false));
        // Grantable on purpose.
        Spi::run("CREATE ROLE realtime_operator NOLOGIN").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION realtime.connections() TO realtime_operator").unwrap();
        assert_eq!(
            Spi::get_one::<bool>(
                "SELECT has_function_privilege('realtime_operator', 'realtime.connections()', 'EXECUTE')"
            )
            .unwrap(),
            Some(true)
        );
    }

    #[pg_test]
    fn the_replay_horizon_is_the_owners_alone() {
        for table in ["realtime.replay_horizon", "realtime.replay_days"] {
            let open = Spi::get_one_with_args::<bool>(
                "SELECT has_table_privilege('public', $1, 'SELECT')
                     OR has_table_privilege('public', $1, 'INSERT')
                     OR has_table_privilege('public', $1, 'UPDATE')
                     OR has_table_privilege('public', $1, 'DELETE')",
                &[table.into()],
            )
            .unwrap();
            assert_eq!(open, Some(false), "{table}");
        }
        // One row, always.
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM realtime.replay_horizon").unwrap(),
            Some(1)
        );
    }

    /// Policies for the explain_join tests: `allowed` may be read and written (broadcast only),
    /// `boom` raises, anything else is refused.
    fn explain_policies() {
        Spi::run("SELECT realtime.setup_api_roles()").unwrap();
        Spi::run(
            "CREATE FUNCTION public.explain_boom() RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no entry to %', realtime.topic(); END $$;
             GRANT EXECUTE ON FUNCTION public.explain_boom() TO authenticated;
             CREATE POLICY explain_read ON realtime.messages FOR SELECT TO authenticated
               USING (CASE WHEN realtime.topic() = 'boom' THEN public.explain_boom()
                           ELSE realtime.topic() = 'allowed' END);
             CREATE POLICY explain_write ON realtime.messages FOR INSERT TO authenticated
               WITH CHECK (realtime.topic() = 'allowed' AND extension = 'broadcast'
                           AND current_setting('request.jwt.claim.sub', true) = 'user-1');",
        )
        .unwrap();
    }

    fn explain(topic: &str, claims: &str) -> Vec<(String, bool, Option<String>)> {
        explain_on(topic, claims, true)
    }

    /// explain_join's rows for a token with `claims` that expires in an hour.
    fn explain_on(topic: &str, claims: &str, private: bool) -> Vec<(String, bool, Option<String>)> {
        Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT \"check\", allowed, reason FROM realtime.explain_join($1,
                        $2::jsonb || jsonb_build_object('exp', extract(epoch from now())::bigint + 3600),
                        $3)",
                    None,
                    &[topic.into(), claims.into(), private.into()],
                )
                .unwrap();
            rows.map(|r| {
                (
                    r.get::<String>(1).unwrap().unwrap(),
                    r.get::<bool>(2).unwrap().unwrap(),
                    r.get::<String>(3).unwrap(),
                )
            })
            .collect()
        })
    }

    fn verdict<'a>(
        rows: &'a [(String, bool, Option<String>)],
        check: &str,
    ) -> (bool, Option<&'a str>) {
        let row = rows
            .iter()
            .find(|r| r.0 == check)
            .unwrap_or_else(|| panic!("no {check} row in {rows:?}"));
        (row.1, row.2.as_deref())
    }

    #[pg_test]
    fn explain_join_shows_each_policy_verdict() {
        explain_policies();
        let user = r#"{"role": "authenticated", "sub": "user-1"}"#;
        let rows = explain("allowed", user);
        let checks: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            checks,
            [
                "token",
                "role",
                "read broadcast",
                "read presence",
                "write broadcast",
                "write presence",
                "join"
            ]
        );
        assert_eq!(verdict(&rows, "read broadcast"), (true, None));
        assert_eq!(verdict(&rows, "read presence"), (true, None));
        assert_eq!(verdict(&rows, "write broadcast"), (true, None));
        assert_eq!(
            verdict(&rows, "write presence"),
            (
                false,
                Some(
                    "Unauthorized: You do not have permissions to write to this Channel topic: allowed"
                )
            )
        );
        assert_eq!(verdict(&rows, "join"), (true, None));

        // The claims reach the policies: another sub may read but not write.
        let other = explain("allowed", r#"{"role": "authenticated", "sub": "user-2"}"#);
        assert!(verdict(&other, "read broadcast").0);
        assert!(!verdict(&other, "write broadcast").0);

        let denied = explain("secret", user);
        let refused = Some(
            "Unauthorized: You do not have permissions to read from this Channel topic: secret",
        );
        assert_eq!(verdict(&denied, "read broadcast"), (false, refused));
        assert_eq!(verdict(&denied, "join"), (false, refused));
    }

    #[pg_test]
    fn explain_join_shows_the_error_a_policy_raised() {
        explain_policies();
        let rows = explain("boom", r#"{"role": "authenticated"}"#);
        assert_eq!(
            verdict(&rows, "read broadcast"),
            (false, Some("Unauthorized: no entry to boom"))
        );
        assert_eq!(
            verdict(&rows, "join"),
            (false, Some("Unauthorized: no entry to boom"))
        );
        // Every check ran in a subtransaction that was rolled back: no probe row is left.
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM realtime.messages").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn explain_join_refuses_roles_a_token_may_not_become() {
        let superuser = Spi::get_one::<String>("SELECT current_user::text")
            .unwrap()
            .unwrap();
        let rows = explain("room", &format!(r#"{{"role": "{superuser}"}}"#));
        let reason = format!(
            "Unauthorized: role \"{superuser}\" is a superuser; a token may not become one"
        );
        assert_eq!(verdict(&rows, "role"), (false, Some(reason.as_str())));
        assert_eq!(verdict(&rows, "join"), (false, Some(reason.as_str())));
        assert!(!rows.iter().any(|r| r.0 == "read broadcast"));

        let rows = explain("room", r#"{"role": "no_such_role"}"#);
        assert_eq!(
            verdict(&rows, "role"),
            (
                false,
                Some("Unauthorized: role \"no_such_role\" does not exist")
            )
        );
    }

    #[pg_test]
    fn explain_join_checks_the_token_and_public_channels() {
        let rows = Spi::get_two::<bool, String>(
            "SELECT allowed, reason FROM realtime.explain_join('room', '{\"role\": \"anon\"}')
              WHERE \"check\" = 'token'",
        )
        .unwrap();
        assert_eq!(
            rows,
            (
                Some(false),
                Some("InvalidJWTToken: Fields `role` and `exp` are required in JWT".into())
            )
        );
        let public = explain_on("lobby", r#"{"role": "anon"}"#, false);
        let checks: Vec<&str> = public.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(checks, ["token", "join"], "public: {public:?}");
    }

    /// The worker of the test cluster serves another database, so it never answers: the
    /// caller gets an error after its wait instead of hanging.
    #[pg_test(error = "the realtime worker did not answer within 10 s")]
    fn a_request_nobody_answers_fails_cleanly() {
        Spi::run("SELECT * FROM realtime.connections()").unwrap();
    }
}
