"""The hot queries use indexes on a large history (bench/plans.py; ``python -m bench.plans``
runs the same on a million rows). 200,000 history rows on 10,000 connections load in ~3 s."""

from __future__ import annotations

from bench.plans import with_schema
from zapbus.config import Settings

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
