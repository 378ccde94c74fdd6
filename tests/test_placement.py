"""Placement on a pool of one server with no cap: one statement, deciding as ``choose`` does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from proto.commands import CreateSession
from services.session_worker.placement import Gone, Placed, PlacementPolicy, Waiting, place
from zapbus.servers import ServerSpec
from zapbus.tenants import create_tenant

ONLY = (ServerSpec(name="only", url="http://127.0.0.1:9"),)


async def _create(pool: asyncpg.Pool) -> CreateSession:
    tenant, _ = await create_tenant(pool, f"place-{uuid.uuid4().hex[:6]}")
    cid = uuid.uuid4()
    await pool.execute(
        "INSERT INTO connections (id, tenant_id, name, session_name, status)"
        " VALUES ($1, $2, 'c', $3, 'pending')",
        cid,
        tenant.id,
        f"s-{cid.hex[:8]}",
    )
    return CreateSession(
        command_id=uuid.uuid4(),
        connection_id=cid,
        tenant_id=tenant.id,
        generation=1,
        session_name=f"s-{cid.hex[:8]}",
        requested_at=datetime.now(UTC),
    )


async def _history(pool: asyncpg.Pool, cmd: CreateSession) -> list[str]:
    rows = await pool.fetch(
        "SELECT event_type FROM connection_events WHERE connection_id = $1 ORDER BY seq",
        cmd.connection_id,
    )
    return [r["event_type"] for r in rows]


async def test_the_only_server_takes_a_new_generation_once(pool: asyncpg.Pool) -> None:
    cmd = await _create(pool)
    assert await place(pool, cmd, ONLY, PlacementPolicy()) == Placed("only", new=True)
    assert await place(pool, cmd, ONLY, PlacementPolicy()) == Placed("only", new=False)
    row = await pool.fetchrow(
        "SELECT server, version FROM connections WHERE id = $1", cmd.connection_id
    )
    assert (row["server"], row["version"]) == ("only", 2)
    assert await _history(pool, cmd) == ["placement.assigned"]
    stale = CreateSession(**{**_fields(cmd), "generation": 2})
    assert isinstance(await place(pool, stale, ONLY, PlacementPolicy()), Gone)


async def test_a_drained_or_down_only_server_leaves_the_create_waiting(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO baileys_servers (name, url, drained) VALUES ('only', 'http://x', true)"
    )
    cmd = await _create(pool)
    waiting = await place(pool, cmd, ONLY, PlacementPolicy())
    assert isinstance(waiting, Waiting) and "drained" in waiting.reason
    await pool.execute("UPDATE baileys_servers SET drained = false, up = false, checked_at = now()")
    waiting = await place(pool, cmd, ONLY, PlacementPolicy())
    assert isinstance(waiting, Waiting) and "reachable" in waiting.reason
    # a probe too old to trust: assumed up
    await pool.execute("UPDATE baileys_servers SET checked_at = now() - interval '1 hour'")
    assert await place(pool, cmd, ONLY, PlacementPolicy()) == Placed("only", new=True)
    row = await pool.fetchrow(
        "SELECT server, placement_wait_since, status_reason FROM connections WHERE id = $1",
        cmd.connection_id,
    )
    assert (row["server"], row["placement_wait_since"], row["status_reason"]) == (
        "only",
        None,
        None,
    )
    assert await _history(pool, cmd) == ["placement.waiting", "placement.assigned"]


def _fields(cmd: CreateSession) -> dict[str, object]:
    return {f: getattr(cmd, f) for f in cmd.__struct_fields__}
