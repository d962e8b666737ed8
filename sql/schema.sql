-- pg_realtime schema, part 1: the message table and its partitions.
-- Shapes follow Supabase's realtime schema so policies and triggers written for it work unchanged.

CREATE TABLE realtime.messages (
    topic text NOT NULL,
    extension text NOT NULL,
    payload jsonb,
    event text,
    private boolean DEFAULT false,
    updated_at timestamp without time zone NOT NULL DEFAULT now(),
    inserted_at timestamp without time zone NOT NULL DEFAULT now(),
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    binary_payload bytea,
    -- Set for client broadcasts stored with persist: {"ttl": N}; replay skips the row after it.
    expires_at timestamp without time zone,
    -- The message's offset: its commit LSN and index in its transaction, written back by the
    -- worker once delivered (see realtime.replay_horizon).
    commit_lsn pg_lsn,
    commit_index integer,
    CONSTRAINT messages_pkey PRIMARY KEY (id, inserted_at),
    CONSTRAINT messages_payload_exclusive CHECK (payload IS NULL OR binary_payload IS NULL) NOT VALID
) PARTITION BY RANGE (inserted_at);

COMMENT ON TABLE realtime.messages IS
    'Broadcast messages (kept for realtime.retention) and the rows RLS policies authorize channels against. '
    'Partitioned by day: realtime.messages_YYYY_MM_DD, plus realtime.messages_default for rows outside the window.';

-- Replay reads the newest private broadcasts of a topic.
CREATE INDEX messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic)
    WHERE extension = 'broadcast' AND private IS TRUE;

-- A resume reads the messages of a topic after an offset.
CREATE INDEX messages_topic_offset_index ON realtime.messages (topic, commit_lsn, commit_index)
    WHERE commit_lsn IS NOT NULL;

-- No policy: ordinary roles see and write nothing until the owner writes policies.
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;

-- Catches rows whose day has no partition (a stopped worker, a clock jump), so that a send
-- never fails for want of a partition. Maintenance moves such rows into their day's partition.
CREATE TABLE realtime.messages_default PARTITION OF realtime.messages DEFAULT;

CREATE FUNCTION realtime._create_partition(day date) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := format('messages_%s', to_char(day, 'YYYY_MM_DD'));
BEGIN
    IF to_regclass(format('realtime.%I', name)) IS NOT NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM realtime.messages_default
               WHERE inserted_at >= day AND inserted_at < day + 1) THEN
        EXECUTE format('CREATE TABLE realtime.%I (LIKE realtime.messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
        EXECUTE format(
            'WITH moved AS (DELETE FROM realtime.messages_default WHERE inserted_at >= %L AND inserted_at < %L RETURNING *) '
            'INSERT INTO realtime.%I SELECT * FROM moved', day, day + 1, name);
        EXECUTE format('ALTER TABLE realtime.messages ATTACH PARTITION realtime.%I FOR VALUES FROM (%L) TO (%L)',
                       name, day, day + 1);
    ELSE
        EXECUTE format('CREATE TABLE realtime.%I PARTITION OF realtime.messages FOR VALUES FROM (%L) TO (%L)',
                       name, day, day + 1);
    END IF;
END
$$;

CREATE FUNCTION realtime._create_partitions() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT realtime._create_partition(d::date)
    FROM generate_series(current_date - 1, current_date + 3, interval '1 day') AS d;
$$;

SELECT realtime._create_partitions();

-- What a resume (config.broadcast.replay.offset) can no longer give. One row: offsets up to
-- lost_through may have successors that are gone, dropped by retention or never given an
-- offset because the worker stopped without storing it (worker_running is left true by a
-- worker that did not stop cleanly). Kept by the worker and by maintain_partitions.
CREATE TABLE realtime.replay_horizon (
    lost_through pg_lsn NOT NULL DEFAULT '0/0',
    worker_running boolean NOT NULL DEFAULT false,
    single_row boolean PRIMARY KEY DEFAULT true CHECK (single_row)
);
INSERT INTO realtime.replay_horizon DEFAULT VALUES;

-- The newest offset stored for each day of inserted_at: when a day is dropped by retention,
-- lost_through moves up to it.
CREATE TABLE realtime.replay_days (
    day date PRIMARY KEY,
    last_lsn pg_lsn NOT NULL
);

REVOKE ALL ON TABLE realtime.replay_horizon, realtime.replay_days FROM PUBLIC;
GRANT SELECT ON TABLE realtime.replay_horizon, realtime.replay_days TO pg_monitor;
COMMENT ON TABLE realtime.replay_horizon IS
    'Offsets up to lost_through may have successors that are no longer stored (retention, or a worker that '
    'stopped without storing offsets); a resume from such an offset is told so. Kept by the worker.';
COMMENT ON TABLE realtime.replay_days IS
    'Internal: the newest stored offset per day of realtime.messages.inserted_at, for realtime.replay_horizon.';
