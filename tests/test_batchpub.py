"""zapbus/batchpub.py on a real nats-server (2.12+: atomic batches): one ack per batch, the
fall-backs that keep per-message answers, and group commit of concurrent publishes."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api

from proto.names import Names
from zapbus import bus
from zapbus.batchpub import BatchItem, BatchPublisher, GroupCommit, Result
from zapbus.config import Settings
from zapbus.tools.localinfra import Infra


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    subject: str

    async def stored(self) -> list[js_api.RawStreamMsg]:
        info = await self.js.stream_info(self.stream)
        return [
            await self.js.get_msg(self.stream, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
            if info.state.messages
        ]


async def _bus(infra: Infra, namespace: str, atomic: bool) -> Bus:
    nc = await bus.connect(infra.nats_url, "zapbus-test-batchpub")
    js = nc.jetstream()
    stream = f"{namespace}_BATCH".upper()
    subject = f"{namespace}.batch"
    await js.add_stream(
        js_api.StreamConfig(
            name=stream,
            subjects=[subject],
            duplicate_window=60.0,
            allow_atomic=True if atomic else None,
        )
    )
    return Bus(nc, js, stream, subject)


@pytest.fixture
async def atomic_bus(infra: Infra, namespace: str) -> AsyncIterator[Bus]:
    b = await _bus(infra, namespace, atomic=True)
    if not bus.supports_atomic(b.js):
        await b.nc.close()
        pytest.skip("the test NATS server has no atomic batches (2.12+)")
    yield b
    await b.js.delete_stream(b.stream)
    await b.nc.close()


@pytest.fixture
async def plain_bus(infra: Infra, namespace: str) -> AsyncIterator[Bus]:
    b = await _bus(infra, namespace, atomic=False)
    yield b
    await b.js.delete_stream(b.stream)
    await b.nc.close()


class CountingPublisher(BatchPublisher):
    """Counts the atomic batches and the one-by-one fall-backs it sends."""

    atomic_batches = 0
    one_by_one = 0

    async def _atomic(self, chunk: Sequence[BatchItem]) -> list[Result]:
        self.atomic_batches += 1
        return await super()._atomic(chunk)

    async def _each(self, chunk: Sequence[BatchItem]) -> list[Result]:
        self.one_by_one += 1
        return await super()._each(chunk)


def _msgs(b: Bus, ids: list[str]) -> list[BatchItem]:
    return [BatchItem(b.subject, i.encode(), {"Nats-Msg-Id": i}) for i in ids]


async def test_a_batch_is_stored_with_one_commit_and_answers_each_message(
    atomic_bus: Bus,
) -> None:
    publisher = CountingPublisher(atomic_bus.js)
    assert publisher.atomic
    results = await publisher.publish(_msgs(atomic_bus, [f"m{i}" for i in range(250)]))
    assert all(isinstance(r, js_api.PubAck) for r in results), results[:3]
    assert [r.seq for r in results if isinstance(r, js_api.PubAck)] == list(range(1, 251))
    assert (publisher.atomic_batches, publisher.one_by_one) == (1, 0)
    stored = await atomic_bus.stored()
    assert [m.data for m in stored] == [f"m{i}".encode() for i in range(250)]


async def test_a_batch_with_a_message_stored_before_falls_back_to_one_by_one(
    atomic_bus: Bus,
) -> None:
    """The server refuses a whole atomic batch holding a known Nats-Msg-Id (a relay
    re-publishing after a crash): sent one by one, the known one is a duplicate, the rest
    stored once."""
    publisher = CountingPublisher(atomic_bus.js)
    await publisher.publish(_msgs(atomic_bus, ["a", "b"]))
    results = await publisher.publish(_msgs(atomic_bus, ["b", "c", "d"]))
    acks = [r for r in results if isinstance(r, js_api.PubAck)]
    assert len(acks) == 3, results
    assert [bool(a.duplicate) for a in acks] == [True, False, False]
    assert (publisher.atomic_batches, publisher.one_by_one) == (2, 1)
    assert [m.data for m in await atomic_bus.stored()] == [b"a", b"b", b"c", b"d"]


async def test_a_stream_without_atomic_publishes_is_published_one_by_one(
    plain_bus: Bus,
) -> None:
    publisher = CountingPublisher(plain_bus.js, atomic=True)
    first = await publisher.publish(_msgs(plain_bus, ["a", "b", "c"]))
    assert all(isinstance(r, js_api.PubAck) for r in first), first
    assert not publisher.atomic  # not tried again
    await publisher.publish(_msgs(plain_bus, ["d", "e"]))
    assert (publisher.atomic_batches, publisher.one_by_one) == (1, 2)
    assert [m.data for m in await plain_bus.stored()] == [b"a", b"b", b"c", b"d", b"e"]


async def test_group_commit_gathers_concurrent_publishes_into_few_batches(
    atomic_bus: Bus,
) -> None:
    publisher = CountingPublisher(atomic_bus.js)
    group = GroupCommit(publisher)
    acks = await asyncio.gather(
        *(
            group.publish(atomic_bus.subject, str(i).encode(), 5.0, {"Nats-Msg-Id": f"g{i}"})
            for i in range(200)
        )
    )
    assert sorted(a.seq for a in acks) == list(range(1, 201))
    # the first call goes out alone at once; the rest gather behind it
    assert 1 <= publisher.atomic_batches <= 3, publisher.atomic_batches
    assert publisher.one_by_one <= 1
    stored = await atomic_bus.stored()
    assert sorted(int(m.data) for m in stored) == list(range(200))
    # each caller got the sequence of its own message
    by_seq = {m.seq: int(m.data) for m in stored}
    assert all(by_seq[a.seq] == i for i, a in enumerate(acks))


async def test_migrate_allows_atomic_publishes_where_the_server_has_them(
    settings: Settings,
) -> None:
    nc = await bus.connect(settings.nats_url, "zapbus-test-batchpub")
    try:
        js = nc.jetstream()
        allowed = {
            stream: (await js.stream_info(stream)).config.allow_atomic
            for stream in settings.names.all_streams
        }
        if bus.supports_atomic(js):
            assert all(allowed.values()), allowed
        else:
            assert not any(allowed.values()), allowed
    finally:
        await nc.close()


async def test_group_commit_batches_each_stream_apart(atomic_bus: Bus, namespace: str) -> None:
    """An atomic batch holds one stream's messages: the worker publishes events, commands and
    dead letters through one GroupCommit, whose publisher splits each round by stream."""
    other = f"{namespace}_OTHER".upper()
    await atomic_bus.js.add_stream(
        js_api.StreamConfig(name=other, subjects=[f"{namespace}.other"], allow_atomic=True)
    )
    try:
        publisher = CountingPublisher(
            atomic_bus.js, stream_of=lambda subject: subject.rsplit(".", 1)[1]
        )
        group = GroupCommit(publisher)
        subjects = [atomic_bus.subject, f"{namespace}.other"] * 20
        acks = await asyncio.gather(
            *(
                group.publish(s, str(i).encode(), 5.0, {"Nats-Msg-Id": f"o{i}"})
                for i, s in enumerate(subjects)
            )
        )
        assert [a.stream for a in acks] == [atomic_bus.stream, other] * 20
        assert publisher.one_by_one == 0 and publisher.atomic_batches == 2
    finally:
        await atomic_bus.js.delete_stream(other)


async def test_a_list_of_two_streams_goes_out_as_one_atomic_batch_per_stream(
    atomic_bus: Bus, namespace: str
) -> None:
    """The outbox relay's pass holds commands and changes (a create queues both). Sent as one
    atomic batch, the server refuses it as incomplete (the other stream's messages are a gap
    in it) and every message then costs a store of its own; split by stream, each stream's
    messages are one batch, in their order."""
    other = f"{namespace}_OTHER".upper()
    await atomic_bus.js.add_stream(
        js_api.StreamConfig(name=other, subjects=[f"{namespace}.other"], allow_atomic=True)
    )
    names = {atomic_bus.subject: atomic_bus.stream, f"{namespace}.other": other}
    try:
        publisher = CountingPublisher(atomic_bus.js, stream_of=names.get)
        msgs = [
            BatchItem(subject, f"{subject}:{i}".encode(), {"Nats-Msg-Id": f"x{i}"})
            for i, subject in enumerate([atomic_bus.subject, f"{namespace}.other"] * 150)
        ]
        results = await publisher.publish(msgs)
        assert [r.stream for r in results if isinstance(r, js_api.PubAck)] == [
            atomic_bus.stream,
            other,
        ] * 150, results[:3]
        assert (publisher.atomic_batches, publisher.one_by_one) == (2, 0)
        stored = [m.data for m in await atomic_bus.stored()]
        assert stored == [f"{atomic_bus.subject}:{i}".encode() for i in range(0, 300, 2)]
    finally:
        await atomic_bus.js.delete_stream(other)


def test_every_zapbus_subject_names_its_stream() -> None:
    names = Names(namespace="zb", event_partitions=4)
    conn = uuid.uuid4()
    assert names.stream_of(names.command_subject("create")) == names.commands_stream
    assert names.stream_of(names.event_subject("qr", conn)) == names.events_stream
    assert names.stream_of(names.change_subject(conn)) == names.changes_stream
    assert names.stream_of(names.dead_letter_subject) == names.dead_letter_stream
    assert names.stream_of(names.max_deliveries_subject) == names.advisories_stream
    assert names.stream_of("zb.somewhere.else") is None
    assert names.stream_of("zbx.cmd.session.create") is None  # another namespace


async def test_a_publish_its_caller_gave_up_on_leaves_no_unretrieved_failure() -> None:
    """A webhook request that stopped waiting for its publish (its timeout ran out during an
    election) must not leave the batch's later failure on a future nobody reads: asyncio logs
    that as an error ("Future exception was never retrieved"), which the cluster test counts."""
    release = asyncio.Event()

    class Stalled(BatchPublisher):
        def __init__(self) -> None:  # no server: the batch fails once released
            self.stream_of = None

        async def publish(self, msgs: Sequence[BatchItem]) -> list[Result]:
            await release.wait()
            return [TimeoutError("nats: timeout")] * len(msgs)

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        group = GroupCommit(Stalled())
        with pytest.raises(TimeoutError):
            await group.publish("s", b"x", timeout=0.05)
        release.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*group._flushers)
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not reported, reported
