"""The outbox relay on a real nats-server and Postgres: a pass holding commands and changes
(a create queues both) goes out as one atomic batch per stream, in order; a service's relay
is not held up by a pool its requests keep busy."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from services.gateway.app import create_app as create_gateway
from services.gateway.app_keys import relay_key
from services.projector.app import create_app as create_projector
from services.projector.app import relay_key as projector_relay_key
from tests.stack import wait_for
from tests.test_batchpub import CountingPublisher
from zapbus import bus
from zapbus.config import Settings
from zapbus.relay import OutboxMetrics, OutboxRelay
from zapbus.runtime import pool_key


async def test_a_pass_of_commands_and_changes_is_one_atomic_batch_per_stream(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    names = settings.names
    conn = uuid.uuid4()
    subjects = [names.command_subject("create"), names.change_subject(conn)] * 150
    await pool.executemany(
        "INSERT INTO outbox (msg_id, subject, payload) VALUES ($1, $2, $3)",
        [(f"r{i}", s, f"{i}".encode()) for i, s in enumerate(subjects)],
    )
    nc = await bus.connect(settings.nats_url, "zapbus-test-relay")
    try:
        js = nc.jetstream()
        if not bus.supports_atomic(js):
            pytest.skip("the test NATS server has no atomic batches (2.12+)")
        relay = OutboxRelay(pool, js, OutboxMetrics(CollectorRegistry()), names)
        counting = CountingPublisher(js, timeout=3.0, stream_of=relay.publisher.stream_of)
        relay.publisher = counting
        assert await relay.relay_all() == 300
        # split: one batch per stream; mixed, the server refuses it as incomplete and the
        # 300 go out one by one
        assert (counting.atomic_batches, counting.one_by_one) == (2, 0)
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        for stream, first in ((names.commands_stream, 0), (names.changes_stream, 1)):
            info = await js.stream_info(stream)
            got = [
                int((await js.get_msg(stream, seq)).data or b"")
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
            ]
            assert got == list(range(first, 300, 2)), stream
    finally:
        await nc.close()


@pytest.mark.parametrize("service", ["gateway", "projector"])
async def test_the_relay_goes_on_while_every_connection_of_the_pool_is_busy(
    settings: Settings, pool: asyncpg.Pool, aiohttp_client: Any, service: str
) -> None:
    """A burst of requests (or projections) holds every connection of the service's pool; the
    relay has a connection of its own, so a command committed meanwhile reaches JetStream at
    once, not once the burst is answered (taking one from that pool, the commands of a
    1,000-create burst waited 0.4-1 s in the outbox)."""
    busy = msgspec.structs.replace(settings, db_pool_size=2, outbox_poll_seconds=60.0)
    app = (create_gateway if service == "gateway" else create_projector)(busy)
    await aiohttp_client(app)
    names = settings.names
    held = [await app[pool_key].acquire() for _ in range(busy.db_pool_size)]
    try:
        await pool.execute(
            "INSERT INTO outbox (msg_id, subject, payload) VALUES ($1, $2, $3)",
            "busy-1",
            names.command_subject("create"),
            b"{}",
        )
        app[relay_key if service == "gateway" else projector_relay_key].kick()
        nc = await bus.connect(settings.nats_url, "zapbus-test-relay")
        try:
            js = nc.jetstream()

            async def relayed() -> bool:
                info = await js.stream_info(names.commands_stream)
                return bool(info.state.messages == 1)

            # well under the pool's acquire timeout (5 s), which a relay queued behind the
            # held connections would wait out before failing its pass
            await wait_for("the command relayed", relayed, timeout=3.0, every=0.05)
        finally:
            await nc.close()
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        for conn in held:
            await app[pool_key].release(conn)
