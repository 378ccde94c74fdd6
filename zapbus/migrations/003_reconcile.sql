-- The server's truth: what the reconciler and the worker need to keep Postgres and the Baileys
-- server in agreement.

-- A worker holding a create for this row (waiting on the breaker, a create slot, or inside the
-- call) pushes this forward on every heartbeat; the watchdog leaves held rows alone.
ALTER TABLE connections ADD COLUMN held_until timestamptz;
-- Reconciler: consecutive sweeps that found the current generation's session missing on the
-- server, and how many times this generation was re-created because it was lost.
ALTER TABLE connections ADD COLUMN reconcile_misses integer NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN reconcile_recreates integer NOT NULL DEFAULT 0;

-- Every Baileys session zapbus asked to delete and has not yet seen deleted. Written in the same
-- transaction as the DeleteSession command's outbox row; removed when the worker's
-- `session.deleted` is projected (or the reconciler sees the session gone). The watchdog
-- re-drives entries that stay here, as it does stuck creates.
CREATE TABLE session_deletes (
    session_name   text PRIMARY KEY,
    connection_id  uuid NOT NULL,
    generation     integer NOT NULL,
    command_id     uuid NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    last_driven_at timestamptz NOT NULL DEFAULT now(),
    redrives       integer NOT NULL DEFAULT 0
);
CREATE INDEX session_deletes_driven ON session_deletes (last_driven_at);
