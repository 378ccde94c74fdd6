"""The session worker's loop: fetch commands while there is capacity, one task per command.

Capacity is ``concurrency`` (also the consumer's ``max_ack_pending``), because the work is
waiting on the Baileys server, not on the CPU. The consumer is used as declared (``zapbus
migrate``): when its ``max_ack_pending`` is lower than ``concurrency``, that is the capacity, so
the loop never keeps pull requests waiting that the server cannot fill (they cost a round trip
each and a request timeout, and starved the fetch of the messages freed meanwhile). On stop it
fetches nothing more, lets in-flight commands finish within the grace period, and cancels the
rest (a cancelled command is handed back, ``outcome.HandBack``: a copy that keeps its attempt
count is queued at once for another worker). Beside the loop, a task keeps the consumer's
pending / ack-pending gauges current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.session_worker.handler import CommandHandler
from services.session_worker.metrics import command_kind
from zapbus.consumer import DurableConsumer

log = logging.getLogger("zapbus.session_worker")

_FETCH_BATCH = 500


class CommandConsumer:
    def __init__(
        self,
        consumer: DurableConsumer,
        handler: CommandHandler,
        concurrency: int,
        grace_seconds: float,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.consumer = consumer
        self.handler = handler
        self.concurrency = concurrency
        self.grace_seconds = grace_seconds
        self.fetch_timeout = fetch_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        metrics = self.handler.metrics
        await self.consumer.open()
        self.concurrency = await self._declared_cap()
        reporter = asyncio.create_task(self.consumer.report_pending(metrics.consumer))
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                # Up to 500 at a time: in a burst each fetch and its fence query wait their
                # turn on a loop busy with the commands already running (100 at a time took
                # ~100-170 ms each there; the commands waited 300 ms in the stream at p50).
                msgs = await self.consumer.fetch(min(free, _FETCH_BATCH), self.fetch_timeout)
                for msg in msgs:
                    metrics.started.labels(command_kind(msg.subject)).inc()
                    task = asyncio.create_task(self.handler.handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await self._drain()
            await self.consumer.close()

    async def _declared_cap(self) -> int:
        """``concurrency``, lowered to the declared consumer's ``max_ack_pending``."""
        try:
            declared = await self.consumer.max_ack_pending()
        except Exception as exc:  # cannot tell: keep ours (the server still bounds it)
            log.warning("could not read the consumer's max_ack_pending: %r", exc)
            return self.concurrency
        if declared is not None and 0 < declared < self.concurrency:
            log.warning(
                "consumer %s is declared with max_ack_pending %d, below the worker's"
                " concurrency %d: taking at most %d commands at once (run `zapbus migrate`"
                " with this worker's settings to raise it)",
                self.consumer.name,
                declared,
                self.concurrency,
                declared,
            )
            return declared
        return self.concurrency

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # e.g. NATS went away mid-command: the message was not acked, so JetStream
            # redelivers it after ack_wait.
            log.warning("command not finished, left for redelivery: %r", exc)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("waiting up to %.1f s for %d commands", self.grace_seconds, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
