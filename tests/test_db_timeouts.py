"""A hung Postgres (SIGSTOPped, on a throwaway server) makes the gateway answer 503, not hang.

ZAPBUS_DB_COMMAND_TIMEOUT_SECONDS bounds each statement, ZAPBUS_DB_ACQUIRE_TIMEOUT_SECONDS each
wait for a pooled connection (a new connection to a stopped server never completes its
handshake); asyncpg's TimeoutError is answered like any unavailable dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient

from services.gateway.app import create_app as create_gateway
from tests.stack import FAST_SIM, start_stack
from zapbus import db
from zapbus.config import Settings
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import PostgresServer

TIMEOUT = 1.0  # both timeouts, in the gateway under test
SLACK = 3.0  # what an answer may take beyond the two timeouts


def _postgres_pids(server: PostgresServer) -> list[int]:
    """The postmaster first, then every process it forked (backends, background workers)."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


@contextlib.contextmanager
def hung(server: PostgresServer) -> Iterator[None]:
    """Postgres stops answering (SIGSTOP: connections stay open, nothing is read) until exit."""
    pids = _postgres_pids(server)
    stopped = []
    try:
        for pid in pids:  # the postmaster first, so it forks nothing new meanwhile
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def postgres(workdir: Path) -> AsyncIterator[PostgresServer]:
    server = PostgresServer(workdir / "pg")
    await server.astart()
    try:
        yield server
    finally:
        await server.astop("immediate")


async def _timed(client: TestClient[Any, Any], method: str, path: str, **kw: Any) -> Any:
    """(status, headers, body, seconds); fails after 2 * (timeouts + slack) without an answer."""
    started = time.monotonic()
    wait = aiohttp.ClientTimeout(total=2 * (2 * TIMEOUT + SLACK))
    async with client.request(method, path, timeout=wait, **kw) as r:
        body = await r.read()
        return r.status, r.headers, body, time.monotonic() - started


async def test_gateway_answers_503_within_its_timeouts_when_postgres_hangs(
    settings: Settings, postgres: PostgresServer, aiohttp_client: Any
) -> None:
    await db.migrate(postgres.dsn)
    pool = await db.create_pool(postgres.dsn, max_size=1)
    try:
        _, key = await create_tenant(pool, "hung")
        _, other_key = await create_tenant(pool, "hung-uncached")
    finally:
        await pool.close()
    gateway_settings = msgspec.structs.replace(
        settings,
        database_url=postgres.dsn,
        db_schema="public",
        db_command_timeout_seconds=TIMEOUT,
        db_acquire_timeout_seconds=TIMEOUT,
        api_key_cache_seconds=300.0,
    )
    client = await aiohttp_client(create_gateway(gateway_settings))
    auth = {"Authorization": f"Bearer {key}"}
    async with client.post("/v1/connections", json={"name": "before"}, headers=auth) as r:
        assert r.status == 202, await r.text()  # and the key is now cached
        cid = (await r.json())["id"]

    limit = 2 * TIMEOUT + SLACK
    with hung(postgres):
        calls = [
            ("POST", "/v1/connections", {"json": {"name": "during"}, "headers": auth}),
            ("GET", f"/v1/connections/{cid}", {"headers": auth}),
            ("GET", "/v1/connections", {"headers": auth}),
            # an API key not cached yet: the key lookup itself times out
            (
                "GET",
                f"/v1/connections/{cid}",
                {"headers": {"Authorization": f"Bearer {other_key}"}},
            ),
        ]
        for method, path, kw in calls:
            status, headers, body, took = await _timed(client, method, path, **kw)
            assert status == 503, (method, path, status, body)
            assert headers["Content-Type"].startswith("application/problem+json")
            assert msgspec.json.decode(body)["type"].endswith("/unavailable")
            assert headers["Retry-After"]
            assert took < limit, f"{method} {path} took {took:.1f}s (limit {limit:.1f}s)"

    # Postgres is back: the gateway serves again without a restart.
    async def served() -> bool:
        status, _, _, _ = await _timed(client, "GET", f"/v1/connections/{cid}", headers=auth)
        return bool(status == 200)

    deadline = time.monotonic() + 15
    while not await served():
        assert time.monotonic() < deadline, "the gateway did not recover after SIGCONT"


async def test_worker_keeps_its_command_while_postgres_hangs(
    settings: Settings, postgres: PostgresServer
) -> None:
    """The worker's checks against a hung database are bounded and heartbeated: JetStream
    never hands the command to a second copy (ack_wait is shorter than the hang)."""
    await db.migrate(postgres.dsn)
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(1.0, 1.0))
    async with start_stack(
        msgspec.structs.replace(settings, database_url=postgres.dsn, db_schema="public"),
        slow,
        ack_wait_seconds=1.5,
        db_command_timeout_seconds=TIMEOUT,
        db_acquire_timeout_seconds=TIMEOUT,
        reconcile_interval_seconds=3600,
    ) as stack:
        connection = await stack.create("hung")
        await stack.wait_status(connection["id"], "creating")
        with hung(postgres):
            # The fault lasts longer than ack_wait; the outcome is awaited below.
            await asyncio.sleep(4.0)
        await stack.wait_status(connection["id"], "qr_ready", timeout=30)
        async with stack.http.get(f"{stack.worker_url}/metrics") as r:
            text = await r.text()
        assert 'zapbus_worker_commands_started_total{kind="create"} 1.0' in text, [
            line for line in text.splitlines() if "commands_started" in line
        ]
        stats = await stack.sim("GET", "/_sim/stats")
        assert stats["created"] == {connection["session_name"]: 1}
