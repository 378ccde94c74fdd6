"""Query plans on a large history: do listing, history pages, the projector's lookups and the
retention job use indexes? ``python -m bench.plans --history 1000000`` loads that many history
rows (one per 20 on a connection) into a throwaway schema, prints each query's plan summary and
time, and drops the schema. ``tests/test_query_plans.py`` runs the same check on 200,000 rows.

Each plan is ``EXPLAIN ANALYZE`` of the statement as the service sends it, with the values bound
(a statement that deletes runs in a transaction that is rolled back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.gateway import store as gateway_store
from services.projector import retention
from services.projector import store as projector_store
from zapbus import db

EVENTS_PER_CONNECTION = 20
TENANTS = 20


@dataclass(frozen=True)
class Sample:
    """Ids of the loaded data that the queries look up."""

    tenant_id: uuid.UUID
    connection_id: uuid.UUID
    connection_ids: list[uuid.UUID]
    event_ids: list[uuid.UUID]
    created_at: datetime
    middle_seq: int


async def load(conn: asyncpg.Connection, history: int) -> Sample:
    """``history`` history rows on ``history / 20`` connections of 20 tenants; a quarter of
    the connections ended (half of those deleted) between 0 and 200 days ago; then ANALYZE."""
    connections = max(1, history // EVENTS_PER_CONNECTION)
    await conn.execute(
        "INSERT INTO tenants (id, name, api_key_hash)"
        " SELECT gen_random_uuid(), 'plan-' || t, sha256(('k' || t)::bytea)"
        " FROM generate_series(1, $1) t",
        TENANTS,
    )
    await conn.execute(
        """
        INSERT INTO connections (id, tenant_id, name, session_name, status, created_at,
            updated_at, status_changed_at)
        SELECT gen_random_uuid(), t.ids[1 + n % $2], 'c' || n, 'zb_' || n,
            CASE WHEN n % 8 = 0 THEN 'deleted' WHEN n % 8 = 1 THEN 'failed'
                 WHEN n % 8 IN (2, 3, 4) THEN 'connected' WHEN n % 8 = 5 THEN 'qr_ready'
                 ELSE 'awaiting_qr' END,
            now() - make_interval(secs => (n % 17280000)::float8),
            now(), now() - make_interval(days => n % 200)
        FROM generate_series(1, $1) n, (SELECT array_agg(id) AS ids FROM tenants) t
        """,
        connections,
        TENANTS,
    )
    await conn.execute(
        """
        INSERT INTO connection_events (event_id, connection_id, generation, event_type,
            from_status, to_status, applied, occurred_at, recorded_at)
        SELECT gen_random_uuid(), c.id, 1, 'status.reported', 'qr_ready', 'connected', true,
            c.created_at + make_interval(secs => e), c.created_at + make_interval(secs => e)
        FROM (SELECT id, created_at, row_number() OVER () AS rn FROM connections) c,
            generate_series(1, $2) e
        WHERE c.rn <= $1
        """,
        connections,
        EVENTS_PER_CONNECTION,
    )
    await conn.execute("ANALYZE tenants; ANALYZE connections; ANALYZE connection_events")
    # the tenant with the most connections (a small load leaves some tenants without any)
    tenant_id, owned = await conn.fetchrow(
        "SELECT tenant_id, count(*) FROM connections GROUP BY tenant_id"
        " ORDER BY count(*) DESC, tenant_id LIMIT 1"
    )
    # a connection some way into the tenant's listing (page 2 at 50 a page, when it has one)
    row = await conn.fetchrow(
        "SELECT id, created_at FROM connections WHERE tenant_id = $1"
        " ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
        tenant_id,
        min(50, owned // 2),
    )
    batch = [r["id"] for r in await conn.fetch("SELECT id FROM connections LIMIT 200")]
    events = [
        r["event_id"] for r in await conn.fetch("SELECT event_id FROM connection_events LIMIT 512")
    ]
    middle = await conn.fetchval(
        "SELECT seq FROM connection_events WHERE connection_id = $1 ORDER BY seq OFFSET 10 LIMIT 1",
        row["id"],
    )
    return Sample(
        tenant_id=tenant_id,
        connection_id=row["id"],
        connection_ids=batch,
        event_ids=events,
        created_at=row["created_at"],
        middle_seq=middle,
    )


def queries(s: Sample) -> dict[str, tuple[str, list[Any]]]:
    """The hot queries, as the services send them, with arguments from the sample."""
    cols = gateway_store.COLUMNS
    return {
        "list connections, first page": (
            f"SELECT {cols} FROM connections WHERE tenant_id = $1"
            " ORDER BY created_at DESC, id DESC LIMIT $2",
            [s.tenant_id, 51],
        ),
        "list connections, next page": (
            f"SELECT {cols} FROM connections WHERE tenant_id = $1"
            " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4",
            [s.tenant_id, s.created_at, s.connection_id, 51],
        ),
        "get connection": (
            f"SELECT {cols} FROM connections WHERE id = $1 AND tenant_id = $2",
            [s.connection_id, s.tenant_id],
        ),
        "history page": (
            "SELECT seq, generation, event_type, from_status, to_status, applied, code,"
            " reason, occurred_at, recorded_at FROM connection_events WHERE connection_id = $1"
            " AND seq > $2 ORDER BY seq LIMIT $3",
            [s.connection_id, s.middle_seq, 101],
        ),
        "projector: lock the batch's rows": (projector_store._LOAD, [s.connection_ids]),
        "projector: events already seen": (
            "SELECT event_id FROM connection_events WHERE event_id = ANY($1::uuid[])",
            [s.event_ids],
        ),
        "retention: a page of ended connections": (
            retention._PAGE,
            [
                datetime.now(UTC) - timedelta(days=90),
                datetime.min.replace(tzinfo=UTC),
                uuid.UUID(int=0),
                1000,
            ],
        ),
        "retention: their history": (
            "DELETE FROM connection_events WHERE connection_id = ANY($1)"
            " AND (recorded_at < $2 OR connection_id = ANY($3))",
            [s.connection_ids, datetime.now(UTC) - timedelta(days=90), s.connection_ids[:10]],
        ),
    }


@dataclass(frozen=True)
class Plan:
    name: str
    nodes: list[str]  # "Index Scan using connections_pkey on connections", ...
    ms: float

    @property
    def seq_scans(self) -> list[str]:
        return [n for n in self.nodes if n.startswith("Seq Scan")]


def _short(text: str) -> str:
    return re.sub(r"'\{[^}]*\}'", "'{...}'", re.sub(r"'[0-9a-f-]{36}'", "'...'", text))


def _nodes(plan: dict[str, Any]) -> list[str]:
    name = plan["Node Type"]
    if "Index Name" in plan:
        name += f" using {plan['Index Name']}"
    if "Relation Name" in plan:
        name += f" on {plan['Relation Name']}"
    if "Index Cond" in plan:
        name += f" [cond {_short(plan['Index Cond'])}]"
    if "Filter" in plan:
        name += f" [filter {_short(plan['Filter'])}]"
    out = [name]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


class _Rollback(Exception):
    def __init__(self, plan: Plan) -> None:
        self.plan = plan


async def explain(conn: asyncpg.Connection, name: str, sql: str, args: list[Any]) -> Plan:
    """``EXPLAIN ANALYZE`` of one statement, in a transaction rolled back (it may write)."""
    try:
        async with conn.transaction():
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            doc = json.loads(raw)[0]
            raise _Rollback(Plan(name, _nodes(doc["Plan"]), doc["Execution Time"]))
    except _Rollback as done:
        return done.plan


async def explain_all(conn: asyncpg.Connection, s: Sample) -> list[Plan]:
    return [await explain(conn, name, sql, args) for name, (sql, args) in queries(s).items()]


async def with_schema(dsn: str, history: int, report: Callable[[str], None]) -> list[Plan]:
    """Load ``history`` rows into a throwaway schema, explain, drop it."""
    schema = f"plans_{uuid.uuid4().hex[:8]}"
    await db.migrate(dsn, schema)
    conn = await asyncpg.connect(
        dsn, server_settings={"search_path": schema, "random_page_cost": "1.1"}
    )
    try:
        started = time.perf_counter()
        sample = await load(conn, history)
        report(f"loaded {history:,} history rows in {time.perf_counter() - started:.1f} s")
        return await explain_all(conn, sample)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "ZAPBUS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    plans = asyncio.run(with_schema(args.database_url, args.history, print))
    for p in plans:
        print(f"\n{p.name}: {p.ms:.2f} ms")
        print("  " + " > ".join(p.nodes))
    bad = [p.name for p in plans if p.seq_scans]
    print("\nsequential scans: " + (", ".join(bad) if bad else "none"))


if __name__ == "__main__":
    main()
