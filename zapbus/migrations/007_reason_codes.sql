-- What 2026 servers report: a machine-readable reason code beside the free-text reason (on the
-- row and in history), and the 440 (connection replaced) closes counted in the current window.
ALTER TABLE connections ADD COLUMN reason_code text;
ALTER TABLE connections ADD COLUMN conflicts integer NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN conflicts_since timestamptz;
ALTER TABLE connection_events ADD COLUMN reason_code text;
