"""History retention (ZAPBUS_HISTORY_RETENTION_DAYS): connections that ended long ago lose
their history, deleted ones their row too; anything live or recent stays."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry

from services.projector.retention import Retention, RetentionMetrics
from zapbus.config import load_settings

NOW = datetime.now(UTC)


async def _connection(
    conn: asyncpg.Connection, tenant: uuid.UUID, status: str, ended_days_ago: float
) -> uuid.UUID:
    cid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO connections (id, tenant_id, name, session_name, status, created_at,"
        " status_changed_at) VALUES ($1, $2, 'c', 's', $3, $4, $4)",
        cid,
        tenant,
        status,
        NOW - timedelta(days=ended_days_ago),
    )
    return cid


async def _history(conn: asyncpg.Connection, cid: uuid.UUID, days_ago: float) -> None:
    await conn.execute(
        "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
        " applied, occurred_at, recorded_at) VALUES ($1, $2, 1, 'x', true, $3, $3)",
        uuid.uuid4(),
        cid,
        NOW - timedelta(days=days_ago),
    )


def test_the_setting_defaults_to_90_days() -> None:
    assert load_settings({}).history_retention_days == 90
    assert load_settings({"ZAPBUS_HISTORY_RETENTION_DAYS": "30"}).history_retention_days == 30


async def test_retention_removes_what_ended_long_ago_and_keeps_the_rest(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        tenant = uuid.uuid4()
        await conn.execute(
            "INSERT INTO tenants (id, name, api_key_hash) VALUES ($1, 't', '\\x00')", tenant
        )
        # 5 old deleted connections, 3 histories each: rows and history go (paged by 2)
        old_deleted = [await _connection(conn, tenant, "deleted", 100) for _ in range(5)]
        for cid in old_deleted:
            for days in (120, 110, 100):
                await _history(conn, cid, days)
        # failed long ago, with a late (ignored) event yesterday: old history goes, row stays
        old_failed = await _connection(conn, tenant, "failed", 95)
        await _history(conn, old_failed, 96)
        await _history(conn, old_failed, 1)
        # deleted recently; connected for long (live): all kept
        recent_deleted = await _connection(conn, tenant, "deleted", 10)
        await _history(conn, recent_deleted, 200)
        live = await _connection(conn, tenant, "connected", 300)
        await _history(conn, live, 300)

    registry = CollectorRegistry()
    retention = Retention(pool, 90, RetentionMetrics(registry), batch=2)
    assert await retention.purge() == (5 * 3 + 1, 5)

    rows = {r["id"] for r in await pool.fetch("SELECT id FROM connections")}
    assert rows == {old_failed, recent_deleted, live}
    history = {
        r["connection_id"]: r["n"]
        for r in await pool.fetch(
            "SELECT connection_id, count(*) AS n FROM connection_events GROUP BY 1"
        )
    }
    assert history == {old_failed: 1, recent_deleted: 1, live: 1}
    deleted = registry.get_sample_value(
        "zapbus_retention_deleted_rows_total", {"table": "connection_events"}
    )
    assert deleted == 16
    # nothing more to do; and 0 days keeps everything
    assert await retention.purge() == (0, 0)
    assert await Retention(pool, 0, RetentionMetrics(CollectorRegistry())).purge() is None
