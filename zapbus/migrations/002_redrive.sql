-- Watchdog support: the current generation's create command (re-published with the same id
-- when the connection is stuck) and how many times it was re-driven.
ALTER TABLE connections ADD COLUMN command_id uuid;
ALTER TABLE connections ADD COLUMN redrives integer NOT NULL DEFAULT 0;
