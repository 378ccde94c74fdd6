"""The hot queries use indexes on a large history (bench/plans.py; ``python -m bench.plans``
runs the same on a million rows). 200,000 history rows on 10,000 connections load in ~3 s."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import fleet
from bench.plans import explain, with_schema
from services.projector import watchdog
from services.session_worker import manager, reconciler
from zapbus import counts
from zapbus.config import Settings
from zapbus.connection import states

WANTED = {
    "list connections, first page": "Index Scan using connections_tenant_newest",
    "list connections, next page": "Index Scan using connections_tenant_newest",
    "get connection": "Index Scan using connections_pkey",
    "history page": "Index Scan using connection_events_connection",
    "projector: lock the batch's rows": "Index Scan using connections_pkey",
    "projector: events already seen": "using connection_events_event_id_key",
    "retention: a page of ended connections": "Index Scan using connections_ended",
    "retention: their history": "using connection_events_connection",
}


async def test_listing_history_projector_and_retention_use_indexes(settings: Settings) -> None:
    plans = await with_schema(settings.database_url, 200_000, lambda _: None)
    assert {p.name for p in plans} == set(WANTED)
    for plan in plans:
        shown = " > ".join(plan.nodes)
        assert not plan.seq_scans, f"{plan.name}: {shown}"
        assert any(WANTED[plan.name] in node for node in plan.nodes), f"{plan.name}: {shown}"
        # keyset pages read one page from the index: no sort of a tenant's connections
        assert not any("Sort" in node for node in plan.nodes), f"{plan.name}: {shown}"
        assert plan.ms < 50, f"{plan.name} took {plan.ms:.1f} ms: {shown}"


async def test_the_plans_run_on_a_small_history_too(settings: Settings) -> None:
    """``python -m bench.plans --history 2000`` crashed: it looked for a connection on page 2
    of a tenant that had fewer than 50."""
    plans = await with_schema(settings.database_url, 2_000, lambda _: None)
    assert {p.name for p in plans} == set(WANTED)


# What the control plane reads on a timer (issue 21 #5): none of it reads every connection.
CONTROL_PLANE = {
    "reconciler: wanted sessions on a server": "Index Only Scan using connections_wanted",
    "reconciler: wanted sessions, a pool of one": "Index Only Scan using connections_wanted",
    "reconciler: rows an earlier sweep missed": "connections_missed",
    "reconciler: the rows it reads in full": "connections_pkey",
    "watchdog: stuck rows": "connections_live_status",
    "watchdog: stuck rows by state": "connections_live_status",
    "watchdog: connections by state": "",
    "placement, pool manager: placements per server": "",
    "pool manager: creates not placed yet": "connections_live_status",
    "pool manager: creates waiting for room": "connections_waiting",
}


async def test_the_control_plane_reads_indexes_not_every_connection(settings: Settings) -> None:
    """EXPLAIN ANALYZE of each query of the reconciler, the watchdog, placement and the pool
    manager on 30,000 connections at rest (``bench/fleet.py``) over three servers: no
    sequential scan of connections, and the index each was built for."""
    conn = await asyncpg.connect(
        settings.database_url,
        server_settings={"search_path": settings.db_schema, "random_page_cost": "1.1"},
    )
    try:
        await fleet.load(conn, 30_000, ["a", "b", "c"])
        some = [r["id"] for r in await conn.fetch("SELECT id FROM connections LIMIT 10")]
        deadline = datetime.now(UTC) - timedelta(seconds=180)
        queries: dict[str, tuple[str, list[Any]]] = {
            "reconciler: wanted sessions on a server": (reconciler.WANTED_ON, ["a"]),
            "reconciler: wanted sessions, a pool of one": (reconciler.WANTED, []),
            "reconciler: rows an earlier sweep missed": (reconciler.MISSED, []),
            "reconciler: the rows it reads in full": (reconciler.ROWS, [some]),
            "watchdog: stuck rows": (watchdog.STUCK_ROWS, [deadline]),
            "watchdog: stuck rows by state": (watchdog.STUCK_COUNTS, [deadline]),
            "watchdog: connections by state": (counts.STATUS_COUNTS, []),
            "placement, pool manager: placements per server": (counts.PLACED_COUNTS, []),
            "pool manager: creates not placed yet": (manager.UNPLACED, []),
            "pool manager: creates waiting for room": (
                manager.WAITING,
                [states.values(states.AWAITING_CREATE)],
            ),
        }
        assert set(queries) == set(CONTROL_PLANE)
        for name, (sql, args) in queries.items():
            plan = await explain(conn, name, sql, args)
            shown = " > ".join(plan.nodes)
            scans = [n for n in plan.seq_scans if n.split(" [")[0] == "Seq Scan on connections"]
            assert not scans, f"{name}: {shown}"
            assert CONTROL_PLANE[name] in shown, f"{name}: {shown}"
            assert plan.ms < 200, f"{name} took {plan.ms:.1f} ms: {shown}"
    finally:
        await conn.close()
