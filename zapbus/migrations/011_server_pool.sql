-- A pool of Baileys servers (ZAPBUS_BAILEYS_URLS): each connection generation is placed on
-- one server, recorded here, and every call for that generation goes to that server only.
ALTER TABLE connections ADD COLUMN server text;
-- A create that found every server full (or none reachable) waits here, not on the bus:
-- the pool manager queues it again, oldest first, as capacity frees.
ALTER TABLE connections ADD COLUMN placement_wait_since timestamptz;
ALTER TABLE connections ADD COLUMN placement_requeued_at timestamptz;
-- servers that failed this generation's create (it is placed anew, on another one)
ALTER TABLE connections ADD COLUMN placement_excluded text[];
CREATE INDEX connections_placed ON connections (server)
    WHERE status NOT IN ('deleted', 'failed', 'logged_out', 'qr_expired', 'conflict');
CREATE INDEX connections_waiting ON connections (placement_wait_since)
    WHERE placement_wait_since IS NOT NULL;

-- Every generation's server, also after the row moved on (a fenced create is undone there).
CREATE TABLE placements (
    connection_id uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    generation    integer NOT NULL,
    server        text NOT NULL,
    -- the clock when it was made (under the placement lock), not the transaction's start
    placed_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (connection_id, generation)
);
CREATE INDEX placements_recent ON placements (placed_at);

-- Which server holds a session zapbus wants gone (NULL: the generation's placement).
ALTER TABLE session_deletes ADD COLUMN server text;
-- The server a history row is about (placements, moves).
ALTER TABLE connection_events ADD COLUMN server text;

-- What the pool manager (one session worker at a time) saw of each server, and the
-- operator's drain flags. Servers themselves come from configuration.
CREATE TABLE baileys_servers (
    name        text PRIMARY KEY,
    url         text NOT NULL,           -- without credentials
    drained     boolean NOT NULL DEFAULT false,
    move        boolean NOT NULL DEFAULT false,   -- drain --move: re-place its connections
    moving      uuid,                    -- the connection being moved off it now
    up          boolean,                 -- the last /health answered (NULL: never probed)
    sessions    integer,                 -- the server's own /health figure
    checked_at  timestamptz,
    down_since  timestamptz,             -- first failed probe of the current outage
    up_since    timestamptz,             -- back after an outage since (NULL: never down)
    -- zapbus's live placements there, counted by the pool manager under the placement lock
    -- at placed_counted_at: placement adds the placements made since, instead of counting
    -- every live connection each time
    placed      integer,
    placed_counted_at timestamptz,
    -- the last create it failed on every attempt (it takes placements only when no other
    -- server can, for a while)
    create_failed_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
