"""Leases (zapbus/leases.py): one replica at a time, and a frozen one does not keep it.

A replica "freezes" here by simply not touching its lease's connection (as a SIGSTOPped
process would not): Postgres ends that session after the lease's timeout, another replica
takes over, and the frozen one finds out at its next statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from services.session_worker.app import build_servers, placement_policy
from services.session_worker.manager import ServerPoolManager, ServerPoolMetrics
from tests.stack import wait_for
from zapbus import db
from zapbus.config import Settings
from zapbus.leases import Lease, LeaseLost


@pytest.fixture
async def conns(pool: asyncpg.Pool) -> AsyncIterator[list[asyncpg.Connection]]:
    held = [await pool.acquire() for _ in range(2)]
    try:
        yield held
    finally:
        for conn in held:
            await pool.release(conn)


async def test_a_frozen_holder_loses_its_lease_to_another_and_learns_it(
    conns: list[asyncpg.Connection],
) -> None:
    a, b = Lease(conns[0], "t.lease", 1.0), Lease(conns[1], "t.lease", 1.0)
    assert await a.take()
    assert not await b.take()  # one holder at a time
    # a does nothing more (frozen): Postgres ends its session, and b gets the lease
    await wait_for("the lease freed by the frozen holder", b.take, every=0.2)
    with pytest.raises(LeaseLost):
        await a.confirm()
    await b.confirm()
    await b.release()
    assert await b.take()  # released, and taken again
    await b.release()


async def test_a_holder_kept_alive_keeps_its_lease(conns: list[asyncpg.Connection]) -> None:
    a, b = Lease(conns[0], "t.kept", 0.6), Lease(conns[1], "t.kept", 0.6)
    assert await a.take()
    async with a.kept_alive():
        # four times the timeout, trying all along: never free while a pings its session
        assert not await b.take_within(2.4)
        await a.confirm()
    await a.release()
    assert await b.take()
    await b.release()


async def test_leases_are_per_schema(settings: Settings, pool: asyncpg.Pool) -> None:
    other = await asyncpg.connect(settings.database_url, server_settings={"search_path": "public"})
    mine = await pool.acquire()
    try:
        a, b = Lease(mine, "t.schema"), Lease(other, "t.schema")
        assert await a.take()
        assert await b.take()  # same name, another schema: another deployment's lease
        await a.release()
        await b.release()
    finally:
        await pool.release(mine)
        await other.close()


def _manager(s: Settings, http: aiohttp.ClientSession, pool: asyncpg.Pool) -> ServerPoolManager:
    """A pool manager whose lease Postgres ends after 1 s idle."""
    servers = build_servers(s, http, None)
    return ServerPoolManager(
        pool=pool,
        names=s.names,
        servers=servers,
        metrics=ServerPoolMetrics(CollectorRegistry(), list(servers.servers)),
        policy=placement_policy(s),
        health_interval_seconds=0.5,
        failover_after_seconds=60,
        failover_per_second=10,
        leader_timeout_seconds=1.0,
    )


async def test_a_frozen_pool_manager_is_replaced_and_then_writes_nothing(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    s = msgspec.structs.replace(
        settings, baileys_urls="a=http://127.0.0.1:9", baileys_health_interval_seconds=0.5
    )
    async with aiohttp.ClientSession() as http:
        first, second = _manager(s, http, pool), _manager(s, http, pool)
        try:
            await first.step()
            assert first._leader is not None
            await second.step()
            assert second._leader is None  # the first one leads

            # the first freezes (SIGSTOP: no more steps, nor the pings that keep its lease's
            # session alive between them): the second takes over
            await first._pings.aclose()

            async def second_leads() -> bool:
                await second.step()
                return second._leader is not None

            await wait_for("the second manager to lead", second_leads, every=0.2)
            # the first wakes up: its next step fails on its ended session, and it steps down
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await first.step()
            assert first._leader is None
            await first.step()
            assert first._leader is None  # the second still leads
        finally:
            await first._step_down()
            await second._step_down()


async def test_a_service_transaction_left_idle_is_ended_with_its_locks(settings: Settings) -> None:
    """A replica frozen inside a transaction (say, a placement holding its lock) does not
    hold the lock and the row locks forever: the services' pools end such sessions."""
    services = await db.open_pool(msgspec.structs.replace(settings, leader_timeout_seconds=1.0))
    try:
        frozen = await services.acquire()
        tx = frozen.transaction()
        await tx.start()
        await frozen.execute("SELECT pg_advisory_xact_lock(4242)")
        # frozen: nothing more on it. Another session gets the lock once Postgres ends it.
        async with services.acquire() as other:

            async def free() -> bool:
                return bool(await other.fetchval("SELECT pg_try_advisory_lock(4242)"))

            await wait_for("the frozen transaction's lock", free, every=0.2)
            await other.execute("SELECT pg_advisory_unlock(4242)")
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await frozen.execute("SELECT 1")
        await services.release(frozen)
    finally:
        await services.close()


async def test_a_live_pool_manager_keeps_leading_between_ticks_longer_than_the_timeout(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """A leader that is alive but slow to tick (a long probe, a busy loop) keeps its lease:
    its pings keep the session from being ended for idling, and no standby takes over."""
    s = msgspec.structs.replace(settings, baileys_urls="a=http://127.0.0.1:9")
    async with aiohttp.ClientSession() as http:
        first, second = _manager(s, http, pool), _manager(s, http, pool)
        try:
            await first.step()
            assert first._leader is not None
            await asyncio.sleep(2.5)  # what is tested: a gap of over twice the timeout
            await second.step()
            assert second._leader is None
            await first.step()  # its session is alive: no error
            assert first._leader is not None
        finally:
            await first._step_down()
            await second._step_down()
