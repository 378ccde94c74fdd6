"""The worker's flows decide, one place acts (issue 20, item 3): ``Settler.apply`` turns each
outcome into JetStream calls on a real JetStream, and the source keeps it the only place that
settles a message or dead-letters one."""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from proto import headers
from proto.commands import Command, CreateSession, command_encoder, dead_letter_decoder
from services.session_worker.actions import Fail, Retry, action_for
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.outcome import Ack, GiveUp, HandBack, Nak, Outcome, Settler, Term
from services.session_worker.publish import FlowPublisher
from services.session_worker.retry import RetryPolicy
from tests.stack import wait_for
from zapbus.config import Settings
from zapbus.consumer import DurableConsumer
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.topology import worker_config

WORKER = Path(__file__).resolve().parent.parent / "services" / "session_worker"


class Bench:
    """A real command on the worker's own consumer, and a Settler to settle it."""

    def __init__(self, settings: Settings, nc: Client, publisher: FlowPublisher) -> None:
        self.settings = settings
        self.names = settings.names
        self.js: JetStreamContext = nc.jetstream()
        self.nc = nc
        self.metrics = WorkerMetrics(CollectorRegistry())
        self.settler = Settler(publisher, self.metrics, heartbeat_seconds=0.2)
        self.consumer = DurableConsumer(
            self.js, self.names.commands_stream, worker_config(settings)
        )
        self.cmd = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=uuid.uuid4(),
            tenant_id=uuid.uuid4(),
            generation=1,
            session_name=f"s-{uuid.uuid4().hex[:8]}",
            requested_at=datetime.now(UTC),
        )

    async def queue(self) -> None:
        await self.js.publish(
            self.names.command_subject(self.cmd.kind),
            command_encoder.encode(self.cmd),
            headers={headers.MSG_ID: str(self.cmd.command_id)},
        )

    async def next(self, what: str) -> Msg:
        async def one() -> Msg | None:
            msgs = await self.consumer.fetch(1, 0.2)
            return msgs[0] if msgs else None

        return await wait_for(what, one, timeout=10)

    async def settle(self, outcome: Outcome) -> Msg:
        await self.queue()
        msg = await self.next("the command")
        await self.settler.apply(msg, outcome)
        return msg

    async def stream_empty(self) -> bool:
        info = await self.js.stream_info(self.names.commands_stream)
        return info.state.messages == 0

    async def letters(self) -> int:
        info = await self.js.stream_info(self.names.dead_letter_stream)
        return info.state.messages

    def counted(self, name: str, **labels: str) -> float:
        value = self.metrics.failures if name == "failures" else self.metrics.dead_letters
        return float(value.labels(**labels)._value.get())


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


@pytest.fixture
async def bench(settings: Settings, nc: Client) -> AsyncIterator[Bench]:
    b = Bench(settings, nc, FlowPublisher(nc.jetstream(), settings.names))
    await b.consumer.open()
    yield b
    await b.consumer.close()


