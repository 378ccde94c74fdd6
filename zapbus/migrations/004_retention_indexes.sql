-- Indexes for what grows: EXPLAIN on a million history rows (bench/plans.py,
-- tests/test_query_plans.py).

-- Listing a tenant's connections, newest first, keyset by (created_at, id): an index in
-- exactly that order reads one page per request, and the cursor's row comparison is an index
-- condition (the old index had `id` ascending: every page needed an incremental sort).
CREATE INDEX connections_tenant_newest ON connections (tenant_id, created_at DESC, id DESC);
DROP INDEX connections_tenant_created;

-- History retention (services/projector/retention.py) walks connections that ended, oldest
-- first; the live majority stays out of this index.
CREATE INDEX connections_ended ON connections (status_changed_at, id)
    WHERE status IN ('conflict', 'deleted', 'failed', 'logged_out', 'qr_expired');
