"""Placement on a pool of one server with no cap: one statement, deciding as ``choose`` does,
and one statement for the placements asked for together (the worker's burst)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from proto.commands import CreateSession
from services.session_worker.placement import (
    Gone,
    OnlyServerPlacements,
    Placed,
    PlacementPolicy,
    Waiting,
    place,
)
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


class CountingPool:
    """The real pool, counting the statements made through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.pool, name)
        if name in ("fetch", "fetchrow", "fetchval", "execute", "acquire"):
            self.statements += 1
        return attr


async def test_the_placements_of_a_burst_are_one_statement(pool: asyncpg.Pool) -> None:
    cmds = [await _create(pool) for _ in range(60)]
    again = CreateSession(**{**_fields(cmds[0]), "command_id": uuid.uuid4()})  # a copy
    newer = CreateSession(**{**_fields(cmds[1]), "generation": 2})  # not the row's
    excluded = cmds[2]
    await pool.execute(
        "UPDATE connections SET placement_excluded = '{only}' WHERE id = $1",
        excluded.connection_id,
    )
    counting = CountingPool(pool)
    batch = OnlyServerPlacements(counting)  # type: ignore[arg-type]
    asked = [*cmds, again, newer]
    got = await asyncio.gather(
        *(place(counting, c, ONLY, PlacementPolicy(), batch=batch) for c in asked)  # type: ignore[arg-type]
    )
    placed = [c for c in cmds if c is not excluded]
    assert got[3:60] == [Placed("only", new=True)] * 57
    assert got[0] == got[1] == got[60] == Placed("only", new=True)  # the copy shares its answer
    assert isinstance(got[61], Gone)
    assert isinstance(got[2], Waiting), got[2]
    assert got[2].reason.endswith("only failed this create"), got[2].reason
    # one statement for the 62 asks; then the excluded one is told why it waits, on its own
    # (its placement read back, then the slow way: one connection)
    assert counting.statements == 3
    rows = await pool.fetch(
        "SELECT id, server, version FROM connections WHERE id = ANY($1::uuid[])",
        [c.connection_id for c in cmds],
    )
    by_id = {r["id"]: r for r in rows}
    for c in placed:
        assert (by_id[c.connection_id]["server"], by_id[c.connection_id]["version"]) == ("only", 2)
        assert await _history(pool, c) == ["placement.assigned"]
    assert by_id[excluded.connection_id]["server"] is None
    # asked again later: read back, not placed twice
    assert await place(pool, cmds[5], ONLY, PlacementPolicy(), batch=batch) == Placed(
        "only", new=False
    )
