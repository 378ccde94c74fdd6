-- Projector partitions: each partition of the events stream is projected by one projector at
-- a time. A projector holds a partition's lease while it projects it and renews it; every batch
-- transaction checks the lease (FOR SHARE), and a takeover (UPDATE) waits for a batch in flight,
-- so two projectors never apply one partition's events at once, even across a handover.
CREATE TABLE projector_leases (
    partition  integer PRIMARY KEY,
    owner      uuid NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Projectors alive (renewed with their leases), to share the partitions fairly among them.
CREATE TABLE projector_members (
    member     uuid PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
