//! What no database login, token or client may do: crash the cluster, reach a private channel
//! it was not given, read the token secret, or run code with the worker's rights.

use postgres::error::SqlState;
use realtime_integration_tests::{Cluster, JWT_SECRET, Socket, eventually, jwt, sqlstate};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
/// Long enough for a message that was going to arrive to arrive; only used to show absence.
const QUIET: Duration = Duration::from_secs(2);

fn error_text(result: Result<impl Sized, postgres::Error>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// A login role with nothing granted, as any database user can be.
fn login_as(cluster: &Cluster, role: &str) -> postgres::Client {
    postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user={role} dbname=postgres",
            cluster.pg_port
        ),
        postgres::NoTls,
    )
    .expect("login")
}

/// A service_role socket (BYPASSRLS, as in Supabase) joined to a private topic.
fn private_subscriber(cluster: &Cluster, topic: &str) -> Socket {
    let mut s = Socket::connect(cluster, &jwt(json!({"role": "service_role"})), "2.0.0");
    let reply = s.join(topic, json!({"private": true}));
    assert_eq!(reply["status"], "ok", "{reply}");
    s
}

fn assert_no_crash(cluster: &Cluster) {
    let crashes = cluster.crash_lines();
    assert!(crashes.is_empty(), "the server crashed:\n{crashes:?}");
}

/// Any login may create a temp table, but not attach the extension's trigger functions to it;
/// and a trigger the owner attaches to another table refuses to run there. Neither forges a
/// private delivery nor reads a column of the wrong type as jsonb (which crashed the backend).
#[test]
fn trigger_functions_cannot_be_attached_elsewhere() {
    let cluster = Cluster::start("sec_triggers", &[]);
    cluster.execute("CREATE ROLE mallory LOGIN");
    let mut victim = private_subscriber(&cluster, "user:victim");
    let mut bystander = cluster.connect();

    let mut mallory = login_as(&cluster, "mallory");
    mallory
        .batch_execute(
            "CREATE TEMP TABLE t(topic text, event text, private bool, id uuid, payload int8,
                                 binary_payload bytea)",
        )
        .unwrap();
    for function in ["queue_broadcast_row", "queue_presence_sync"] {
        let attach = format!(
            "CREATE TRIGGER q_{function} AFTER INSERT ON t FOR EACH ROW
             EXECUTE FUNCTION realtime.{function}()"
        );
        assert_eq!(
            sqlstate(mallory.batch_execute(&attach)),
            SqlState::INSUFFICIENT_PRIVILEGE,
            "{function}"
        );
    }

    // The owner can attach it, but it still only runs on realtime.messages.
    let mut owner = cluster.connect();
    owner
        .batch_execute(
            "CREATE TABLE public.lookalike(topic text, event text, private bool, id uuid,
                                           payload int8, binary_payload bytea);
             CREATE TRIGGER q AFTER INSERT ON public.lookalike FOR EACH ROW
               EXECUTE FUNCTION realtime.queue_broadcast_row();
             CREATE TABLE public.tracked_lookalike(topic text, private bool);
             CREATE TRIGGER q AFTER INSERT ON public.tracked_lookalike FOR EACH ROW
               EXECUTE FUNCTION realtime.queue_presence_sync();",
        )
        .unwrap();
    // After firing on realtime.messages too, whose OIDs the session then remembers.
    owner
        .batch_execute("SELECT realtime.send('{}', 'e', 'warm-up', false)")
        .unwrap();
    let refused = owner.batch_execute(
        "INSERT INTO public.lookalike VALUES ('user:victim', 'x', true, gen_random_uuid(), 1, NULL)",
    );
    assert_eq!(
        error_text(refused),
        "trigger function realtime.queue_broadcast_row() fires only on realtime.messages, not on \"lookalike\""
    );
    assert_eq!(
        sqlstate(
            owner.batch_execute("INSERT INTO public.tracked_lookalike VALUES ('room', false)")
        ),
        SqlState::E_R_I_E_TRIGGER_PROTOCOL_VIOLATED
    );
    assert!(
        victim.recv_event("broadcast", QUIET).is_none(),
        "a forged row reached a private channel"
    );
    // Nobody crashed: an unrelated session still answers, and the log shows no signal.
    bystander.batch_execute("SELECT 1").unwrap();
    assert_no_crash(&cluster);
    // Real messages still flow.
    owner
        .batch_execute(r#"SELECT realtime.send('{"real":1}', 'x', 'user:victim', true)"#)
        .unwrap();
    let m = victim
        .recv_event("broadcast", WAIT)
        .expect("the real message");
    assert_eq!(m.payload["payload"]["real"], 1);
}

