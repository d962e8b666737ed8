//! The SQL surface, partitions, retention and the worker's lifecycle, against a real cluster.

use postgres::error::SqlState;
use realtime_integration_tests::{Cluster, eventually, sqlstate};
use std::time::Duration;

fn message(err: &postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

#[test]
fn send_stores_a_row_with_an_injected_id() {
    let cluster = Cluster::start("send_stores", &[]);
    let mut c = cluster.connect();
    c.batch_execute(
        r#"SELECT realtime.send('{"text":"hi"}', 'message', 'room-1', false);
           SELECT realtime.send('{"id":"mine","text":"kept"}', 'message', 'room-1');"#,
    )
    .unwrap();
    let rows = c
        .query(
            "SELECT payload, id::text, topic, event, private, extension FROM realtime.messages ORDER BY private",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    let public: serde_json::Value = rows[0].get(0);
    assert_eq!(public["text"], "hi");
    assert_eq!(
        public["id"].as_str(),
        Some(rows[0].get::<_, String>(1).as_str())
    );
    assert_eq!(rows[0].get::<_, String>(2), "room-1");
    assert_eq!(rows[0].get::<_, String>(3), "message");
    assert!(!rows[0].get::<_, bool>(4));
    assert_eq!(rows[0].get::<_, String>(5), "broadcast");
    let private: serde_json::Value = rows[1].get(0);
    assert_eq!(private["id"], "mine", "an existing id is kept");
    assert!(rows[1].get::<_, bool>(4), "send defaults to private");
}

#[test]
fn broadcast_changes_from_a_trigger_stores_the_supabase_payload() {
    let cluster = Cluster::start("broadcast_changes", &[]);
    let mut c = cluster.connect();
    c.batch_execute(
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text);
         CREATE FUNCTION public.notes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM realtime.broadcast_changes('notes:' || coalesce(NEW.id, OLD.id), TG_OP, TG_OP,
                                              TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
           RETURN NULL;
         END $$;
         CREATE TRIGGER notes_changed AFTER INSERT OR UPDATE OR DELETE ON public.notes
           FOR EACH ROW EXECUTE FUNCTION public.notes_changed();
         INSERT INTO public.notes VALUES (1, 'a');
         UPDATE public.notes SET body = 'b' WHERE id = 1;
         DELETE FROM public.notes;",
    )
    .unwrap();
    let rows = c
        .query("SELECT topic, event, payload, private FROM realtime.messages ORDER BY inserted_at, event", &[])
        .unwrap();
    let mut by_event = std::collections::HashMap::new();
    for row in &rows {
        assert_eq!(row.get::<_, String>(0), "notes:1");
        assert!(row.get::<_, bool>(3));
        by_event.insert(row.get::<_, String>(1), row.get::<_, serde_json::Value>(2));
    }
    let insert = &by_event["INSERT"];
    assert_eq!(insert["operation"], "INSERT");
    assert_eq!(insert["table"], "notes");
    assert_eq!(insert["schema"], "public");
    assert_eq!(insert["record"], serde_json::json!({"id": 1, "body": "a"}));
    assert!(insert["old_record"].is_null());
    assert!(insert["id"].is_string());
    assert_eq!(by_event["UPDATE"]["old_record"]["body"], "a");
    assert_eq!(by_event["UPDATE"]["record"]["body"], "b");
    assert!(by_event["DELETE"]["record"].is_null());

    let err = c
        .batch_execute(
            "SELECT realtime.broadcast_changes('t', 'e', 'TRUNCATE', 'notes', 'public', NULL::record, NULL::record)",
        )
        .unwrap_err();
    assert!(
        message(&err).contains("Unexpected operation type: TRUNCATE"),
        "{err:?}"
    );
    assert_eq!(err.code(), Some(&SqlState::INVALID_PARAMETER_VALUE));
    let err = c
        .batch_execute(
            "SELECT realtime.broadcast_changes('t', 'e', 'INSERT', 'notes', 'public', NULL::record, NULL::record, 'STATEMENT')",
        )
        .unwrap_err();
    assert!(message(&err).contains("not for each statement"), "{err:?}");
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
}

#[test]
fn bad_input_gets_clear_errors_with_sqlstates() {
    let cluster = Cluster::start("bad_input", &["realtime.max_payload_size = 1kB"]);
    let mut c = cluster.connect();
    let cases: &[(&str, SqlState)] = &[
        (
            "SELECT realtime.send('{}', 'e', NULL)",
            SqlState::NULL_VALUE_NOT_ALLOWED,
        ),
        (
            "SELECT realtime.send('{}', 'e', '')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT realtime.send('{}', NULL, 't')",
            SqlState::NULL_VALUE_NOT_ALLOWED,
        ),
        (
            "SELECT realtime.send('{}', '', 't')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT realtime.send('[1,2]', 'e', 't')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT realtime.send('\"text\"', 'e', 't')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT realtime.send(NULL, 'e', 't')",
            SqlState::NULL_VALUE_NOT_ALLOWED,
        ),
        (
            "SELECT realtime.send(jsonb_build_object('big', repeat('x', 2000)), 'e', 't')",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        (
            "SELECT realtime.send('{}', 'e', repeat('t', 300))",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SELECT realtime.send_binary(NULL, 'e', 't')",
            SqlState::NULL_VALUE_NOT_ALLOWED,
        ),
        (
            "SELECT realtime.send_binary(decode(repeat('00', 2000), 'hex'), 'e', 't')",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        (
            "INSERT INTO realtime.messages (topic, extension, event, payload, binary_payload) VALUES ('t', 'broadcast', 'e', '{}', '\\x00')",
            SqlState::CHECK_VIOLATION,
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(&sqlstate(c.batch_execute(sql)), expected, "{sql}");
    }
    assert_eq!(
        c.query_one("SELECT count(*) FROM realtime.messages", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    // The worker and the database survived all of it.
    assert!(cluster.worker_pid().is_some());
}

#[test]
fn rls_without_policy_denies_and_topic_policies_decide() {
    let cluster = Cluster::start("rls", &[]);
    let mut c = cluster.connect();
    c.batch_execute(r#"SELECT realtime.send('{"a":1}', 'e', 'secret', true)"#)
        .unwrap();

    // No policy: anon sees nothing, cannot insert, and a send warns, is counted, and is lost.
    c.batch_execute("SET ROLE anon").unwrap();
    assert_eq!(
        c.query_one("SELECT count(*) FROM realtime.messages", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    assert_eq!(
        sqlstate(c.batch_execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES ('x', 'broadcast')"
        )),
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    c.batch_execute(r#"SELECT realtime.send('{"a":2}', 'e', 'room-a')"#)
        .unwrap();
    c.batch_execute("SET realtime.send_errors = error").unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(r#"SELECT realtime.send('{"a":3}', 'e', 'room-a')"#)),
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    c.batch_execute("RESET ROLE; RESET realtime.send_errors")
        .unwrap();
    let failed: i64 = c
        .query_one("SELECT failed_sends FROM realtime.stats()", &[])
        .unwrap()
        .get(0);
    assert_eq!(failed, 1);
    // Direct access to a partition is not a way around RLS.
    let partition: String = c
        .query_one(
            "SELECT 'realtime.messages_' || to_char(current_date, 'YYYY_MM_DD')",
            &[],
        )
        .unwrap()
        .get(0);
    c.batch_execute("SET ROLE anon").unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(&format!("SELECT * FROM {partition}"))),
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    c.batch_execute("RESET ROLE").unwrap();

    // Policies written against realtime.topic() decide reads and writes.
    c.batch_execute(
        "CREATE POLICY read_room_a ON realtime.messages FOR SELECT TO anon
           USING (realtime.topic() = 'room-a' AND topic = realtime.topic());
         CREATE POLICY write_room_a ON realtime.messages FOR INSERT TO anon
           WITH CHECK (realtime.topic() = 'room-a');",
    )
    .unwrap();
    c.batch_execute("SET ROLE anon; SET realtime.send_errors = error")
        .unwrap();
    c.batch_execute(r#"SELECT realtime.send('{"a":4}', 'e', 'room-a')"#)
        .unwrap();
    assert_eq!(
        sqlstate(c.batch_execute(r#"SELECT realtime.send('{"a":5}', 'e', 'room-b')"#)),
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    c.batch_execute("SET realtime.topic = 'room-a'").unwrap();
    let visible: Vec<String> = c
        .query("SELECT topic FROM realtime.messages", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(visible, vec!["room-a".to_string()]);
    c.batch_execute("SET realtime.topic = 'secret'").unwrap();
    assert_eq!(
        c.query_one("SELECT count(*) FROM realtime.messages", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

#[test]
fn send_turns_only_refusals_into_warnings() {
    let cluster = Cluster::start("send_refusals", &[]);
    let mut c = cluster.connect();
    c.batch_execute(
        "CREATE FUNCTION public.guard() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.topic = 'refused' THEN
                 RAISE EXCEPTION 'not this topic' USING ERRCODE = 'check_violation';
             ELSIF NEW.topic = 'slow' THEN
                 PERFORM pg_sleep(5);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER guard BEFORE INSERT ON realtime.messages
             FOR EACH ROW EXECUTE FUNCTION public.guard();",
    )
    .unwrap();
    // A trigger of the user's refuses the row: a warning, counted, as Supabase does.
    c.batch_execute("SELECT realtime.send('{}', 'e', 'refused', false)")
        .unwrap();
    // A cancel is not a refusal: it stops the caller, as PL/pgSQL's WHEN OTHERS lets it.
    assert_eq!(
        sqlstate(c.batch_execute(
            "SET statement_timeout = '200ms'; SELECT realtime.send('{}', 'e', 'slow', false)"
        )),
        SqlState::QUERY_CANCELED
    );
    c.batch_execute("RESET statement_timeout").unwrap();
    let failed: i64 = c
        .query_one("SELECT failed_sends FROM realtime.stats()", &[])
        .unwrap()
        .get(0);
    assert_eq!(failed, 1, "only the refusal is counted");

    // The insert plan this session keeps follows a recreated extension's new table.
    c.batch_execute(
        r#"DROP EXTENSION pg_realtime CASCADE;
           CREATE EXTENSION pg_realtime;
           SELECT realtime.send('{"after":"recreate"}', 'e', 'room', false);"#,
    )
    .unwrap();
    let payload: serde_json::Value = c
        .query_one("SELECT payload FROM realtime.messages", &[])
        .unwrap()
        .get(0);
    assert_eq!(payload["after"], "recreate");
}

#[test]
fn partitions_cover_yesterday_to_today_plus_three_and_old_ones_are_dropped() {
    let cluster = Cluster::start("partitions", &["realtime.maintenance_interval = 1"]);
    let mut c = cluster.connect();
    let names: Vec<String> = c
        .query(
            "SELECT format('messages_%s', to_char(d, 'YYYY_MM_DD'))
             FROM generate_series(current_date - 1, current_date + 3, interval '1 day') d",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in &names {
        let exists: bool = c
            .query_one("SELECT to_regclass('realtime.' || $1) IS NOT NULL", &[name])
            .unwrap()
            .get(0);
        assert!(exists, "{name} exists");
    }
    // An old day: its partition and stray rows in the default partition must go.
    c.batch_execute(
        "SELECT realtime._create_partition((current_date - 10)::date);
         INSERT INTO realtime.messages (topic, extension, event, payload, inserted_at)
           VALUES ('old', 'broadcast', 'e', '{}', now() - interval '10 days'),
                  ('older', 'broadcast', 'e', '{}', now() - interval '400 days');",
    )
    .unwrap();
    let old = format!(
        "messages_{}",
        c.query_one("SELECT to_char(current_date - 10, 'YYYY_MM_DD')", &[])
            .unwrap()
            .get::<_, String>(0)
    );
    assert!(eventually(Duration::from_secs(60), || {
        let gone: bool = c
            .query_one("SELECT to_regclass('realtime.' || $1) IS NULL", &[&old])
            .unwrap()
            .get(0);
        let strays: i64 = c
            .query_one("SELECT count(*) FROM realtime.messages_default", &[])
            .unwrap()
            .get(0);
        gone && strays == 0
    }));
    // The window partitions are still there and no longer extension members (pg_dump keeps them).
    let members: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
             WHERE d.deptype = 'e' AND c.relname ~ '^messages_\\d'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(members, 0);
}

#[test]
fn rows_without_a_partition_land_in_the_default_one_and_move_later() {
    let cluster = Cluster::start("default_partition", &[]);
    let mut c = cluster.connect();
    c.batch_execute(
        "INSERT INTO realtime.messages (topic, extension, event, payload, inserted_at)
           VALUES ('future', 'broadcast', 'e', '{}', now() + interval '20 days');
         SELECT realtime._create_partition((current_date + 20)::date);",
    )
    .unwrap();
    let row: (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM realtime.messages_default),
                        (SELECT count(*) FROM realtime.messages WHERE topic = 'future')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(row, (0, 1));
}

#[test]
fn a_full_queue_fails_the_transaction_instead_of_dropping() {
    let cluster = Cluster::start("queue_full", &["realtime.queue_size = 64kB"]);
    let mut c = cluster.connect();
    let err = c
        .batch_execute(
            "BEGIN;
             SELECT realtime.send(jsonb_build_object('n', n, 'pad', repeat('x', 200)), 'e', 'room', false)
               FROM generate_series(1, 1000) n;
             COMMIT;",
        )
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED),
        "{err:?}"
    );
    assert!(message(&err).contains("commit queue is full"), "{err:?}");
    c.batch_execute("ROLLBACK").ok();
    assert_eq!(
        c.query_one("SELECT count(*) FROM realtime.messages", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    // Smaller transactions still go through.
    c.batch_execute(r#"SELECT realtime.send('{"ok":true}', 'e', 'room', false)"#)
        .unwrap();
}

#[test]
fn prepare_transaction_after_a_send_is_refused() {
    let cluster = Cluster::start("prepare", &[]);
    let mut c = cluster.connect();
    let err = c
        .batch_execute(
            r#"BEGIN; SELECT realtime.send('{}', 'e', 'room'); PREPARE TRANSACTION 'p1';"#,
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(
        message(&err),
        "cannot PREPARE a transaction that has sent realtime messages"
    );
    c.batch_execute("ROLLBACK").ok();
    // A transaction without sends still prepares.
    c.batch_execute("BEGIN; CREATE TABLE t(); PREPARE TRANSACTION 'p2';")
        .unwrap();
    c.batch_execute("COMMIT PREPARED 'p2'").unwrap();
}

#[test]
fn realtime_topic_is_a_real_setting() {
    let cluster = Cluster::start("topic_guc", &[]);
    let mut c = cluster.connect();
    let row = c
        .query_one(
            "SELECT realtime.topic() IS NULL,
                    (SELECT set_config('realtime.topic', 'a', false)),
                    realtime.topic()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(2), "a");
    c.batch_execute("BEGIN; SET LOCAL realtime.topic = 'b';")
        .unwrap();
    assert_eq!(
        c.query_one("SELECT realtime.topic()", &[])
            .unwrap()
            .get::<_, String>(0),
        "b"
    );
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(
        c.query_one("SELECT realtime.topic()", &[])
            .unwrap()
            .get::<_, String>(0),
        "a"
    );
}

#[test]
fn loading_without_preload_is_refused_with_a_hint() {
    let cluster = Cluster::start_with("no_preload", &[], false);
    let err = cluster
        .connect()
        .batch_execute("CREATE EXTENSION pg_realtime")
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(
        db.message(),
        "pg_realtime must be loaded via shared_preload_libraries"
    );
    assert!(
        db.hint()
            .unwrap_or_default()
            .contains("shared_preload_libraries = 'pg_realtime'")
    );
}

#[test]
fn the_worker_waits_for_the_extension_and_comes_back_after_being_stopped() {
    let cluster = Cluster::start("worker_lifecycle", &[]);
    assert!(eventually(Duration::from_secs(30), || cluster
        .log()
        .contains("pg_realtime: worker ready")));
    let mut c = cluster.connect();
    let started: std::time::SystemTime = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .unwrap()
        .get(0);
    let first = cluster.worker_pid().expect("the worker runs");
    c.batch_execute(&format!("SELECT pg_terminate_backend({first})"))
        .unwrap();
    assert!(eventually(Duration::from_secs(30), || cluster
        .worker_pid()
        .is_some_and(|p| p != first)));
    // Terminating the worker is not a crash: the database did not restart.
    let mut c = cluster.connect();
    let now: std::time::SystemTime = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .unwrap()
        .get(0);
    assert_eq!(started, now);

    // SIGKILL is a crash for PostgreSQL (as for any backend): the postmaster reinitializes
    // and the worker comes back by itself.
    cluster.expect_kill();
    let pid = cluster.worker_pid().expect("the worker runs");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(eventually(Duration::from_secs(60), || cluster
        .worker_pid()
        .is_some_and(|p| p != pid)));
    let mut c = cluster.connect();
    c.batch_execute(r#"SELECT realtime.send('{"after":"restart"}', 'e', 'room', false)"#)
        .unwrap();
}

#[test]
fn the_worker_waits_quietly_in_a_database_without_the_extension() {
    let cluster = Cluster::start_with(
        "no_extension",
        &["shared_preload_libraries = 'pg_realtime'"],
        false,
    );
    assert!(eventually(Duration::from_secs(30), || cluster
        .log()
        .contains("waiting for CREATE EXTENSION")));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        cluster
            .log()
            .matches("waiting for CREATE EXTENSION")
            .count(),
        1,
        "logged once"
    );
    cluster.execute("CREATE EXTENSION pg_realtime");
    assert!(eventually(Duration::from_secs(30), || cluster
        .log()
        .contains("pg_realtime: worker ready")));
}

/// DROP EXTENSION under a running worker: it notices within a second, says so once, restarts
/// to wait quietly for the extension, and serves again after CREATE EXTENSION.
#[test]
fn dropping_the_extension_sends_the_worker_back_to_waiting() {
    let cluster = Cluster::start("drop_extension", &[]);
    let ready = |c: &Cluster| c.log().matches("pg_realtime: worker ready").count();
    // The port accepts connections a moment before the main thread logs that it is ready.
    assert!(eventually(Duration::from_secs(30), || ready(&cluster) == 1));
    cluster.execute("DROP EXTENSION pg_realtime");
    assert!(eventually(Duration::from_secs(30), || cluster
        .log()
        .contains("waiting for CREATE EXTENSION")));
    std::thread::sleep(Duration::from_secs(3));
    let log = cluster.log();
    assert_eq!(log.matches("the extension was dropped").count(), 1, "{log}");
    assert!(!log.contains("cannot expire"), "no error flood: {log}");
    cluster.execute("CREATE EXTENSION pg_realtime");
    assert!(eventually(Duration::from_secs(30), || ready(&cluster) == 2));
    cluster.wait_for_server();
}
