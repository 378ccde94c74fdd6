"""The connection counts the triggers of migration 016 keep (``zapbus/counts.py``) equal a
COUNT(*) of the connections, whatever writes them: inserts, batch updates, moves between
servers, endings, deletes, data-modifying CTEs, rolled-back transactions, concurrent writers,
with and without a fold in between."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import asyncpg

from proto.commands import CreateSession
from services.session_worker.placement import Placed, PlacementPolicy, place
from zapbus.connection import states
from zapbus.connection.states import Status
from zapbus.counts import FOLD, PLACED_COUNTS, STATUS_COUNTS
from zapbus.servers import ServerSpec
from zapbus.tenants import create_tenant

SERVERS = ["a", "b", "c", None]
ALL = [s.value for s in Status]


async def _counted(pool: asyncpg.Pool) -> tuple[dict[str, int], dict[str, int]]:
    placed = {r["server"]: r["n"] for r in await pool.fetch(PLACED_COUNTS) if r["n"]}
    by_status = {r["status"]: r["n"] for r in await pool.fetch(STATUS_COUNTS) if r["n"]}
    return placed, by_status


async def _truth(pool: asyncpg.Pool) -> tuple[dict[str, int], dict[str, int]]:
    placed = {
        r["server"]: r["n"]
        for r in await pool.fetch(
            "SELECT server, count(*) AS n FROM connections WHERE server IS NOT NULL"
            " AND NOT (status = ANY($1::text[])) GROUP BY server",
            states.values(states.TERMINAL),
        )
    }
    by_status = {
        r["status"]: r["n"]
        for r in await pool.fetch("SELECT status, count(*) AS n FROM connections GROUP BY 1")
    }
    return placed, by_status


async def _insert(pool: asyncpg.Pool, tenant: uuid.UUID, rng: random.Random, n: int) -> None:
    rows = []
    for _ in range(n):
        cid = uuid.uuid4()
        rows.append((cid, tenant, f"zb_{cid.hex}_g1", rng.choice(ALL), rng.choice(SERVERS)))
    await pool.executemany(
        "INSERT INTO connections (id, tenant_id, name, session_name, status, server)"
        " VALUES ($1, $2, 'c', $3, $4, $5)",
        rows,
    )


async def _step(pool: asyncpg.Pool, tenant: uuid.UUID, rng: random.Random) -> str:
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM connections")]
    some = rng.sample(ids, min(len(ids), rng.randint(1, 40)))
    match rng.randrange(8):
        case 0:
            await _insert(pool, tenant, rng, rng.randint(1, 30))
            return "insert"
        case 1:  # a projector batch: one UPDATE of many rows
            await pool.execute(
                "UPDATE connections c SET status = u.status FROM unnest($1::uuid[], $2::text[])"
                " AS u(id, status) WHERE c.id = u.id",
                some,
                [rng.choice(ALL) for _ in some],
            )
            return "batch"
        case 2:  # moves: the next generation, not placed
            await pool.execute(
                "UPDATE connections SET server = NULL, status = $2, generation = generation + 1"
                " WHERE id = ANY($1::uuid[])",
                some,
                Status.PENDING.value,
            )
            return "move"
        case 3:  # placed (again) on a server
            await pool.execute(
                "UPDATE connections SET server = $2 WHERE id = ANY($1::uuid[])",
                some,
                rng.choice(SERVERS[:-1]),
            )
            return "place"
        case 4:
            await pool.execute("DELETE FROM connections WHERE id = ANY($1::uuid[])", some)
            return "delete"
        case 5:  # a CTE that updates and reads back, as placement's one statement does
            await pool.execute(
                "WITH moved AS (UPDATE connections SET status = $2 WHERE id = ANY($1::uuid[])"
                " RETURNING id) SELECT count(*) FROM moved",
                some,
                rng.choice(ALL),
            )
            return "cte"
        case 6:  # rolled back: counts nothing
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("DELETE FROM connections WHERE id = ANY($1::uuid[])", some)
                    raise _Undo
            except _Undo:
                pass
            return "rollback"
        case _:  # updates that move no count (a QR, a hold)
            await pool.execute(
                "UPDATE connections SET qr_seq = qr_seq + 1, held_until = now()"
                " WHERE id = ANY($1::uuid[])",
                some,
            )
            return "touch"


class _Undo(Exception):
    pass


async def test_the_counts_equal_a_count_of_every_connection(pool: asyncpg.Pool) -> None:
    tenant, _ = await create_tenant(pool, f"counts-{uuid.uuid4().hex[:6]}")
    rng = random.Random(21)
    await _insert(pool, tenant.id, rng, 200)
    assert await _counted(pool) == await _truth(pool)
    for n in range(120):
        what = await _step(pool, tenant.id, rng)
        if rng.random() < 0.3:
            await pool.execute(FOLD)
        assert await _counted(pool) == await _truth(pool), f"step {n}: {what}"
    await pool.execute(FOLD)
    assert await pool.fetchval("SELECT count(*) FROM connection_count_changes") == 0
    assert await _counted(pool) == await _truth(pool)


async def test_concurrent_writers_and_folds_lose_no_change(pool: asyncpg.Pool) -> None:
    tenant, _ = await create_tenant(pool, f"counts-{uuid.uuid4().hex[:6]}")
    await _insert(pool, tenant.id, random.Random(1), 300)

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            await _step(pool, tenant.id, rng)

    async def folder() -> None:
        for _ in range(25):
            await pool.execute(FOLD)
            await asyncio.sleep(0)

    await asyncio.gather(writer(2), writer(3), folder(), folder())
    assert await _counted(pool) == await _truth(pool)


async def test_placement_counts_each_placement_at_once(pool: asyncpg.Pool) -> None:
    """Placement among servers with a cap reads the counts: each placement is counted by the
    next (no pool manager runs here), and ends free room at once."""
    tenant, _ = await create_tenant(pool, f"counts-{uuid.uuid4().hex[:6]}")
    specs = tuple(ServerSpec(name=n, url=f"http://{n}:9") for n in ("a", "b"))
    policy = PlacementPolicy(max_sessions=3)
    placed: list[str] = []
    cmds = []
    for _ in range(6):
        cid = uuid.uuid4()
        await pool.execute(
            "INSERT INTO connections (id, tenant_id, name, session_name, status)"
            " VALUES ($1, $2, 'c', $3, $4)",
            cid,
            tenant.id,
            f"zb_{cid.hex}_g1",
            Status.PENDING.value,
        )
        cmd = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=cid,
            tenant_id=tenant.id,
            generation=1,
            session_name=f"zb_{cid.hex}_g1",
            requested_at=datetime.now(UTC),
        )
        cmds.append(cmd)
        got = await place(pool, cmd, specs, policy)
        assert isinstance(got, Placed)
        placed.append(got.server)
    assert sorted(placed) == ["a", "a", "a", "b", "b", "b"]
    one_more = uuid.uuid4()
    await pool.execute(
        "INSERT INTO connections (id, tenant_id, name, session_name, status)"
        " VALUES ($1, $2, 'c', $3, $4)",
        one_more,
        tenant.id,
        f"zb_{one_more.hex}_g1",
        Status.PENDING.value,
    )
    late = CreateSession(**{**_fields(cmds[0]), "connection_id": one_more})
    assert not isinstance(await place(pool, late, specs, policy), Placed)  # full
    await pool.execute(
        "UPDATE connections SET status = $2 WHERE id = $1",
        cmds[0].connection_id,
        Status.FAILED.value,
    )
    freed = placed[0]
    assert await place(pool, late, specs, policy) == Placed(freed, new=True)


def _fields(cmd: CreateSession) -> dict[str, object]:
    return {f: getattr(cmd, f) for f in cmd.__struct_fields__}
