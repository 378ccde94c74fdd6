"""What a flow decided about one command, and the one place that tells JetStream.

A flow (``create_flow.py``, ``delete_flow.py``, ``pairing_code_flow.py``) returns an
``Outcome``; ``Settler.apply`` turns it into JetStream calls. Nothing else in the worker acks,
naks, terms or dead-letters a message.

    Ack        done, or nothing (more) to do: ack()
    Nak        try again after ``delay`` seconds: nak(delay)
    Term       stop without a dead letter (a fenced create whose clean-up could not run;
               the reconciler removes what is left): term()
    GiveUp     dead letter, then the flow's ``then`` (its failed event, ...), then term()
    HandBack   shutdown mid-command: queue a copy that has not spent this attempt, ack();
               nak() if the copy cannot be queued

``result`` is what the log line and ``zapbus_worker_commands_total`` say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from nats.aio.msg import Msg

from proto.commands import Command, DeadLetter
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.publish import FlowPublisher

log = logging.getLogger("zapbus.session_worker")


@dataclass(frozen=True, kw_only=True)
class Ack:
    result: str = "succeeded"  # or fenced, waiting, replaced, deferred


@dataclass(frozen=True, kw_only=True)
class Nak:
    delay: float
    reason: str
    result: ClassVar[str] = "retried"


@dataclass(frozen=True, kw_only=True)
class Term:
    reason: str
    result: ClassVar[str] = "fenced"


@dataclass(frozen=True, kw_only=True)
class GiveUp:
    command: Command | None  # None: undecodable
    reason: str  # the letter's error: the server's text, or why it could not be decoded
    why: str  # the letter's reason: permanent, exhausted or undecodable
    attempt: int
    # What the flow does once the letter is stored: whoever sees the failure (a failed row)
    # finds its letter already there.
    then: Callable[[], Awaitable[None]] | None = None
    result: ClassVar[str] = "failed"


@dataclass(frozen=True, kw_only=True)
class HandBack:
    command: Command
    attempts_used: int  # not counting the interrupted one
    result: ClassVar[str] = "interrupted"


Outcome = Ack | Nak | Term | GiveUp | HandBack


class Settler:
    """Turns an outcome into JetStream calls: the one place that settles a message."""

    def __init__(self, publish: FlowPublisher, metrics: WorkerMetrics, heartbeat_seconds: float):
        self.publish = publish
        self.metrics = metrics
        self.heartbeat_seconds = heartbeat_seconds

    async def apply(self, msg: Msg, outcome: Outcome) -> None:
        match outcome:
            case Ack():
                await msg.ack()
            case Nak(delay=delay):
                await msg.nak(delay=delay)
            case Term():
                await msg.term()
            case GiveUp(command=cmd):
                await self._dead_letter(msg, outcome)
                if outcome.then is not None:
                    await outcome.then()
                await msg.term()
                self.metrics.failures.labels(cmd.kind if cmd else "unknown", outcome.why).inc()
            case HandBack(command=cmd, attempts_used=used):
                try:
                    await self.publish.copy(msg, cmd, used)
                    await msg.ack()
                except Exception as exc:
                    log.warning("could not hand back an interrupted command, nak: %r", exc)
                    with contextlib.suppress(Exception):
                        await msg.nak()

    async def _dead_letter(self, msg: Msg, give_up: GiveUp) -> None:
        cmd = give_up.command
        letter = DeadLetter(
            command=cmd,
            raw=msg.data.decode(errors="replace"),
            subject=msg.subject,
            error=give_up.reason,
            reason=give_up.why,
            deliveries=give_up.attempt,
            stream_seq=msg.metadata.sequence.stream,
            failed_at=datetime.now(UTC),
        )
        await self.publish.dead_letter(letter)
        self.metrics.dead_letters.labels(cmd.kind if cmd else "unknown").inc()

    @contextlib.asynccontextmanager
    async def keep_alive(self, msg: Msg) -> AsyncIterator[None]:
        """Tell JetStream the message is still being worked on while the block runs."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_seconds)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
