"""Concurrent reads share a round trip (zapbus/coalesce.py): the fence's reads of a burst of
creates against the real Postgres, and the loader's answers, failures and cancellations."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from proto.commands import CreateSession
from services.session_worker.fence import Fence, Verdict
from tests.stack import CountingPool
from zapbus.coalesce import BatchLoader, SingleFlight
from zapbus.tenants import create_tenant


async def _rows(pool: asyncpg.Pool, statuses: list[str]) -> list[uuid.UUID]:
    tenant, _ = await create_tenant(pool, "fence")
    ids = [uuid.uuid4() for _ in statuses]
    await pool.executemany(
        "INSERT INTO connections (id, tenant_id, name, generation, session_name, status)"
        " VALUES ($1, $2, 'f', 1, $3, $4)",
        [(i, tenant.id, f"zb_{i.hex}_g1", s) for i, s in zip(ids, statuses, strict=True)],
    )
    return ids


def _create(cid: uuid.UUID, generation: int = 1) -> CreateSession:
    return CreateSession(
        command_id=uuid.uuid4(),
        connection_id=cid,
        tenant_id=uuid.uuid4(),
        generation=generation,
        session_name=f"zb_{cid.hex}_g{generation}",
        requested_at=datetime.now(UTC),
    )


async def test_the_fresh_checks_of_a_burst_of_creates_are_one_query(pool: asyncpg.Pool) -> None:
    statuses = ["creating", "awaiting_qr", "deleted"] * 100
    ids = await _rows(pool, statuses)
    counting = CountingPool(pool)
    fence = Fence(counting)  # type: ignore[arg-type]
    cmds = [_create(i) for i in ids] + [_create(uuid.uuid4()), _create(ids[0], generation=2)]
    verdicts = await asyncio.gather(*(fence.check_create(c) for c in cmds))
    expected = {"creating": Verdict.RUN, "awaiting_qr": Verdict.DONE, "deleted": Verdict.UNDO}
    assert verdicts[:-2] == [expected[s] for s in statuses]
    assert verdicts[-2:] == [Verdict.UNDO, Verdict.UNDO]  # no row; a newer generation asked
    assert counting.statements == 1
    # each check reads the row as it is when asked, not an earlier answer
    await pool.execute("UPDATE connections SET status = 'deleted' WHERE id = $1", ids[0])
    assert await fence.check_create(cmds[0]) is Verdict.UNDO
    assert counting.statements == 2


async def test_a_database_that_cannot_be_asked_is_unknown_for_every_check(
    pool: asyncpg.Pool,
) -> None:
    ids = await _rows(pool, ["creating"] * 3)
    broken = await asyncpg.create_pool(
        "postgresql://postgres@127.0.0.1:1/none", min_size=0, max_size=1
    )
    fence = Fence(broken)
    try:
        verdicts = await asyncio.gather(*(fence.check_create(_create(i)) for i in ids))
    finally:
        await broken.close()
    assert verdicts == [Verdict.UNKNOWN] * 3


async def test_the_loader_answers_each_key_and_fails_every_caller_of_a_failed_load() -> None:
    calls: list[list[int]] = []
    fail = False

    async def load(keys: list[int]) -> dict[int, str]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        if fail:
            raise OSError("down")
        return {k: str(k) for k in keys if k % 2 == 0}

    loader: BatchLoader[int, str] = BatchLoader(load, max_batch=50)
    got = await asyncio.gather(*(loader.get(k % 80) for k in range(120)))
    assert got == [str(k % 80) if k % 2 == 0 else None for k in range(120)]
    assert [len(c) for c in calls] == [50, 30]  # 120 asks, 80 keys, batches of at most 50
    fail = True
    results = await asyncio.gather(*(loader.get(k) for k in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [OSError] * 3


async def test_a_caller_that_gives_up_leaves_the_others_their_answer() -> None:
    release = asyncio.Event()

    async def load(keys: list[int]) -> dict[int, int]:
        await release.wait()
        return {k: k * 10 for k in keys}

    loader: BatchLoader[int, int] = BatchLoader(load)
    impatient = asyncio.ensure_future(loader.get(1))
    patient = asyncio.ensure_future(loader.get(2))
    await asyncio.sleep(0.01)
    impatient.cancel()
    release.set()
    assert await patient == 20
    with pytest.raises(asyncio.CancelledError):
        await impatient

    flight: SingleFlight[str, int] = SingleFlight()
    started = 0
    gate = asyncio.Event()

    async def fetch() -> int:
        nonlocal started
        started += 1
        await gate.wait()
        return 7

    first = asyncio.ensure_future(flight.do("k", fetch))
    others = [asyncio.ensure_future(flight.do("k", fetch)) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    gate.set()
    assert await asyncio.gather(*others) == [7] * 5
    assert started == 1 and flight.in_flight() == 0
    assert await flight.do("k", fetch) == 7 and started == 2  # after the answer: a new lookup
