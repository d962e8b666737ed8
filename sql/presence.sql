-- Presence visible and writable from SQL. Sockets and SQL share one state: the worker mirrors
-- socket presence into realtime.presence_sockets, and presence tracked from SQL lives in
-- realtime.presence_tracked, whose committed changes reach the sockets through the commit queue.

-- Tracked from SQL. A logged table: it outlives worker restarts (sockets re-track by
-- themselves, SQL jobs do not).
CREATE TABLE realtime.presence_tracked (
    topic text NOT NULL CHECK (topic <> ''),
    private boolean NOT NULL DEFAULT false,
    key text NOT NULL CHECK (key <> ''),
    payload jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    PRIMARY KEY (topic, private, key)
);
CREATE INDEX presence_tracked_expiry ON realtime.presence_tracked (expires_at)
    WHERE expires_at IS NOT NULL;
SELECT pg_catalog.pg_extension_config_dump('realtime.presence_tracked', '');

-- Tracked by sockets, written only by the primary's worker, for the sockets of every node
-- (other nodes' members reach it over the bus), and emptied when that worker starts: no
-- socket outlives it. Logged, so that hot standbys read it too.
CREATE TABLE realtime.presence_sockets (
    connection_id bigint PRIMARY KEY,
    topic text NOT NULL,
    private boolean NOT NULL,
    key text NOT NULL,
    presence_ref text NOT NULL,
    payload jsonb NOT NULL,
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX presence_sockets_topic ON realtime.presence_sockets (topic, private);

CREATE TRIGGER queue_presence_sync
    AFTER INSERT OR UPDATE OR DELETE ON realtime.presence_tracked
    FOR EACH ROW EXECUTE FUNCTION realtime.queue_presence_sync();

CREATE FUNCTION realtime.track(
    topic text, key text, payload jsonb, private boolean DEFAULT false, ttl interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF topic IS NULL OR topic = '' THEN
        RAISE EXCEPTION 'presence topic must not be empty' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF key IS NULL OR key = '' THEN
        RAISE EXCEPTION 'presence key must not be empty' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF payload IS NULL OR jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION 'presence payload must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(topic) > 246 THEN
        RAISE EXCEPTION 'presence topic is % bytes long; the limit is 246', octet_length(topic)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF ttl IS NOT NULL AND ttl <= interval '0' THEN
        RAISE EXCEPTION 'presence ttl must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO realtime.presence_tracked AS p (topic, private, key, payload, expires_at)
    VALUES (topic, coalesce(private, false), key, payload, now() + ttl)
    ON CONFLICT ON CONSTRAINT presence_tracked_pkey DO UPDATE
        SET payload = excluded.payload,
            expires_at = excluded.expires_at,
            updated_at = now(),
            joined_at = CASE WHEN p.expires_at <= now() THEN now() ELSE p.joined_at END;
END
$$;

CREATE FUNCTION realtime.untrack(topic text, key text, private boolean DEFAULT false)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM realtime.presence_tracked AS p
         WHERE p.topic = $1 AND p.key = $2 AND p.private = coalesce($3, false)
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone);
$$;

CREATE FUNCTION realtime.presence(topic_name text)
RETURNS TABLE (
    topic text, key text, payload jsonb, presence_ref text, connection_id bigint, origin text,
    private boolean, joined_at timestamptz, updated_at timestamptz, expires_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.topic, s.key, s.payload, s.presence_ref, s.connection_id, 'socket', s.private,
           s.joined_at, s.updated_at, NULL::timestamptz
      FROM realtime.presence_sockets AS s
     WHERE s.topic = $1
    UNION ALL
    SELECT t.topic, t.key, t.payload, NULL, NULL, 'sql', t.private,
           t.joined_at, t.updated_at, t.expires_at
      FROM realtime.presence_tracked AS t
     WHERE t.topic = $1 AND (t.expires_at IS NULL OR t.expires_at > now())
     ORDER BY 7, 2, 8;
$$;

CREATE FUNCTION realtime.occupancy(topic text, OUT keys bigint, OUT connections bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(DISTINCT (p.private, p.key)), count(*) FILTER (WHERE p.origin = 'socket')
      FROM realtime.presence($1) AS p;
$$;

CREATE FUNCTION realtime._expire_presence() RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM realtime.presence_tracked WHERE expires_at <= now() RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;

REVOKE ALL ON FUNCTION realtime.track(text, text, jsonb, boolean, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.untrack(text, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.presence(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.occupancy(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime._expire_presence() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.queue_presence_sync() FROM PUBLIC;

COMMENT ON TABLE realtime.presence_tracked IS
    'Presence tracked from SQL (realtime.track); changes reach sockets as presence_diff after commit.';
COMMENT ON TABLE realtime.presence_sockets IS
    'Presence tracked by sockets, mirrored by the background worker; emptied when it starts.';
COMMENT ON FUNCTION realtime.track(text, text, jsonb, boolean, interval) IS
    'Tracks key on topic with payload (a JSON object) from SQL; sockets see it as a presence join after commit. '
    'Tracking the same key again updates it. With ttl the entry leaves by itself unless tracked again.';
COMMENT ON FUNCTION realtime.untrack(text, text, boolean) IS
    'Removes a key tracked from SQL; sockets see a presence leave after commit. Returns whether it existed.';
COMMENT ON FUNCTION realtime.presence(text) IS
    'The members of topic, from sockets and from SQL: key, payload, presence_ref, connection_id (the socket '
    'channel; NULL from SQL), origin (socket or sql), private, joined_at, updated_at, expires_at.';
COMMENT ON FUNCTION realtime.occupancy(text) IS
    'How many distinct keys and how many socket connections are present on topic.';
COMMENT ON FUNCTION realtime._expire_presence() IS
    'Internal: removes SQL presence whose ttl ran out; the worker runs it every second.';
COMMENT ON FUNCTION realtime.queue_presence_sync() IS
    'Internal trigger: queues a presence sync for the topic, which the worker applies after commit.';
