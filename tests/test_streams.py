"""Streams fit for production: declared once by ``zapbus migrate`` with replicas and explicit
limits, checked (not rewritten) by the services, watched against their limits, and a command
that exhausts ``max_deliver`` ends as a dead letter instead of stuck in the work queue."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import aiohttp
import msgspec
import pytest
from nats.js import api as js_api
from prometheus_client import CollectorRegistry

from proto import headers
from proto.commands import CreateSession, command_encoder
from services.projector.app import create_app as create_projector
from tests.stack import serve, wait_for
from tests.test_cli import run as run_cli
from zapbus import bus, dlq, topology
from zapbus.config import Settings, load_settings
from zapbus.streamusage import StreamUsage
from zapbus.tools.localinfra import free_port


def test_replicas_come_from_the_setting() -> None:
    assert load_settings({}).stream_replicas == 1
    settings = load_settings({"ZAPBUS_STREAM_REPLICAS": "3"})
    assert settings.stream_replicas == 3
    configs = bus.stream_configs(settings.names, settings.stream_replicas)
    assert {c.name for c in configs} == set(settings.names.all_streams)
    assert all(c.num_replicas == 3 for c in configs)


async def test_every_stream_has_explicit_limits_and_its_discard_policy(
    settings: Settings,
) -> None:
    """Declared by the settings fixture as `zapbus migrate` does."""
    names = settings.names
    nc = await bus.connect(settings.nats_url, "test-streams")
    try:
        js = nc.jetstream()
        discard = {}
        for stream in names.all_streams:
            config = (await js.stream_info(stream)).config
            assert config.num_replicas == settings.stream_replicas == 1, stream
            assert config.max_bytes and config.max_bytes > 0, stream
            assert config.max_msg_size and config.max_msg_size > 0, stream
            assert config.max_age and config.max_age > 0, stream
            discard[stream] = config.discard
        # dropping the oldest would lose an accepted request: refuse new ones instead
        new = js_api.DiscardPolicy.NEW
        assert discard[names.commands_stream] == new
        assert discard[names.events_stream] == new
        assert discard[names.dead_letter_stream] == new
        # derived snapshots, best effort: the newest matter
        assert discard[names.changes_stream] == js_api.DiscardPolicy.OLD
        # a full commands stream refuses a command (the outbox keeps it), it drops nothing
        too_big = b"x" * (bus.COMMANDS_LIMITS.max_msg_size + 1)
        with pytest.raises(Exception, match="maximum"):
            await js.publish(names.command_subject("create"), too_big)
    finally:
        await nc.close()


async def test_zapbus_migrate_declares_streams_and_consumers(
    settings: Settings, namespace: str
) -> None:
    fresh = msgspec.structs.replace(settings, namespace=f"{namespace}m")
    nc = await bus.connect(settings.nats_url, "test-migrate")
    try:
        js = nc.jetstream()
        with pytest.raises(bus.MissingStreams, match="zapbus migrate"):
            await bus.require_streams(js, fresh.names)
        out = run_cli(fresh, "migrate")
        assert out.returncode == 0, out.stderr
        assert fresh.names.commands_stream in out.stdout
        await bus.require_streams(js, fresh.names)
        for stream, config in topology.consumer_configs(fresh):
            assert config.durable_name
            await js.consumer_info(stream, config.durable_name)
    finally:
        await bus.delete_streams(nc.jetstream(), fresh.names)
        await nc.close()


async def test_a_service_without_its_streams_stops_and_says_why(
    settings: Settings, namespace: str
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "ZAPBUS_ENV": "dev",
        "ZAPBUS_NATS_URL": settings.nats_url,
        "ZAPBUS_NAMESPACE": f"{namespace}x",  # never migrated
        "ZAPBUS_WEBHOOK_PORT": str(port),
    }
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.webhook"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{namespace.upper()}X_SESSION_EVENTS" in out.stderr
    assert "zapbus migrate" in out.stderr
    assert "Traceback" not in out.stderr


async def test_services_do_not_rewrite_streams_or_consumers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    names = settings.names
    nc = await bus.connect(settings.nats_url, "test-no-rewrite")
    try:
        js = nc.jetstream()
        # an operator's own choice, made with `zapbus migrate` or by hand
        config = (await js.stream_info(names.events_stream)).config
        await js.update_stream(dataclasses.replace(config, max_age=3 * 24 * 3600.0))
        declared = topology.dead_letterer_config(settings)
        await js.add_consumer(names.advisories_stream, declared)
        runner = await serve(create_projector(settings), free_port())
        try:
            await wait_for(
                "the projector's dead-letterer bound",
                lambda: _bound(js, names.advisories_stream, names.dead_letterer_consumer),
            )
            config = (await js.stream_info(names.events_stream)).config
            assert config.max_age == 3 * 24 * 3600.0
        finally:
            await runner.cleanup()
        # a service configured differently binds the consumer as declared and says so
        wanted = dataclasses.replace(declared, ack_wait=7.0)
        with caplog.at_level(logging.WARNING, logger="zapbus.bus"):
            psub = await bus.ensure_consumer(js, names.advisories_stream, wanted)
            await psub.unsubscribe()
        info = await js.consumer_info(names.advisories_stream, names.dead_letterer_consumer)
        assert info.config.ack_wait == declared.ack_wait
        assert "zapbus migrate" in caplog.text and "ack_wait" in caplog.text
    finally:
        await nc.close()


async def _bound(js: object, stream: str, durable: str) -> bool:
    from nats.js import JetStreamContext

    assert isinstance(js, JetStreamContext)
    info = await js.consumer_info(stream, durable)
    return bool(info.push_bound) or (info.num_waiting is not None and info.num_waiting > 0)


async def test_stream_usage_reports_bytes_and_limits(settings: Settings) -> None:
    nc = await bus.connect(settings.nats_url, "test-usage")
    try:
        js = nc.jetstream()
        await js.publish(settings.names.dead_letter_subject, b"{}")
        registry = CollectorRegistry()
        await StreamUsage(js, settings.names, registry).refresh()
        labels = {"stream": settings.names.commands_stream}
        limit = registry.get_sample_value("zapbus_jetstream_stream_max_bytes", labels)
        assert limit == bus.COMMANDS_LIMITS.max_bytes
        dlq_labels = {"stream": settings.names.dead_letter_stream}
        assert registry.get_sample_value("zapbus_jetstream_stream_messages", dlq_labels) == 1
        assert (registry.get_sample_value("zapbus_jetstream_stream_bytes", dlq_labels) or 0) > 0
    finally:
        await nc.close()


async def test_a_command_that_exhausts_max_deliver_becomes_a_dead_letter(
    settings: Settings,
) -> None:
    """A worker that never answers (crashes on every delivery): after max_deliver the
    projector's dead-letterer, fed by JetStream's advisory, dead-letters the command and
    empties the work queue."""
    names = settings.names
    nc = await bus.connect(settings.nats_url, "test-max-deliver")
    port = free_port()
    runner = await serve(create_projector(settings), port)
    try:
        js = nc.jetstream()
        worker = topology.consumer_configs(settings)[0][1]
        assert worker.durable_name == names.worker_consumer
        await js.add_consumer(
            names.commands_stream,
            dataclasses.replace(worker, max_deliver=2, ack_wait=0.5),
        )
        cmd = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=uuid.uuid4(),
            tenant_id=uuid.uuid4(),
            generation=1,
            session_name="zb_stuck_g1",
            requested_at=datetime.now(UTC),
        )
        await js.publish(
            names.command_subject("create"),
            command_encoder.encode(cmd),
            headers={headers.MSG_ID: str(cmd.command_id)},
        )
        psub = await js.pull_subscribe_bind(names.worker_consumer, stream=names.commands_stream)
        deliveries = 0
        for _ in range(6):  # take every delivery, answer none
            try:
                deliveries += len(await psub.fetch(1, timeout=1.0))
            except TimeoutError:
                pass
        await psub.unsubscribe()
        assert deliveries == 2

        async def letters() -> list[dlq.Letter]:
            return await dlq.list_letters(js, names)

        found = await wait_for("the dead letter", letters, timeout=20)
        assert len(found) == 1
        letter = found[0].letter
        assert letter.reason == "max_deliver"
        assert letter.command == cmd
        assert letter.deliveries == 2

        async def empty() -> bool:
            info = await js.stream_info(names.commands_stream)
            adv = await js.stream_info(names.advisories_stream)
            return info.state.messages == 0 and adv.state.messages == 0

        await wait_for("an empty work queue", empty, timeout=30)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert 'zapbus_worker_dead_letters_total{kind="create"} 1.0' in await r.text()
    finally:
        await runner.cleanup()
        await nc.close()


async def test_migrate_recreates_a_projector_consumer_with_explicit_acks_after_its_ack_floor(
    settings: Settings,
) -> None:
    """The projector's consumer went from explicit acks to AckPolicy.ALL, which the server
    cannot update: `zapbus migrate` re-creates it, starting after its ack floor, so the events
    acked are not replayed and the ones delivered but not acked come again."""
    names = settings.names
    nc = await bus.connect(settings.nats_url, "test-streams")
    try:
        js = nc.jetstream()
        wanted = dict(topology.consumer_configs(settings))[names.events_stream]
        assert wanted.ack_policy == js_api.AckPolicy.ALL
        durable = wanted.durable_name
        assert durable
        old = dataclasses.replace(wanted, ack_policy=js_api.AckPolicy.EXPLICIT)
        await js.delete_consumer(names.events_stream, durable)
        await js.add_consumer(names.events_stream, old)
        cid = uuid.uuid4()
        for i in range(6):
            await js.publish(names.event_subject("status", cid), f"e{i}".encode())
        psub = await js.pull_subscribe_bind(durable, stream=names.events_stream)
        first = await psub.fetch(4, timeout=5)
        for msg in first[:3]:  # e0-e2 projected; e3 delivered, not acked
            await msg.ack_sync()
        await psub.unsubscribe()

        assert "re-created from sequence 4" in await topology.declare_consumer(
            js, names.events_stream, wanted
        )
        info = await js.consumer_info(names.events_stream, durable)
        assert info.config.ack_policy == js_api.AckPolicy.ALL
        psub = await js.pull_subscribe_bind(durable, stream=names.events_stream)
        again = await psub.fetch(10, timeout=5)
        assert [m.data for m in again] == [b"e3", b"e4", b"e5"]
        await again[-1].ack_sync()  # one ack for the three
        info = await js.consumer_info(names.events_stream, durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0
        await psub.unsubscribe()
        # declared again: updated in place, its start kept
        assert await topology.declare_consumer(js, names.events_stream, wanted) == ""
        info = await js.consumer_info(names.events_stream, durable)
        assert info.config.opt_start_seq == 4
    finally:
        await nc.close()
