"""Placement on a pool of one server with no cap: one statement, deciding as ``choose`` does,
and one statement for the placements asked for together (the worker's burst)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg

from proto.commands import CreateSession
from services.session_worker.placement import (
    Gone,
    OnlyServerPlacements,
    Placed,
    PlacementPolicy,
    Waiting,
    _place_on_only_server,
    place,
)
from tests.stack import CountingPool
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
    assert got[0] == got[1] == Placed("only", new=True)
    assert got[60] == Placed("only", new=False)  # the copy finds it placed, as one by one
    assert isinstance(got[61], Gone)
    assert isinstance(got[2], Waiting), got[2]
    assert got[2].reason.endswith("only failed this create"), got[2].reason
    # one statement for the 62 asks; then the copy reads its placement back, and the excluded
    # one is told why it waits on its own (its placement read back, then the slow way)
    assert counting.statements == 4
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


async def test_a_row_another_transaction_holds_does_not_hold_up_the_batch(
    pool: asyncpg.Pool,
) -> None:
    """The batch skips a locked row (a slow statement elsewhere must not stall, or time out,
    a burst's placements); that one is placed on its own once its lock is free."""
    cmds = [await _create(pool) for _ in range(10)]
    held = cmds[4]
    batch = OnlyServerPlacements(pool)
    async with pool.acquire() as other, other.transaction():
        await other.execute(
            "SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", held.connection_id
        )
        tasks = {
            c.connection_id: asyncio.ensure_future(
                place(pool, c, ONLY, PlacementPolicy(), batch=batch)
            )
            for c in cmds
        }
        others = [t for cid, t in tasks.items() if cid != held.connection_id]
        async with asyncio.timeout(5):
            assert await asyncio.gather(*others) == [Placed("only", new=True)] * 9
        assert not tasks[held.connection_id].done()  # waits for its lock, alone
    async with asyncio.timeout(5):
        assert await tasks[held.connection_id] == Placed("only", new=True)
    assert await _history(pool, held) == ["placement.assigned"]


async def test_a_batch_answers_each_generation_and_each_refusal(pool: asyncpg.Pool) -> None:
    """Two generations of one connection in one batch (only the row's is placed), and a
    drained server refusing a whole batch (each create waits, saying why)."""
    current, other = await _create(pool), await _create(pool)
    await pool.execute("UPDATE connections SET generation = 2 WHERE id = $1", current.connection_id)
    old = current
    new = CreateSession(**{**_fields(current), "generation": 2, "command_id": uuid.uuid4()})
    batch = OnlyServerPlacements(pool)
    got = await asyncio.gather(
        *(place(pool, c, ONLY, PlacementPolicy(), batch=batch) for c in (old, new, other))
    )
    assert isinstance(got[0], Gone)
    assert got[1:] == [Placed("only", new=True)] * 2
    # what the statement answers each: the old generation is not "placed now"
    again = await _create(pool)
    await pool.execute("UPDATE connections SET generation = 2 WHERE id = $1", again.connection_id)
    asks = [(again.connection_id, g, uuid.uuid4()) for g in (1, 2)]
    assert await _place_on_only_server(pool, asks, "only", 30.0) == {
        asks[0]: (2, False),
        asks[1]: (2, True),
    }
    assert (
        await pool.fetchval(
            "SELECT generation FROM placements WHERE connection_id = $1", current.connection_id
        )
        == 2
    )
    await pool.execute(
        "INSERT INTO baileys_servers (name, url, drained) VALUES ('only', 'http://x', true)"
    )
    waiting = [await _create(pool) for _ in range(5)]
    got = await asyncio.gather(
        *(place(pool, c, ONLY, PlacementPolicy(), batch=batch) for c in waiting)
    )
    assert all(isinstance(w, Waiting) and "drained" in w.reason for w in got), got
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM placements WHERE connection_id = ANY($1::uuid[])",
            [c.connection_id for c in waiting],
        )
        == 0
    )