/// Nothing in the `realtime` schema that can be misused is executable by PUBLIC: the
/// functions PUBLIC may call are exactly those that act with the caller's own rights.
#[test]
fn public_may_call_only_the_sending_functions() {
    let cluster = Cluster::start("sec_grants", &[]);
    cluster.execute("CREATE ROLE mallory LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_monitor");
    let mut c = cluster.connect();
    let callable: Vec<String> = c
        .query(
            "SELECT p.proname FROM pg_proc p
              WHERE p.pronamespace = 'realtime'::regnamespace
                AND has_function_privilege('mallory', p.oid, 'EXECUTE')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        callable,
        ["broadcast_changes", "send", "send_binary", "topic"],
        "functions PUBLIC can execute"
    );
    // No table or partition of the schema is readable or writable by PUBLIC.
    let open: Vec<String> = c
        .query(
            "SELECT c.relname FROM pg_class c
              WHERE c.relnamespace = 'realtime'::regnamespace AND c.relkind IN ('r', 'p')
                AND has_table_privilege('mallory', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(open.is_empty(), "tables open to PUBLIC: {open:?}");
    // Monitoring roles read the counters; others do not.
    let mut mallory = login_as(&cluster, "mallory");
    assert_eq!(
        sqlstate(mallory.query("SELECT * FROM realtime.stats()", &[])),
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    let mut watcher = login_as(&cluster, "watcher");
    watcher
        .query("SELECT * FROM realtime.stats()", &[])
        .unwrap();
}

/// A token may only become a role the worker is allowed to become: never a superuser, never
/// `none` (which resets to the worker's own superuser session), never a role that does not
/// exist, and with `realtime.authenticator` only a role granted to it.
#[test]
fn tokens_cannot_become_superusers_or_unlisted_roles() {
    let cluster = Cluster::start("sec_roles", &[]);
    // No policy at all: only a role that bypasses RLS may join a private channel.
    let join = |claims: serde_json::Value| -> serde_json::Value {
        match Socket::try_connect(&cluster, &jwt(claims), "1.0.0") {
            Ok(mut s) => s.join("secret", json!({"private": true})),
            // Refused at connect: also a clear refusal, before any join.
            Err(e) => json!({"status": "error", "response": {"reason": e.to_string()}}),
        }
    };
    for (role, why) in [
        ("postgres", "is a superuser"),
        ("none", "must name a database role"),
        ("NONE", "must name a database role"),
        ("ghost", "does not exist"),
    ] {
        let reply = join(json!({"role": role}));
        assert_eq!(reply["status"], "error", "role {role}: {reply}");
        let reason = reply["response"]["reason"].to_string();
        assert!(
            reason.contains(why) || reason.contains("401"),
            "role {role}: {reason}"
        );
    }
    // service_role (BYPASSRLS, not a superuser) keeps working as in Supabase.
    assert_eq!(join(json!({"role": "service_role"}))["status"], "ok");

    // With an authenticator, only the roles granted to it.
    cluster
        .execute("CREATE ROLE authenticator NOINHERIT; GRANT anon, authenticated TO authenticator");
    cluster.execute("ALTER SYSTEM SET realtime.authenticator = 'authenticator'");
    cluster.execute("SELECT pg_reload_conf()");
    let refused = eventually(WAIT, || {
        join(json!({"role": "service_role"}))["response"]["reason"]
            .to_string()
            .contains("realtime.authenticator")
    });
    assert!(refused, "service_role was not refused once not granted");
    cluster.execute("GRANT service_role TO authenticator");
    assert_eq!(join(json!({"role": "service_role"}))["status"], "ok");
}

/// The token secret is never readable by anyone but a superuser: monitoring roles
/// (`pg_read_all_settings`) see it masked, and the secret can live in a file instead.
#[test]
fn the_jwt_secret_is_not_readable_by_monitoring_roles() {
    let file =
        std::path::PathBuf::from(format!("/tmp/pg_realtime_it/secret-{}", std::process::id()));
    std::fs::create_dir_all("/tmp/pg_realtime_it").unwrap();
    let file_secret = "a-secret-that-only-lives-in-a-file-0123456789";
    std::fs::write(&file, format!("{file_secret}\n")).unwrap();
    std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&file)
        .status()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let cluster = Cluster::start("sec_secret", &[]);
    cluster.execute("CREATE ROLE watcher LOGIN IN ROLE pg_monitor");
    let mut watcher = login_as(&cluster, "watcher");
    for query in [
        "SHOW realtime.jwt_secret",
        "SELECT current_setting('realtime.jwt_secret')",
    ] {
        let shown: String = watcher.query_one(query, &[]).unwrap().get(0);
        assert_eq!(shown, "********", "{query}");
    }
    let listed: i64 = watcher
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'realtime.jwt_secret'
                OR setting LIKE '%' || $1 || '%' OR reset_val LIKE '%' || $1 || '%'",
            &[&JWT_SECRET],
        )
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);

    // The file wins over the setting, and its contents appear nowhere.
    cluster.execute(&format!(
        "ALTER SYSTEM SET realtime.jwt_secret_file = '{}'",
        file.display()
    ));
    cluster.execute("SELECT pg_reload_conf()");
    let signed_with = |secret: &str| {
        realtime_test_client::jwt::sign_claims(
            &json!({"role": "anon", "exp": 4_000_000_000u64}),
            secret,
        )
    };
    let accepted = eventually(WAIT, || {
        Socket::try_connect(&cluster, &signed_with(file_secret), "1.0.0").is_ok()
    });
    assert!(
        accepted,
        "a token signed with the file's secret was refused"
    );
    assert!(Socket::try_connect(&cluster, &jwt(json!({})), "1.0.0").is_err());
    let shown: String = watcher
        .query_one("SHOW realtime.jwt_secret_file", &[])
        .map(|r| r.get(0))
        .unwrap_or_default();
    assert!(!shown.contains(file_secret));
    assert!(
        !cluster.log().contains(file_secret),
        "the log shows the secret"
    );
    let _ = std::fs::remove_file(&file);
}

