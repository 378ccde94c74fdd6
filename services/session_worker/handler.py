"""Runs one command: decode it, pick its flow, let the flow decide, settle the message.

The flows (``create_flow.py``, ``delete_flow.py``, ``pairing_code_flow.py``) call the Baileys
server and return an outcome; ``outcome.Settler`` is the one place that turns it into JetStream
calls; ``actions.py`` is the one map of a failed call to retry or give up. During the (slow)
call the message is kept alive with ``in_progress()`` and a create's row is held
(``holds.py``) so the watchdog waits.

Event and dead-letter ids are derived from the command id, the message's stream sequence and
its delivery count: a crash and redelivery of one message republishes the same ids (nothing is
counted twice), while a re-driven or replayed command (a new message) gets new ones, so its
history and dead letters are never swallowed as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.aio.msg import Msg

from proto import headers
from proto.commands import (
    Command,
    CreateSession,
    DeleteSession,
    RequestPairingCode,
    command_decoder,
)
from services.session_worker.create_flow import run_create
from services.session_worker.delete_flow import run_delete
from services.session_worker.flow import Deps, Run
from services.session_worker.holds import Holds
from services.session_worker.outcome import GiveUp, HandBack, Outcome, Settler
from services.session_worker.pairing_code_flow import run_pairing_code
from zapbus.logs import fields

log = logging.getLogger("zapbus.session_worker")


def _attempts_used(msg: Msg) -> int:
    """Attempts spent by earlier copies of this command (header set by a hand-back)."""
    raw = (msg.headers or {}).get(headers.ATTEMPTS_USED, "0")
    return int(raw) if raw.isdigit() else 0


class CommandHandler:
    def __init__(self, deps: Deps, settler: Settler, holds: Holds) -> None:
        self.deps = deps
        self.settler = settler
        self.holds = holds
        self.metrics = deps.metrics

    async def handle(self, msg: Msg) -> None:
        start = time.perf_counter()
        # The attempt is this message's delivery count plus what earlier copies spent: a
        # command interrupted by a shutdown is handed back as a copy that keeps its count, so
        # a SIGTERM does not spend an attempt.
        delivery = msg.metadata.num_delivered or 1
        attempt = _attempts_used(msg) + delivery
        try:
            cmd = command_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            undecodable = GiveUp(command=None, reason=str(exc), why="undecodable", attempt=attempt)
            await self.settler.apply(msg, undecodable)
            log.error("undecodable command terminated", extra=fields(subject=msg.subject))
            return
        run = Run(attempt=attempt, seq=msg.metadata.sequence.stream)
        self.metrics.in_flight.inc()
        result = "error"
        try:
            # Kept alive from the first fence check to the ack: a slow database (each call is
            # bounded by its timeouts) or a slow server never lets ack_wait run out, so no
            # second copy of this command runs in parallel.
            async with self.settler.keep_alive(msg):
                with self._held(cmd):
                    outcome = await self._run(cmd, run)
                    await self.settler.apply(msg, outcome)
                    result = outcome.result
        except asyncio.CancelledError:
            interrupted = HandBack(command=cmd, attempts_used=attempt - 1)
            result = interrupted.result
            await asyncio.shield(self.settler.apply(msg, interrupted))
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.commands.labels(cmd.kind, result).inc()
            log.info(
                "command %s",
                result,
                extra=fields(
                    command=cmd.kind,
                    connection_id=str(cmd.connection_id),
                    generation=cmd.generation,
                    command_id=str(cmd.command_id),
                    subject=msg.subject,
                    seq=run.seq,
                    delivered=delivery,
                    attempt=attempt,
                    ms=round((time.perf_counter() - start) * 1000, 1),
                ),
            )

    async def _run(self, cmd: Command, run: Run) -> Outcome:
        match cmd:
            case CreateSession():
                return await run_create(self.deps, cmd, run)
            case DeleteSession():
                return await run_delete(self.deps, cmd, run)
            case RequestPairingCode():
                return await run_pairing_code(self.deps, cmd, run)

    def _held(self, cmd: Command) -> contextlib.AbstractContextManager[None]:
        """A create's row is held while it runs (the watchdog and reconciler wait)."""
        if isinstance(cmd, CreateSession):
            return self.holds.hold(cmd.connection_id)
        return contextlib.nullcontext()
