"""Holds (session_worker/holds.py) on a real Postgres: the renewal locks rows like the
projector's batch does, in id order, so the two never deadlock."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from services.session_worker.holds import Holds
from zapbus.tenants import create_tenant


async def _wait_until_blocked(pool: asyncpg.Pool, deadline_s: float = 30.0) -> None:
    """Until a renewal waits on a row lock (what the projector-like transaction holds)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%held_until%' AND pid <> pg_backend_pid()"
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the renewal never waited on the locked row within {deadline_s} s")


async def test_renew_locks_rows_in_id_order_like_a_projector_batch(pool: asyncpg.Pool) -> None:
    """A projector batch (store.py) locks its rows ``ORDER BY id``. Rows stored in the
    opposite order of their ids made a plain ``UPDATE ... WHERE id = ANY`` lock the higher id
    first: with the batch holding the lower one and asking for the higher, each waited for the
    other until Postgres aborted one (a deadlock, seen in the 1,000-session burst)."""
    tenant, _ = await create_tenant(pool, f"holds-{uuid.uuid4().hex[:6]}")
    ids = sorted(uuid.uuid4() for _ in range(20))
    low, high = ids[0], ids[-1]
    for cid in reversed(ids):  # stored highest id first
        await pool.execute(
            "INSERT INTO connections (id, tenant_id, name, session_name, status)"
            " VALUES ($1, $2, 'c', $3, 'creating')",
            cid,
            tenant.id,
            f"s-{cid.hex[:8]}",
        )
    holds = Holds(pool, every_seconds=60.0, hold_seconds=60.0)
    async with pool.acquire() as batch:
        # a generous lock timeout: with the renewal holding `high`, Postgres's deadlock
        # check (1 s) ends one of the two first
        await batch.execute("SET lock_timeout = '20s'")
        tx = batch.transaction()
        await tx.start()
        try:
            await batch.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", low)
            with holds.hold(high), holds.hold(low):
                renewal = asyncio.create_task(holds.renew())
                await _wait_until_blocked(pool)
                # the batch's next row: free, since the renewal waits for `low` first
                await batch.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", high)
                await tx.commit()
                await asyncio.wait_for(renewal, 30.0)
        except BaseException:
            if not tx._done:
                await tx.rollback()
            raise
    held = await pool.fetch(
        "SELECT id FROM connections WHERE id = ANY($1::uuid[]) AND held_until > now()",
        [low, high],
    )
    assert {r["id"] for r in held} == {low, high}
