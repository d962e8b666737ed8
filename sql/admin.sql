-- Operations from SQL: who is connected, closing connections, why a join is refused, and
-- presence changes as rows that triggers can react to. Nothing here is for PUBLIC: the
-- functions show every connection's identity and can close any of them.

CREATE FUNCTION realtime.explain_join(topic text, claims jsonb, private boolean DEFAULT true)
RETURNS TABLE ("check" text, allowed boolean, reason text)
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'explain_join_wrapper';

-- Socket presence changes, written by the primary's worker in batches when
-- realtime.presence_events is on. Put ordinary AFTER INSERT triggers on it; they run in the
-- worker's transactions, so they must be quick (queue the slow work, e.g. with pg_net).
CREATE TABLE realtime.presence_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic text NOT NULL,
    private boolean NOT NULL,
    key text NOT NULL,
    event text NOT NULL CHECK (event IN ('join', 'leave', 'update')),
    meta jsonb,
    node text,
    at timestamptz NOT NULL DEFAULT now()
);
-- Retention deletes by age.
CREATE INDEX presence_events_at ON realtime.presence_events (at);
REVOKE ALL ON TABLE realtime.presence_events FROM PUBLIC;

REVOKE ALL ON FUNCTION realtime.connections() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.channels() FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.disconnect(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.disconnect_user(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION realtime.explain_join(text, jsonb, boolean) FROM PUBLIC;

COMMENT ON TABLE realtime.presence_events IS
    'Socket presence joins, updates and leaves (of every node''s members), written by the primary''s worker in '
    'batches when realtime.presence_events is on; kept for realtime.retention. Put triggers on it to react.';
COMMENT ON FUNCTION realtime.connections() IS
    'The open WebSocket connections of this node, asked of the worker at the call: id, remote address and port, '
    'role and sub of the newest token used, protocol, connected_at, joined channels, data frames and bytes in '
    'and out, bytes waiting in its outbound queue.';
COMMENT ON FUNCTION realtime.channels() IS
    'The topics this node''s connections joined or that hold presence, asked of the worker at the call: '
    'subscribers here, presence keys (every node''s, and tracked from SQL).';
COMMENT ON FUNCTION realtime.disconnect(bigint, text) IS
    'Closes one connection (an id from realtime.connections()): each of its channels gets a system message with '
    'reason, then the socket closes. Returns how many connections were closed.';
COMMENT ON FUNCTION realtime.disconnect_user(text, text) IS
    'Closes every connection of this node whose newest token has this sub, as realtime.disconnect does. Returns '
    'how many.';
COMMENT ON FUNCTION realtime.explain_join(text, jsonb, boolean) IS
    'Runs the checks a join of topic with a token carrying claims would run (token claims, role rules, read and '
    'write checks of broadcast and presence through the RLS policies) in subtransactions that are rolled back, '
    'and returns one row per check with the reason a refusal would give.';