async def terminated(bench: Bench) -> list[dict[str, object]]:
    """Subscribe to the consumer's 'message terminated' advisories."""
    seen: list[dict[str, object]] = []

    async def got(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    subject = (
        "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED."
        f"{bench.names.commands_stream}.{bench.names.worker_consumer}"
    )
    await bench.nc.subscribe(subject, cb=got)
    await bench.nc.flush()
    return seen


async def test_ack_removes_the_command(bench: Bench) -> None:
    await bench.settle(Ack())
    await wait_for("the acked command to leave the work queue", bench.stream_empty)
    assert await bench.letters() == 0


async def test_nak_redelivers_after_the_delay(bench: Bench) -> None:
    first = await bench.settle(Nak(delay=0.3, reason="busy"))
    again = await bench.next("the nak'd command's redelivery")
    assert again.metadata.sequence.stream == first.metadata.sequence.stream
    assert again.metadata.num_delivered == 2
    await bench.settler.apply(again, Ack())
    assert await bench.letters() == 0


async def test_term_stops_the_command_without_a_letter(bench: Bench) -> None:
    seen = await terminated(bench)
    await bench.settle(Term(reason="fenced, clean-up failed"))
    await wait_for("the term advisory", lambda: _some(seen))
    await wait_for("the termed command to leave the work queue", bench.stream_empty)
    assert await bench.letters() == 0


async def test_give_up_stores_the_letter_before_then_and_terms(bench: Bench) -> None:
    seen = await terminated(bench)
    letters_at_then: list[int] = []

    async def then() -> None:
        letters_at_then.append(await bench.letters())

    msg = await bench.settle(
        GiveUp(command=bench.cmd, reason="refused", why="permanent", attempt=3, then=then)
    )
    assert letters_at_then == [1]  # whoever sees the failure finds its letter
    await wait_for("the term advisory", lambda: _some(seen))
    raw = await bench.js.get_last_msg(
        bench.names.dead_letter_stream, bench.names.dead_letter_subject
    )
    letter = dead_letter_decoder.decode(raw.data)
    assert (letter.command, letter.error, letter.reason) == (bench.cmd, "refused", "permanent")
    assert letter.deliveries == 3
    assert letter.stream_seq == msg.metadata.sequence.stream
    assert bench.counted("failures", kind="create", reason="permanent") == 1
    assert bench.counted("dead_letters", kind="create") == 1


async def test_hand_back_queues_a_copy_that_keeps_the_attempts_spent(bench: Bench) -> None:
    first = await bench.settle(HandBack(command=bench.cmd, attempts_used=2))
    copy = await bench.next("the handed-back copy")
    assert copy.metadata.sequence.stream != first.metadata.sequence.stream  # a new message
    assert copy.metadata.num_delivered == 1  # the interrupted delivery was acked, not nak'd
    assert (copy.headers or {})[headers.ATTEMPTS_USED] == "2"
    assert copy.data == first.data


class _Unreachable(FlowPublisher):
    async def copy(self, msg: Msg, cmd: Command, attempts_used: int) -> None:
        raise ConnectionError("JetStream unreachable")


async def test_a_hand_back_that_cannot_be_queued_naks(settings: Settings, nc: Client) -> None:
    bench = Bench(settings, nc, _Unreachable(nc.jetstream(), settings.names))
    await bench.consumer.open()
    try:
        first = await bench.settle(HandBack(command=bench.cmd, attempts_used=0))
        again = await bench.next("the nak'd command's redelivery")
        assert again.metadata.sequence.stream == first.metadata.sequence.stream
        assert again.metadata.num_delivered == 2
    finally:
        await bench.consumer.close()


async def _some(seen: list[dict[str, object]]) -> bool:
    return bool(seen)


def test_action_for_is_the_one_map_of_errors() -> None:
    retry = RetryPolicy(max_attempts=3, base_seconds=2.0, jitter=0.0)
    assert action_for(RetryableError("slow"), 1, retry) == Retry(delay=2.0, reason="slow")
    assert action_for(RetryableError("slow"), 3, retry) == Fail(
        reason="gave up after 3 attempts: slow", why="exhausted", code="gave_up"
    )
    assert action_for(PermanentError("no", status=401), 1, retry) == Fail(
        reason="no", why="permanent", code="bad_credentials"
    )
    assert action_for(PermanentError("bad name", status=422), 1, retry) == Fail(
        reason="bad name", why="permanent", code="server_refused"
    )


def _calls(path: Path, names: set[str]) -> list[str]:
    """The ``x.name(`` calls in a file whose method name is in ``names``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in names
        ):
            found.append(f"{path.name}:{node.lineno} .{node.func.attr}(")
    return found


def test_only_the_settler_settles_a_message() -> None:
    settling = {"ack", "nak", "term", "in_progress", "ack_sync", "dead_letter"}
    elsewhere = [
        call
        for path in sorted(WORKER.glob("*.py"))
        if path.name != "outcome.py"
        for call in _calls(path, settling)
    ]
    assert elsewhere == []
    assert _calls(WORKER / "outcome.py", settling)  # the check sees the calls it looks for


HANDLING = ("handler.py", "flow.py", "create_flow.py", "delete_flow.py", "pairing_code_flow.py")


def test_the_handler_and_its_flows_publish_through_publish_py() -> None:
    for name in (*HANDLING, "outcome.py"):
        text = (WORKER / name).read_text()
        for word in ("jsretry", "js.publish", "_subject(", "dead_letter_subject", "Nats-Msg-Id"):
            assert word not in text, (name, word)


def test_the_flows_get_the_database_injected() -> None:
    for name in HANDLING:
        assert ".fence.pool" not in (WORKER / name).read_text(), name
