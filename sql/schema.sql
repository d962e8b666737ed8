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
    CONSTRAINT messages_pkey PRIMARY KEY (id, inserted_at),
    CONSTRAINT messages_payload_exclusive CHECK (payload IS NULL OR binary_payload IS NULL) NOT VALID
) PARTITION BY RANGE (inserted_at);

COMMENT ON TABLE realtime.messages IS
    'Broadcast messages (kept for realtime.retention) and the rows RLS policies authorize channels against. '
    'Partitioned by day: realtime.messages_YYYY_MM_DD, plus realtime.messages_default for rows outside the window.';

-- Replay reads the newest private broadcasts of a topic.
CREATE INDEX messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic)
    WHERE extension = 'broadcast' AND private IS TRUE;

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
