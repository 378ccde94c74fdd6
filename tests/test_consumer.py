"""DurableConsumer.fetch on a real JetStream: quiet at idle, whatever timeout nats-py raises."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from nats.js import api as js_api

from zapbus import bus
from zapbus.consumer import DurableConsumer
from zapbus.tools.localinfra import Infra


@pytest.fixture
async def idle_consumer(infra: Infra, namespace: str) -> AsyncIterator[DurableConsumer]:
    """A durable consumer on an empty stream of its own."""
    nc = await bus.connect(infra.nats_url, "zapbus-test-consumer")
    js: JetStreamContext = nc.jetstream()
    stream = f"{namespace}_IDLE".upper()
    await js.add_stream(name=stream, subjects=[f"{namespace}.idle"])
    config = js_api.ConsumerConfig(durable_name="idle", ack_policy=js_api.AckPolicy.EXPLICIT)
    consumer = DurableConsumer(js, stream, config)
    await consumer.open()
    try:
        yield consumer
    finally:
        await consumer.close()
        await js.delete_stream(stream)
        await nc.close()


async def test_idle_fetches_log_no_warning(
    idle_consumer: DurableConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py 2.16 ends an empty batch fetch with a plain ``asyncio.TimeoutError`` (not its
    own ``nats.errors.TimeoutError``) when its deadline passed while it waited for the no-wait
    probe; a busy event loop makes that happen. That is an empty fetch, not a hung one: no
    warning, no re-binding. The loop is blocked at each point of the fetch in turn."""
    caplog.set_level(logging.DEBUG, logger="zapbus.consumer")
    timeout = 0.2
    for yields in range(8):
        fetch = asyncio.ensure_future(idle_consumer.fetch(10, timeout))
        for _ in range(yields):
            await asyncio.sleep(0)
        time.sleep(timeout * 1.5)  # noqa: ASYNC251 - a busy event loop, on purpose
        assert await fetch == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