/// A row inserted into realtime.messages goes only to the topic the inserter's policies
/// checked: policies read `realtime.topic()`, so a row for another topic is refused.
#[test]
fn a_direct_insert_cannot_reach_a_topic_its_policies_did_not_check() {
    let cluster = Cluster::start("sec_topic", &[]);
    let mut victim = private_subscriber(&cluster, "user:victim");
    let mut c = cluster.connect();
    c.batch_execute(
        "CREATE POLICY rooms ON realtime.messages FOR INSERT TO authenticated
           WITH CHECK (realtime.topic() LIKE 'room-%');
         SET ROLE authenticated;
         SET realtime.send_errors = error;",
    )
    .unwrap();
    let forged = c.batch_execute(
        "SET realtime.topic = 'room-1';
         INSERT INTO realtime.messages (topic, extension, event, payload, private)
         VALUES ('user:victim', 'broadcast', 'x', '{\"forged\": true}', true)",
    );
    assert_eq!(sqlstate(forged), SqlState::INSUFFICIENT_PRIVILEGE);
    // The same insert for the checked topic, and realtime.send, still work.
    c.batch_execute(
        "SET realtime.topic = 'room-1';
         INSERT INTO realtime.messages (topic, extension, event, payload, private)
         VALUES ('room-1', 'broadcast', 'x', '{}', true);
         SELECT realtime.send('{}', 'x', 'room-2');",
    )
    .unwrap();
    c.batch_execute("RESET ROLE").unwrap();
    // A role that bypasses RLS was never constrained by the policies.
    c.batch_execute(
        r#"INSERT INTO realtime.messages (topic, extension, event, payload, private)
           VALUES ('user:victim', 'broadcast', 'x', '{"owner": true}', true)"#,
    )
    .unwrap();
    let m = victim
        .recv_event("broadcast", WAIT)
        .expect("the owner's row");
    assert_eq!(m.payload["payload"]["owner"], true, "{:?}", m.payload);
}

