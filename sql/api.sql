-- pg_realtime schema, part 2: the SQL API. Runs after the Rust functions exist.

CREATE FUNCTION realtime.topic() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT nullif(pg_catalog.current_setting('realtime.topic', true), '')::text $$;

CREATE FUNCTION realtime.maintain_partitions(retention interval DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keep interval := coalesce(
        retention,
        make_interval(secs => (SELECT setting::double precision FROM pg_settings WHERE name = 'realtime.retention')),
        interval '3 days');
    cutoff date := (localtimestamp - keep)::date;
    part record;
BEGIN
    FOR part IN
        SELECT c.relname,
               to_date(substr(c.relname, 10), 'YYYY_MM_DD') AS day,
               EXISTS (SELECT 1 FROM pg_depend d
                       WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') AS member
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'realtime.messages'::regclass
          AND c.relname ~ '^messages_\d{4}_\d{2}_\d{2}$'
    LOOP
        -- Partitions made by CREATE EXTENSION belong to it; release them so pg_dump keeps
        -- their rows and so they can be dropped like the others.
        IF part.member THEN
            EXECUTE format('ALTER EXTENSION pg_realtime DROP TABLE realtime.%I', part.relname);
        END IF;
        IF part.day < cutoff THEN
            EXECUTE format('DROP TABLE realtime.%I', part.relname);
        END IF;
    END LOOP;
    DELETE FROM realtime.messages_default WHERE inserted_at < cutoff;
    -- A resume from before what was just dropped is told that it may miss messages.
    UPDATE realtime.replay_horizon
       SET lost_through = greatest(lost_through,
                                   (SELECT max(last_lsn) FROM realtime.replay_days WHERE day < cutoff))
     WHERE EXISTS (SELECT 1 FROM realtime.replay_days WHERE day < cutoff);
    DELETE FROM realtime.replay_days WHERE day < cutoff;
    -- Presence events are kept as long as messages.
    DELETE FROM realtime.presence_events WHERE at < now() - keep;
    PERFORM realtime._create_partitions();
END
$$;

-- Both check their arguments, set realtime.topic for INSERT policies and insert with one kept
-- plan, in Rust (src/api/send.rs): every message sent from SQL goes through here. Bad arguments
-- always raise; a failed insert (permissions, policies, constraints) follows
-- realtime.send_errors.
CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'realtime_send';

CREATE FUNCTION realtime.send_binary(payload bytea, event text, topic text, private boolean DEFAULT true)
RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'realtime_send_binary';

CREATE FUNCTION realtime.broadcast_changes(
    topic_name text, event_name text, operation text, table_name text, table_schema text,
    new record, old record, level text DEFAULT 'ROW')
RETURNS void
LANGUAGE plpgsql
-- Pinned: it is called from triggers, often SECURITY DEFINER ones, where a caller's schema
-- must not shadow an operator or function of its body.
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    row_data jsonb;
BEGIN
    IF level = 'STATEMENT' THEN
        RAISE EXCEPTION 'function can only be triggered for each row, not for each statement'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF operation IS NULL OR operation NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RAISE EXCEPTION 'Unexpected operation type: %', coalesce(operation, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    row_data := jsonb_build_object(
        'old_record', old, 'record', new, 'operation', operation, 'table', table_name, 'schema', table_schema);
    PERFORM realtime.send(row_data, event_name, topic_name);
EXCEPTION
    WHEN OTHERS THEN
        RAISE EXCEPTION 'Failed to process the row: %', SQLERRM USING ERRCODE = SQLSTATE;
END
$$;

-- Every committed broadcast row reaches the sockets, whoever wrote it. Rows without an event
-- or of another extension are authorization probes and records, not messages: the function
-- itself passes over them, since a WHEN clause here would be parsed again for every
-- single-row INSERT.
CREATE TRIGGER queue_broadcast_row
    AFTER INSERT ON realtime.messages
    FOR EACH ROW
    EXECUTE FUNCTION realtime.queue_broadcast_row();

CREATE FUNCTION realtime._authorize_writes(
    topic text, role text, claims text, sub text, headers text, extensions text[],
    OUT extension text, OUT can_write boolean)
RETURNS SETOF record
LANGUAGE plpgsql
-- The worker runs it with plan_cache_mode = force_generic_plan, and with the search_path its
-- session had before it pinned its own (the policies' functions may rely on it), both set by
-- the worker rather than here: a SET clause costs a GUC save and restore on every call. So
-- everything below is schema-qualified.
AS $$
-- Called by the background worker (a superuser) inside a transaction it always rolls back, at
-- a private channel's first write. With the token's role and claims set as Supabase sets them,
-- each extension's probe row goes through the user's INSERT policies in its own savepoint.
-- (The read checks of joins insert their probes as the owner and read them back through the
-- SELECT policies, from Rust: src/worker/authorization.rs.) Everything arrives as parameters,
-- never as SQL text.
BEGIN
    PERFORM pg_catalog.set_config('role', _authorize_writes.role, true),
            pg_catalog.set_config('realtime.topic', _authorize_writes.topic, true),
            pg_catalog.set_config('request.jwt.claims', claims, true),
            pg_catalog.set_config('request.jwt.claim.sub', coalesce(sub, ''), true),
            pg_catalog.set_config('request.jwt.claim.role', _authorize_writes.role, true),
            pg_catalog.set_config('request.headers', headers, true);
    FOR extension IN SELECT DISTINCT e FROM pg_catalog.unnest(extensions) AS e LOOP
        BEGIN
            INSERT INTO realtime.messages (topic, extension, inserted_at, updated_at)
            VALUES (_authorize_writes.topic, _authorize_writes.extension, pg_catalog.now(), pg_catalog.now());
            can_write := true;
        EXCEPTION WHEN insufficient_privilege THEN
            can_write := false;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Creates Supabase's API roles where they are missing and grants them what Supabase grants.
CREATE FUNCTION realtime.setup_api_roles() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA realtime TO %I', r);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON realtime.messages TO %I', r);
    END LOOP;
END
$$;

-- Who may call what: send, send_binary, broadcast_changes and topic are for everyone (they
-- insert with the caller's rights, so grants and policies on realtime.messages decide); the
-- trigger functions, maintenance, setup and the worker's helpers are for the owner alone
-- (PostgreSQL checks EXECUTE on a trigger function only when a trigger is created); stats are
-- for monitoring roles.
GRANT USAGE ON SCHEMA realtime TO PUBLIC;
REVOKE ALL ON FUNCTION realtime.queue_broadcast_row() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.stats() TO pg_monitor;
REVOKE ALL ON FUNCTION realtime.maintain_partitions(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.setup_api_roles() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._authorize_writes(text, text, text, text, text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._create_partition(date) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._create_partitions() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._node_relay(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._node_authorize(text) FROM PUBLIC;

-- The standbys whose workers the primary has heard from, kept by the primary's worker (at
-- most every 30 seconds per node). While one was heard from in the last 10 minutes, the
-- primary writes the bus into its WAL, also right after a restart.
CREATE TABLE realtime.nodes (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON TABLE realtime.nodes FROM PUBLIC;
GRANT SELECT ON TABLE realtime.nodes TO pg_monitor;
COMMENT ON TABLE realtime.nodes IS
    'Standbys whose realtime workers reached this primary: their bus id (new at each worker start), name '
    '(realtime.node_name) and when they were last heard from.';
COMMENT ON FUNCTION realtime._node_relay(bytea) IS
    'Internal: a standby''s worker hands its bus envelope to the primary, which delivers it and writes it into the WAL.';
COMMENT ON FUNCTION realtime._node_authorize(text) IS
    'Internal: a standby''s worker has the primary run a private channel''s RLS checks, in subtransactions that are rolled back.';

COMMENT ON FUNCTION realtime.topic() IS
    'The topic of the message being sent or authorized (setting realtime.topic); use it in RLS policies on realtime.messages.';
COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean) IS
    'Broadcasts payload (a JSON object; an "id" is added when missing) as event on topic once the transaction commits. '
    'private (default true) selects private channels. Storage failures warn and are counted in realtime.stats() '
    'unless realtime.send_errors = error.';
COMMENT ON FUNCTION realtime.send_binary(bytea, text, text, boolean) IS
    'Like realtime.send, for a binary payload (delivered as binary frames; vsn 1.0.0 clients do not receive it).';
COMMENT ON FUNCTION realtime.broadcast_changes(text, text, text, text, text, record, record, text) IS
    'For row triggers: broadcasts {old_record, record, operation, table, schema} as event_name on topic_name (private).';
COMMENT ON FUNCTION realtime.maintain_partitions(interval) IS
    'Creates the daily partitions of realtime.messages from yesterday to today+3 and drops those older than '
    'retention (default: the realtime.retention setting), and deletes realtime.presence_events rows older than '
    'retention. The background worker runs it on a timer.';
COMMENT ON FUNCTION realtime.setup_api_roles() IS
    'Creates the roles anon, authenticated and service_role (BYPASSRLS) where missing and grants them USAGE on '
    'schema realtime and SELECT, INSERT, UPDATE on realtime.messages, as Supabase does. RLS policies still decide.';
COMMENT ON FUNCTION realtime.stats() IS
    'Counters since the cluster started (failed sends, queued, delivered, discarded: aborted, dropped: the socket '
    'server could not keep up), the commit queue''s fill, and the worker''s usage as of usage_updated_at (taken '
    'about once a second; NULL before the first): its private memory (worker_memory_bytes) and what holds it: '
    'sockets, channels, bytes queued for sockets, pending authorization requests, presence keys and bytes, '
    'writes held for write checks, database messages waiting for the network threads; and '
    'presence_events_dropped: rows of realtime.presence_events the worker could not write.';
COMMENT ON FUNCTION realtime._authorize_writes(text, text, text, text, text, text[]) IS
    'Internal: the RLS write checks of a private channel, run by the worker at its first write in a transaction it rolls back.';
COMMENT ON FUNCTION realtime.queue_broadcast_row() IS
    'Internal: trigger that queues committed broadcast rows for the socket server.';
COMMENT ON FUNCTION realtime._create_partition(date) IS
    'Internal: creates the partition of realtime.messages for one day, moving its rows out of the default partition.';
COMMENT ON FUNCTION realtime._create_partitions() IS
    'Internal: creates the partitions from yesterday to today+3.';
