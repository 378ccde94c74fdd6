-- A connection's version: a counter every change of the row bumps in the same UPDATE (and
-- puts in the change it publishes). Live updates compare it, not times: a change's time is
-- its transaction's start, so a change committed later can carry an earlier time.
-- Existing rows start at 1, as a new row does.
ALTER TABLE connections ADD COLUMN version bigint NOT NULL DEFAULT 1;
