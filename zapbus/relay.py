"""The outbox relay: moves committed commands from Postgres to JetStream.

A request's connection row and its command are committed together; the relay then publishes
the command with ``Nats-Msg-Id`` = command id and deletes the outbox row once JetStream has
acknowledged it. A fetched batch goes out as one atomic batch publish where the server and
stream allow it (``zapbus/batchpub.py``: one fsync for the batch with ``sync_interval:
always``, instead of one per command), else pipelined with every ack awaited together. If NATS
is down the rows wait; if the relay dies between publish and delete,
the next run publishes again and JetStream's duplicate window drops the copy. Rows are claimed
with ``FOR UPDATE SKIP LOCKED``, so several gateway replicas can relay side by side. Gateways
and projectors both run it (the projector queues commands too), so it lives below them.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import asyncpg
import msgspec
import nats.errors
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto import headers
from proto.names import Names
from zapbus.batchpub import BatchItem, BatchPublisher
from zapbus.httpkit import LATENCY_BUCKETS
from zapbus.logs import fields
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.outbox")

_BATCH = 500  # atomic batches take up to 1,000: one commit for a projector batch's changes
_GATHER_SECONDS = 0.003
_COUNT_EVERY_SECONDS = 1.0
_PUBLISH_TIMEOUT_SECONDS = 3.0
_ONE_PASS_AT_A_TIME = "SELECT pg_advisory_xact_lock(hashtext('zapbus.outbox.' || current_schema()))"


class OutboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "zapbus_outbox_published_total",
            "Commands relayed from the outbox to JetStream.",
            registry=registry,
        )
        self.failures = Counter(
            "zapbus_outbox_publish_failures_total",
            "Outbox publishes that JetStream did not acknowledge (retried later).",
            registry=registry,
        )
        self.lag = Histogram(
            "zapbus_outbox_relay_lag_seconds",
            "Time from a command's commit to JetStream's acknowledgement of it.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backlog = Gauge(
            "zapbus_outbox_backlog",
            "Commands committed but not yet relayed (as of the relay's last pass).",
            registry=registry,
        )


class OutboxRelay(Stoppable):
    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        metrics: OutboxMetrics,
        names: Names,
        poll_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.js = js
        # a pass holds commands and changes (a create queues both): one batch per stream
        self.publisher = BatchPublisher(
            js, timeout=_PUBLISH_TIMEOUT_SECONDS, stream_of=names.stream_of
        )
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self._counted_at = 0.0

    # kick(): a command was committed: relay now rather than at the next poll (Stoppable)

    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            await self.pause(self.poll_seconds * (2 ** min(failures, 4)))
            if self.kicked:
                # Let the requests arriving in the next moment join this pass: one pass per
                # few ms instead of one per request keeps the gateway's loop for HTTP.
                await self.gather(_GATHER_SECONDS)
            try:
                await self.relay_all()
                failures = 0
            except (
                asyncpg.PostgresError,
                OSError,
                asyncpg.InterfaceError,
                nats.errors.Error,
                TimeoutError,
            ) as exc:
                failures += 1
                log.warning("outbox relay pass failed (%d in a row): %s", failures, exc)

    async def relay_all(self) -> int:
        """Relay until the outbox is empty; return how many commands were published."""
        total = 0
        while True:
            sent, more = await self._relay_batch()
            total += sent
            if not more:
                break
        if time.monotonic() - self._counted_at >= _COUNT_EVERY_SECONDS:
            self._counted_at = time.monotonic()
            self.metrics.backlog.set(await self.pool.fetchval("SELECT count(*) FROM outbox"))
        return total

    async def _relay_batch(self) -> tuple[int, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            # One relay pass at a time per schema (gateways and projectors all relay): two
            # passes side by side could publish one connection's changes out of order.
            await conn.execute(_ONE_PASS_AT_A_TIME)
            rows = await conn.fetch(
                "SELECT id, msg_id, subject, payload, headers, created_at FROM outbox"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                _BATCH,
            )
            if not rows:
                return 0, False
            results = await self._publish(rows)
            done = [r["id"] for r, ok in zip(rows, results, strict=True) if ok is True]
            failed = [r["id"] for r, ok in zip(rows, results, strict=True) if ok is not True]
            if done:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)
            if failed:
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1 WHERE id = ANY($1::bigint[])",
                    failed,
                )
        if failed:
            self.metrics.failures.inc(len(failed))
            raise TimeoutError(f"{len(failed)} of {len(rows)} outbox publishes not acknowledged")
        return len(done), len(rows) == _BATCH

    async def _publish(self, rows: list[asyncpg.Record]) -> list[bool]:
        """Publish ``rows`` as one batch; True for each one JetStream acknowledged."""
        outgoing = []
        for row in rows:
            hdrs: dict[str, str] = msgspec.json.decode(row["headers"])
            hdrs[headers.MSG_ID] = row["msg_id"]
            outgoing.append(BatchItem(row["subject"], bytes(row["payload"]), hdrs))
        results = await self.publisher.publish(outgoing)
        now = datetime.now(UTC)
        relayed: list[dict[str, object]] = []
        for row, msg, result in zip(rows, outgoing, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "command not relayed: %r",
                    result,
                    extra=fields(msg_id=row["msg_id"], subject=row["subject"]),
                )
                continue
            lag = max(0.0, (now - row["created_at"]).total_seconds())
            self.metrics.lag.observe(lag)
            relayed.append(
                {
                    "command_id": msg.headers.get(headers.COMMAND_ID),
                    "connection_id": msg.headers.get(headers.CONNECTION_ID),
                    "msg_id": row["msg_id"],
                    "subject": row["subject"],
                    "lag_ms": round(lag * 1000, 1),
                }
            )
        self.metrics.published.inc(len(relayed))
        if relayed:
            # one line per batch listing its commands, as the projector logs its events (a
            # line per command cost more than its publish in a burst)
            log.info("commands relayed", extra=fields(count=len(relayed), commands=relayed))
        return [not isinstance(r, BaseException) for r in results]
