-- The control plane at rest costs what changes, not how many connections there are
-- (issue 21 #5, bench/controlplane.py).

-- Connections per (server, status), kept by triggers: placement and the pool manager read
-- each server's live placements, and the watchdog its per-state gauges, from here instead of
-- counting every connection. Writers never update a count in place (a hot row every create,
-- placement and ending would queue on, and two multi-row writers could deadlock on): each
-- statement that changes the connections of a (server, status) appends its net change to
-- connection_count_changes; readers add those to connection_counts, and the pool manager (and
-- the watchdog) fold them in (one DELETE ... RETURNING feeding one upsert, so a reader sees
-- a change either before or after, never twice). server '' = not placed. The triggers know no
-- state names: which states are live is the readers' business (zapbus/connection/states.py).
CREATE TABLE connection_counts (
    server text NOT NULL,
    status text NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (server, status)
);
CREATE TABLE connection_count_changes (
    server text NOT NULL,
    status text NOT NULL,
    n      bigint NOT NULL
);

-- Statement-level triggers: a projector batch (one UPDATE of up to 512 rows) appends one
-- row per (server, status) it changed, not one per connection; an UPDATE that moves no row
-- between (server, status) pairs (a QR, a hold, a heartbeat) appends nothing.
CREATE FUNCTION count_connections() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO connection_count_changes (server, status, n)
        SELECT coalesce(server, ''), status, count(*) FROM new_rows GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO connection_count_changes (server, status, n)
        SELECT coalesce(server, ''), status, -count(*) FROM old_rows GROUP BY 1, 2;
    ELSE
        INSERT INTO connection_count_changes (server, status, n)
        SELECT server, status, sum(n) FROM (
            SELECT coalesce(server, '') AS server, status, -1 AS n FROM old_rows
            UNION ALL
            SELECT coalesce(server, ''), status, 1 FROM new_rows
        ) moved GROUP BY 1, 2 HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER connections_counted_insert AFTER INSERT ON connections
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_connections();
CREATE TRIGGER connections_counted_update AFTER UPDATE ON connections
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_connections();
CREATE TRIGGER connections_counted_delete AFTER DELETE ON connections
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_connections();

-- The counts of the connections there are now (the triggers above take the table's lock
-- first: no write slips between them and this count).
INSERT INTO connection_counts (server, status, n)
SELECT coalesce(server, ''), status, count(*) FROM connections GROUP BY 1, 2;

-- Replaced by connection_counts: the pool manager's periodic count of every placement.
ALTER TABLE baileys_servers DROP COLUMN placed;
ALTER TABLE baileys_servers DROP COLUMN placed_counted_at;
DROP INDEX placements_recent;

-- The reconciler: the sessions each server should hold, read from the index alone (the rows
-- are not visited while the visibility map says they are unchanged), with the state to
-- compare against the server's word. The list is states.WANTED_LIVE.
CREATE INDEX connections_wanted ON connections (server, session_name) INCLUDE (status)
    WHERE status IN ('awaiting_qr', 'code_ready', 'connected', 'pairing', 'qr_ready',
                     'reconnecting');
-- ... and the rows whose session it missed in an earlier sweep (few, or none).
CREATE INDEX connections_missed ON connections (id) WHERE reconcile_misses > 0;

-- The watchdog: connections that closed before any QR (WhatsApp unreachable) are watched
-- beside connections_live_status (pending, creating, awaiting_qr).
CREATE INDEX connections_unlinked_reconnecting ON connections (status_changed_at)
    WHERE status = 'reconnecting' AND qr_seq = 0;
