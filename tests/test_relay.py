"""The outbox relay on a real nats-server and Postgres: a pass holding commands and changes
(a create queues both) goes out as one atomic batch per stream, in order."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from tests.test_batchpub import CountingPublisher
from zapbus import bus
from zapbus.config import Settings
from zapbus.relay import OutboxMetrics, OutboxRelay


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
