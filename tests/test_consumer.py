"""DurableConsumer.fetch on a real JetStream: quiet at idle, whatever timeout nats-py raises."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from prometheus_client import CollectorRegistry

from services.session_worker.consumer import CommandConsumer
from services.session_worker.metrics import WorkerMetrics
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


class _BlockingHandler:
    """Stands in for the worker's CommandHandler: each command waits until released."""

    def __init__(self) -> None:
        self.metrics = WorkerMetrics(CollectorRegistry())
        self.release = asyncio.Event()
        self.started = 0

    async def prime(self, msgs: list[Msg]) -> None:
        pass

    async def handle(self, msg: Msg) -> None:
        self.started += 1
        await self.release.wait()
        await msg.ack()


async def test_worker_takes_no_more_than_the_declared_max_ack_pending(
    infra: Infra, namespace: str
) -> None:
    """A worker configured for more concurrency than its consumer is declared with (a cap of
    1,000 on a consumer migrated with the default 100) takes the declared ``max_ack_pending``
    as its capacity: once that many commands run it waits for one to finish, and keeps no
    pull request waiting at the server (before, it kept asking for the difference)."""
    nc = await bus.connect(infra.nats_url, "zapbus-test-consumer")
    js: JetStreamContext = nc.jetstream()
    stream = f"{namespace}_CAP".upper()
    subject = f"{namespace}.cap"
    await js.add_stream(name=stream, subjects=[subject])
    declared = js_api.ConsumerConfig(
        durable_name="worker", ack_policy=js_api.AckPolicy.EXPLICIT, max_ack_pending=3
    )
    await js.add_consumer(stream, declared)
    for i in range(10):
        await js.publish(subject, str(i).encode())
    handler = _BlockingHandler()
    wanted = js_api.ConsumerConfig(
        durable_name="worker", ack_policy=js_api.AckPolicy.EXPLICIT, max_ack_pending=10
    )
    worker = CommandConsumer(
        DurableConsumer(js, stream, wanted),
        handler,  # type: ignore[arg-type]
        concurrency=10,
        grace_seconds=5.0,
        fetch_timeout=0.2,
    )
    loop = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 30
        while handler.started < 3:
            assert time.monotonic() < deadline, f"{handler.started} of 3 commands started"
            await asyncio.sleep(0.02)
        # a few fetch timeouts' worth of time: a worker asking for more would by now
        for _ in range(5):
            info = await js.consumer_info(stream, "worker")
            assert worker.concurrency == 3
            assert worker.in_flight == 3
            assert info.num_waiting == 0, "a pull request waits for messages it cannot get"
            await asyncio.sleep(0.2)
        handler.release.set()
        while handler.started < 10:
            assert time.monotonic() < deadline, f"{handler.started} of 10 commands started"
            await asyncio.sleep(0.02)
    finally:
        handler.release.set()
        worker.stop()
        await asyncio.wait_for(loop, 30)
        await js.delete_stream(stream)
        await nc.close()
