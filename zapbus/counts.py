"""Connections per (server, status), kept by triggers (migration 016), so the control plane
reads a few rows where it counted every connection.

Every statement that changes connections appends its net change per (server, status) to
``connection_count_changes``; ``connection_counts`` holds what was folded. A count is the
sum of both (``COUNTS``); ``FOLD`` moves the changes into the counts (the pool manager's
leader each tick, the watchdog each sweep; two folds at once are safe: each moves only the
changes it deleted, and upserts in one order). ``server`` is ``''`` for a row not placed.
"""

from __future__ import annotations

from zapbus.connection import states

COUNTS = (
    "(SELECT server, status, n FROM connection_counts"
    " UNION ALL SELECT server, status, n FROM connection_count_changes)"
)

# zapbus's live placements per server (placement, the pool manager, ``zapbus server list``)
PLACED_COUNTS = (
    f"SELECT server, sum(n)::bigint AS n FROM {COUNTS} c"
    f" WHERE server <> '' AND status NOT IN {states.sql_list(states.TERMINAL)}"
    " GROUP BY server"
)

# connections by state (the watchdog's ``zapbus_connections`` gauge)
STATUS_COUNTS = f"SELECT status, sum(n)::bigint AS n FROM {COUNTS} c GROUP BY status"

FOLD = """
WITH folded AS (DELETE FROM connection_count_changes RETURNING server, status, n)
INSERT INTO connection_counts (server, status, n)
SELECT server, status, sum(n) FROM folded GROUP BY server, status ORDER BY server, status
ON CONFLICT (server, status) DO UPDATE SET n = connection_counts.n + excluded.n
"""