/// The worker runs as a superuser with a pinned search_path: a database owner's operator in
/// `public` never runs with its rights (replay divides a float8 by an integer).
#[test]
fn a_schema_owners_operator_never_runs_as_the_worker() {
    let cluster = Cluster::start("sec_search_path", &[]);
    cluster.execute(
        "CREATE ROLE mallory LOGIN;
         GRANT CREATE ON SCHEMA public TO mallory;
         CREATE TABLE public.hijacked(who text);
         GRANT INSERT ON public.hijacked TO PUBLIC;",
    );
    let mut mallory = login_as(&cluster, "mallory");
    mallory
        .batch_execute(
            "CREATE FUNCTION public.h(float8, int4) RETURNS float8 LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.hijacked VALUES (current_user); RETURN $1 / $2::float8; END $$;
             CREATE OPERATOR public./ (LEFTARG = float8, RIGHTARG = int4, FUNCTION = public.h);
             CREATE FUNCTION public.h2(float8, int8) RETURNS float8 LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.hijacked VALUES (current_user); RETURN $1 / $2::float8; END $$;
             CREATE OPERATOR public./ (LEFTARG = float8, RIGHTARG = int8, FUNCTION = public.h2);",
        )
        .unwrap();
    cluster.execute(
        "ALTER DATABASE postgres SET search_path = public, pg_catalog;
         SELECT realtime.send('{\"n\": 1}', 'e', 'history', true);",
    );
    // A fresh worker picks up the database's search_path.
    let before = cluster.worker_pid();
    cluster.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_realtime'",
    );
    assert!(eventually(Duration::from_secs(30), || {
        let now = cluster.worker_pid();
        now.is_some() && now != before
    }));
    cluster.wait_for_server();
    let mut s = Socket::connect(&cluster, &jwt(json!({"role": "service_role"})), "1.0.0");
    let joined = eventually(WAIT, || {
        s.join(
            "history",
            json!({"private": true, "broadcast": {"replay": {"since": 0, "limit": 10}}}),
        )["status"]
            == "ok"
    });
    assert!(joined);
    let replayed = s
        .recv_event("broadcast", WAIT)
        .expect("the replayed message");
    assert_eq!(replayed.payload["payload"]["n"], 1);
    let mut c = cluster.connect();
    let calls: i64 = c
        .query_one("SELECT count(*) FROM public.hijacked", &[])
        .unwrap()
        .get(0);
    assert_eq!(calls, 0, "the operator ran inside the worker");
    let superuser: bool = c
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!superuser);
}

