"""Connection changes -> webhook deliveries, durably.

A batch of changes from the CONNECTION_CHANGES stream becomes, in one transaction, one
delivery row per (endpoint, event type) that wants it; the batch is acked only after the
commit. Each delivery's ``webhook-id`` is derived from the change's message id, so a batch
redelivered after a crash inserts nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable

import asyncpg
import msgspec
from nats.aio.msg import Msg

from proto import headers
from proto.changes import ConnectionChanged, change_decoder
from services.notifier.metrics import NotifierMetrics
from zapbus.consumer import DurableConsumer
from zapbus.leases import DEFAULT_TIMEOUT_SECONDS, Lease, LeaseLost
from zapbus.logs import fields
from zapbus.supervisor import Stoppable
from zapbus.webhooks import event_types, wants

log = logging.getLogger("zapbus.notifier")

# Changes fetched at once; also the consumer's max_ack_pending (app.consumer_config), so a
# fan-out killed before acking a batch lets nothing newer through until that batch comes
# back (after ack_wait): later changes of a connection never overtake earlier ones.
FANOUT_BATCH = 256

_ID_NAMESPACE = uuid.UUID("6f1d3c52-8a4e-4c3e-9a37-0c1b0f2f5e11")
_RETRY_DELAY_SECONDS = 2.0
_STANDBY_SECONDS = 1.0
_LEASE = "zapbus.notifier.fanout"

_ENDPOINTS = """
SELECT c.id AS connection_id, c.name, e.id AS endpoint_id, e.events
FROM connections c JOIN webhook_endpoints e ON e.tenant_id = c.tenant_id AND e.enabled
WHERE c.id = ANY($1::uuid[])
"""

_INSERT = """
INSERT INTO webhook_deliveries (webhook_id, endpoint_id, connection_id, event_type, payload)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::bytea[])
ON CONFLICT (webhook_id) DO NOTHING
"""


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """What a receiver gets: ``{"type", "timestamp", "data"}``."""

    type: str
    timestamp: str
    data: dict[str, object]


_encoder = msgspec.json.Encoder()


def payload(event_type: str, change: ConnectionChanged, name: str | None) -> bytes:
    """The body of one webhook: the connection as of that change."""
    data: dict[str, object] = {
        "id": str(change.connection_id),
        "name": name,
        **msgspec.to_builtins(change),
    }
    data.pop("connection_id", None)
    return _encoder.encode(
        Body(type=event_type, timestamp=change.changed_at.isoformat(), data=data)
    )


def webhook_id(endpoint_id: uuid.UUID, change_id: str, event_type: str) -> str:
    return "msg_" + uuid.uuid5(_ID_NAMESPACE, f"{endpoint_id}|{change_id}|{event_type}").hex


class Fanout(Stoppable):
    """Consumes CONNECTION_CHANGES and queues the deliveries they make."""

    def __init__(
        self,
        consumer: DurableConsumer,
        pool: asyncpg.Pool,
        metrics: NotifierMetrics,
        on_queued: Callable[[], None],
        batch: int = FANOUT_BATCH,
        fetch_timeout: float = 1.0,
        leader_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.consumer = consumer
        self.pool = pool
        self.metrics = metrics
        self.on_queued = on_queued
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.leader_timeout = leader_timeout_seconds
        self._lease: Lease | None = None
        super().__init__()

    async def run(self) -> None:
        # One fan-out at a time per schema (other notifier replicas wait on the lease): two
        # consumers side by side could queue one connection's changes out of order. The
        # batches are written on the lease's connection, kept alive while this replica runs:
        # if it freezes, Postgres ends that session, another replica takes over, and this
        # one's writes fail (it takes the lease anew, as a standby, when it wakes).
        while not self.stopping:
            try:
                await self._lead()
            except LeaseLost as exc:
                log.warning("fan-out lease lost (%s): standing by to take it again", exc)
                await self.pause(_STANDBY_SECONDS)

    async def _lead(self) -> None:
        async with self.pool.acquire() as conn:
            lease = Lease(conn, _LEASE, self.leader_timeout)
            while not await lease.take():
                if await self.pause(_STANDBY_SECONDS):
                    return
            self._lease = lease
            try:
                async with lease.kept_alive():
                    await self._consume()
            finally:
                self._lease = None
                await lease.release()

    async def _consume(self) -> None:
        await self.consumer.open()
        reporter = asyncio.create_task(self.consumer.report_pending(self.metrics.consumer))
        try:
            while not self.stopping:
                if self._lease is not None and not self._lease.held:
                    raise LeaseLost(_LEASE)  # its session ended (a ping failed)
                msgs = await self.consumer.fetch(self.batch, self.fetch_timeout)
                if msgs and not await self.handle_batch(msgs):
                    await self.pause(_RETRY_DELAY_SECONDS)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await self.consumer.close()

    async def handle_batch(self, msgs: list[Msg]) -> bool:
        """Queue the deliveries of a batch; False when it went back for redelivery."""
        changes: list[tuple[str, ConnectionChanged]] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                change = change_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.error("undecodable change terminated", extra=fields(subject=msg.subject))
                await msg.term()
                continue
            msg_id = (msg.headers or {}).get(
                headers.MSG_ID
            ) or f"seq:{msg.metadata.sequence.stream}"
            changes.append((msg_id, change))
            good.append(msg)
        if not changes:
            return True
        try:
            queued = await self._queue(changes)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, LeaseLost) as exc:
            log.warning("queueing webhooks failed, will retry: %s", exc)
            for msg in good:
                await msg.nak()
            if self._lease is None:
                raise LeaseLost(_LEASE) from exc
            await self._lease.confirm()  # LeaseLost if its session is gone: take it anew
            return False
        for msg in good:
            await msg.ack()
        if queued:
            self.on_queued()
        return True

    async def _queue(self, changes: list[tuple[str, ConnectionChanged]]) -> int:
        if self._lease is None:
            raise LeaseLost(_LEASE)
        async with self._lease.session() as conn, conn.transaction():
            ids = list({c.connection_id for _, c in changes})
            subscribers: dict[uuid.UUID, list[asyncpg.Record]] = collections.defaultdict(list)
            for r in await conn.fetch(_ENDPOINTS, ids):
                subscribers[r["connection_id"]].append(r)
            rows: list[tuple[object, ...]] = []
            for change_id, change in changes:
                types = event_types(change)
                for sub in subscribers.get(change.connection_id, ()):
                    for kind in types:
                        if wants(list(sub["events"]), kind):
                            rows.append(
                                (
                                    webhook_id(sub["endpoint_id"], change_id, kind),
                                    sub["endpoint_id"],
                                    change.connection_id,
                                    kind,
                                    payload(kind, change, sub["name"]),
                                )
                            )
            if rows:
                await conn.execute(_INSERT, *[list(col) for col in zip(*rows, strict=True)])
        for row in rows:
            self.metrics.queued.labels(str(row[3])).inc()
        return len(rows)
