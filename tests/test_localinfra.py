"""Real throwaway nats-server and Postgres processes: start, write, restart, data survives."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest

from zapbus.localinfra import (
    InfraError,
    NatsServer,
    PostgresServer,
    ensure_infra,
    free_port,
    nats_reachable,
    port_free,
    postgres_reachable,
)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
    try:
        await srv.astart()
        yield srv
    finally:
        await srv.astop(kill=True)


@pytest.fixture
async def pg_server(tmp_path: Path) -> AsyncIterator[PostgresServer]:
    srv = PostgresServer(tmp_path / "pg")
    try:
        await srv.astart()
        yield srv
    finally:
        await srv.astop("immediate")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert port_free(port)


async def test_unreachable_urls_report_false() -> None:
    port = free_port()
    assert not await nats_reachable(f"nats://127.0.0.1:{port}", timeout=0.5)
    assert not await postgres_reachable(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=0.5)


def test_missing_nats_binary_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="nats-server"):
        NatsServer(tmp_path, binary=str(tmp_path / "no-such-nats-server")).start()


async def test_nats_restart_keeps_stream_and_message(nats_server: NatsServer) -> None:
    stream, subject = f"LOCALINFRA_{uuid.uuid4().hex[:8]}", f"localinfra.{uuid.uuid4().hex}"
    port = nats_server.port
    assert await nats_reachable(nats_server.url)

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        ack = await js.publish(subject, b"survives")
        assert ack.stream == stream
    finally:
        await nc.close()

    await nats_server.arestart()
    assert nats_server.port == port

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 1
        msg = await js.get_msg(stream, seq=ack.seq)
        assert msg.data == b"survives"
    finally:
        await nc.close()

    await nats_server.astop()
    assert not nats_server.running
    assert not await nats_reachable(nats_server.url, timeout=0.5)


async def test_postgres_immediate_restart_keeps_data(pg_server: PostgresServer) -> None:
    table = f"localinfra_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text NOT NULL)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'survives')")
    finally:
        await conn.close()

    await pg_server.arestart("immediate")

    conn = await asyncpg.connect(pg_server.dsn)
    try:
        assert await conn.fetchval(f"SELECT body FROM {table} WHERE id = 1") == "survives"
    finally:
        await conn.close()

    await pg_server.astop()
    assert not pg_server.running
    assert not await postgres_reachable(pg_server.dsn, timeout=0.5)


async def test_ensure_infra_starts_local_servers_when_unreachable(tmp_path: Path) -> None:
    nats_port, pg_port = free_port(), free_port()
    infra = await ensure_infra(
        f"nats://127.0.0.1:{nats_port}",
        f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
        tmp_path / "data",
        say=lambda _msg: None,
    )
    async with infra:
        assert infra.nats_url == f"nats://127.0.0.1:{nats_port}"
        assert infra.database_url == f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
        assert infra.nats is not None and infra.postgres is not None
        assert (tmp_path / "data" / "nats" / "store").is_dir()
        assert (tmp_path / "data" / "pg" / "data" / "PG_VERSION").is_file()
        assert await nats_reachable(infra.nats_url)
        assert await postgres_reachable(infra.database_url)
    assert not await nats_reachable(f"nats://127.0.0.1:{nats_port}", timeout=0.5)
    assert not await postgres_reachable(infra.database_url, timeout=0.5)


async def test_ensure_infra_uses_reachable_servers(nats_server: NatsServer, tmp_path: Path) -> None:
    """A reachable URL is used as is, and close() leaves that server alone."""
    pg = PostgresServer(tmp_path / "pg2")
    try:
        await pg.astart()
        infra = await ensure_infra(
            nats_server.url, pg.dsn, tmp_path / "unused", say=lambda _msg: None
        )
        assert (infra.nats_url, infra.database_url) == (nats_server.url, pg.dsn)
        assert infra.nats is None and infra.postgres is None
        await infra.close()
        assert await nats_reachable(nats_server.url)
        assert await postgres_reachable(pg.dsn)
        assert not (tmp_path / "unused").exists()
    finally:
        await pg.astop("immediate")
