"""The projector's loop: fetch a batch of events, fold it into Postgres in one transaction, ack.

The consumer is declared with ``AckPolicy.ALL``: acking a batch's last event acknowledges the
whole batch (one ack instead of one per event). On a consumer still declared with explicit
acks (not migrated yet) every event is acked, as before.

Beside the loop, a task keeps the consumer's pending / ack-pending gauges current.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api

from proto.events import Event, event_decoder, event_type
from proto.names import Names
from services.projector.metrics import ProjectorMetrics
from services.projector.partitions import PartitionLease, PartitionLost
from services.projector.store import Applied, project
from zapbus.connection.machine import QrPolicy
from zapbus.consumer import DurableConsumer
from zapbus.logs import fields

log = logging.getLogger("zapbus.projector")

_RETRY_DELAY_SECONDS = 2.0
# Postgres refuses the data itself (bad text, a broken constraint): retrying cannot help.
_POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# The database is away or busy: retry the batch later.
_TRANSIENT = (asyncpg.PostgresError, OSError, asyncpg.InterfaceError)


class Projector:
    """Consumes SESSION_EVENTS and keeps ``connections`` and ``connection_events`` current."""

    def __init__(
        self,
        consumer: DurableConsumer,
        pool: asyncpg.Pool,
        nc: NATS,
        names: Names,
        metrics: ProjectorMetrics,
        policy: QrPolicy,
        batch: int = 256,
        fetch_timeout: float = 1.0,
        lease: PartitionLease | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.pool = pool
        self.nc = nc
        self.names = names
        self.metrics = metrics
        self.policy = policy
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        # The partition this loop projects; every batch checks it still holds it.
        self.lease = lease
        self.on_committed = on_committed
        self._stopping = asyncio.Event()
        self._ack_all = False  # as declared: one ack per batch

    def stop(self) -> None:
        """Finish the batch in hand, then return from ``run``."""
        self._stopping.set()

    async def run(self) -> None:
        await self.consumer.open()
        self._ack_all = await self._acks_all()
        reporter = asyncio.create_task(self.consumer.report_pending(self.metrics.consumer))
        # The next batch is fetched while this one is projected (max_ack_pending covers two).
        ahead = asyncio.ensure_future(self.consumer.fetch(self.batch, self.fetch_timeout))
        try:
            while True:
                msgs = await ahead
                if self._stopping.is_set():
                    for msg in msgs:  # hand back what came in after the stop
                        await msg.nak()
                    break
                ahead = asyncio.ensure_future(self.consumer.fetch(self.batch, self.fetch_timeout))
                if msgs and not await self.handle_batch(msgs):
                    # The batch went back; so does the one fetched behind it, or it would be
                    # applied before the events it follows.
                    for msg in await ahead:
                        await msg.nak()
                    if self._stopping.is_set():
                        break
                    # Handed back at once, fetched again only after the pause: redeliveries
                    # are served before newer messages, so the order holds.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_RETRY_DELAY_SECONDS):
                            await self._stopping.wait()
                    ahead = asyncio.ensure_future(
                        self.consumer.fetch(self.batch, self.fetch_timeout)
                    )
        finally:
            if not ahead.done():
                ahead.cancel()  # what it may have received is redelivered after ack_wait
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await ahead
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await self.consumer.close()

    async def _acks_all(self) -> bool:
        try:
            declared = await self.consumer.declared()
        except Exception as exc:  # acking each event is right under either policy
            log.warning("could not read the consumer's ack policy: %r", exc)
            return False
        return declared.ack_policy == js_api.AckPolicy.ALL

    async def handle_batch(self, msgs: list[Msg]) -> bool:
        """Project one batch; False when it was handed back for redelivery."""
        start = time.perf_counter()
        events: list[Event] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                events.append(event_decoder.decode(msg.data))
                good.append(msg)
            except msgspec.DecodeError as exc:
                self.metrics.events.labels("unknown", "undecodable").inc()
                log.error(
                    "undecodable event terminated",
                    extra=fields(
                        subject=msg.subject, seq=msg.metadata.sequence.stream, error=str(exc)
                    ),
                )
                await msg.term()
        if not events:
            return True
        try:
            results = await self._project(events)
        except PartitionLost:
            log.warning("partition lease lost; handing the batch back and stopping")
            self._stopping.set()
            for msg in good:
                await msg.nak()
            return False
        except _POISON as exc:
            # One event Postgres refuses must not stop the projector for good: find it.
            log.warning("batch refused (%s); projecting it event by event", exc)
            return await self._one_by_one(good, events, start)
        except _TRANSIENT as exc:
            log.warning("projection failed, will retry: %s", exc, extra=fields(batch=len(good)))
            self.metrics.batch_failures.inc()
            for msg in good:
                await msg.nak()
            return False
        await self._finish(good, results, start)
        return True

    async def _project(self, events: list[Event]) -> list[Applied]:
        async with self.pool.acquire() as conn, conn.transaction():
            if self.lease is not None and not await self.lease.held(conn):
                raise PartitionLost
            return await project(conn, events, self.policy, self.names)

    async def _one_by_one(self, msgs: list[Msg], events: list[Event], start: float) -> bool:
        for i, (msg, event) in enumerate(zip(msgs, events, strict=True)):
            try:
                results = await self._project([event])
            except PartitionLost:
                self._stopping.set()
                for rest in msgs[i:]:
                    await rest.nak()
                return False
            except _POISON as exc:
                self.metrics.events.labels(event_type(event), "rejected").inc()
                log.error(
                    "event refused by Postgres, terminated",
                    extra=fields(
                        connection_id=str(event.connection_id),
                        event=event_type(event),
                        seq=msg.metadata.sequence.stream,
                        error=str(exc)[:300],
                    ),
                )
                await msg.term()
                continue
            except _TRANSIENT as exc:
                log.warning("projection failed, will retry: %s", exc)
                self.metrics.batch_failures.inc()
                for rest in msgs[i:]:
                    await rest.nak()
                return False
            await self._finish([msg], results, start)
        return True

    async def _finish(self, good: list[Msg], results: list[Applied], start: float) -> None:
        if self._ack_all:
            await good[-1].ack()  # and every event delivered before it
        else:
            for msg in good:
                await msg.ack()
        if self.on_committed is not None:
            self.on_committed()  # their change snapshots wait in the outbox: relay them now
        now = datetime.now(UTC)
        elapsed_ms = (time.perf_counter() - start) * 1000
        self.metrics.batch_size.observe(len(good))
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        handled: list[dict[str, object]] = []
        for msg, result in zip(good, results, strict=True):
            ev = result.event
            if result.outcome is None:
                outcome = "duplicate" if result.duplicate else "orphan"
            else:
                outcome = "applied" if result.outcome.applied else "ignored"
            outcomes[event_type(ev), outcome] += 1
            self.metrics.lag.observe(max(0.0, (now - ev.occurred_at).total_seconds()))
            handled.append(
                {
                    "connection_id": str(ev.connection_id),
                    "generation": ev.generation,
                    "command_id": str(ev.command_id) if ev.command_id else None,
                    "event": event_type(ev),
                    "outcome": outcome,
                    "seq": msg.metadata.sequence.stream,
                    "delivered": msg.metadata.num_delivered,
                    "from_status": result.from_status,
                    "to_status": result.outcome.row.status if result.outcome else None,
                }
            )
        for (kind, outcome), count in outcomes.items():
            self.metrics.events.labels(kind, outcome).inc(count)
        # One line per batch (one per event cost ~8 % of the projector's CPU), holding every
        # event with its connection id, so a grep for a connection still finds it.
        log.info(
            "batch projected",
            extra=fields(
                events=handled,
                count=len(handled),
                outcomes={f"{k}:{o}": n for (k, o), n in outcomes.items()},
                ms=round(elapsed_ms, 2),
            ),
        )