/// A long reader of an old partition (a dump, an idle transaction) does not make partition
/// maintenance block every send: the worker gives up on the lock and tries again later.
#[test]
fn maintenance_never_blocks_sends_behind_a_long_reader() {
    let cluster = Cluster::start("sec_maintenance", &[]);
    let mut c = cluster.connect();
    c.batch_execute("SELECT realtime._create_partition(current_date - 10)")
        .unwrap();
    let old: String = c
        .query_one(
            "SELECT 'realtime.messages_' || to_char(current_date - 10, 'YYYY_MM_DD')",
            &[],
        )
        .unwrap()
        .get(0);
    let mut reader = cluster.connect();
    reader
        .batch_execute(&format!("BEGIN; SELECT count(*) FROM {old};"))
        .unwrap();
    cluster.execute("ALTER SYSTEM SET realtime.maintenance_interval = '1s'");
    cluster.execute("SELECT pg_reload_conf()");
    // Sends keep committing while maintenance keeps trying.
    let tried = eventually(WAIT, || {
        cluster.log().contains("partition maintenance failed")
    });
    assert!(
        tried,
        "maintenance did not run into the lock:\n{}",
        cluster.log()
    );
    for i in 0..20 {
        c.batch_execute(&format!(
            "SET statement_timeout = '5s'; SELECT realtime.send('{{\"i\": {i}}}', 'e', 't', false);"
        ))
        .unwrap_or_else(|e| panic!("send {i} blocked: {e}"));
    }
    reader.batch_execute("COMMIT").unwrap();
    let dropped = eventually(WAIT, || {
        cluster
            .connect()
            .query_one(&format!("SELECT to_regclass('{old}') IS NULL"), &[])
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    });
    assert!(
        dropped,
        "the old partition was not dropped once the reader left"
    );
}

/// Staging in a backend stops at the commit queue's capacity with the queue-full error, at
/// the statement that crosses it, instead of growing the backend's memory until commit.
#[test]
fn staging_stops_at_the_queue_capacity() {
    let cluster = Cluster::start("sec_staging", &["realtime.queue_size = '1MB'"]);
    let mut c = cluster.connect();
    c.batch_execute("BEGIN").unwrap();
    let result = c.batch_execute(
        "INSERT INTO realtime.messages (topic, extension, event, payload)
         SELECT 't', 'broadcast', 'e', jsonb_build_object('x', repeat('a', 100000))
           FROM generate_series(1, 50)",
    );
    assert_eq!(sqlstate(result), SqlState::CONFIGURATION_LIMIT_EXCEEDED);
    c.batch_execute("ROLLBACK").unwrap();
    // Within the capacity, a transaction still commits.
    c.batch_execute(
        "INSERT INTO realtime.messages (topic, extension, event, payload)
         SELECT 't', 'broadcast', 'e', jsonb_build_object('x', repeat('a', 100000))
           FROM generate_series(1, 5)",
    )
    .unwrap();
    assert_no_crash(&cluster);
}

/// A presence meta that PostgreSQL cannot store (a NUL in a string) does not keep other
/// members out of `realtime.presence()`: the worker mirrors socket presence in batches.
#[test]
fn a_nul_in_one_meta_does_not_poison_the_presence_mirror() {
    let cluster = Cluster::start("sec_presence_nul", &[]);
    let mut s = Socket::connect(&cluster, &jwt(json!({})), "2.0.0");
    for (topic, key) in [("room-a", "poison"), ("room-b", "fine")] {
        let config = json!({"presence": {"enabled": true, "key": key}});
        assert_eq!(s.join(topic, config)["status"], "ok");
    }
    // Back to back, so that both changes land in the same mirror batch.
    let poison = r#"[null,"90","realtime:room-a","presence",{"type":"presence","event":"track","payload":{"a":"\u0000"}}]"#;
    let fine = r#"[null,"91","realtime:room-b","presence",{"type":"presence","event":"track","payload":{"b":1}}]"#;
    s.send_text(poison);
    s.send_text(fine);
    let mut c = cluster.connect();
    let listed = eventually(WAIT, || {
        c.query("SELECT key FROM realtime.presence('room-b')", &[])
            .map(|rows| rows.iter().any(|r| r.get::<_, String>(0) == "fine"))
            .unwrap_or(false)
    });
    assert!(
        listed,
        "a member was lost with the poisoned batch:\n{}",
        cluster.log()
    );
    assert!(!cluster.log().contains("cannot mirror socket presence"));
}
