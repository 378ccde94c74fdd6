"""Connection changes -> webhook deliveries, durably.

A batch of changes from the CONNECTION_CHANGES stream becomes, in one transaction, one
delivery row per (endpoint, event type) that wants it; the batch is acked only after the
commit. Each delivery's ``webhook-id`` is derived from the change's message id, so a batch
redelivered after a crash inserts nothing twice.

Order across crashes rests on a checkpoint, not on the consumer's redelivery: the stream
sequence of the last change queued is written in the same transaction as its deliveries
(``notifier_checkpoints``). Changes at or below it are acked and skipped (queued already);
a batch that starts past the change after it (what a killed fan-out had fetched and not
acked waits for ``ack_wait`` on the consumer) first reads the changes in between from the
stream itself. So the deliveries of a connection are queued in stream order, each once,
whatever crashed when, and a fan-out that takes over starts at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import NamedTuple

import asyncpg
import msgspec
import nats.errors
from nats.aio.msg import Msg

from proto import headers
from proto.changes import ConnectionChanged, change_decoder
from services.notifier.metrics import NotifierMetrics
from zapbus.consumer import DurableConsumer
from zapbus.endpoints import event_types, wants
from zapbus.leases import DEFAULT_TIMEOUT_SECONDS, Lease, LeaseLost
from zapbus.logs import fields
from zapbus.supervisor import Stoppable
from zapbus.topology import FANOUT_BATCH

log = logging.getLogger("zapbus.notifier")


_ID_NAMESPACE = uuid.UUID("6f1d3c52-8a4e-4c3e-9a37-0c1b0f2f5e11")
_RETRY_DELAY_SECONDS = 2.0
_STANDBY_SECONDS = 1.0
_LEASE = "zapbus.notifier.fanout"

_ENDPOINTS = """
SELECT c.id AS connection_id, c.name, e.id AS endpoint_id, e.events
FROM connections c JOIN webhook_endpoints e ON e.tenant_id = c.tenant_id AND e.enabled
WHERE c.id = ANY($1::uuid[])
"""

_READ_CHECKPOINT = "SELECT stream_seq FROM notifier_checkpoints WHERE stream = $1"
# moves only from the value read ($2; NULL: whatever it is), so a stale writer changes nothing
_WRITE_CHECKPOINT = """
INSERT INTO notifier_checkpoints AS c (stream, stream_seq) VALUES ($1, $3)
ON CONFLICT (stream) DO UPDATE SET stream_seq = excluded.stream_seq, updated_at = now()
WHERE $2::bigint IS NULL OR c.stream_seq = $2
"""

_INSERT = """
INSERT INTO webhook_deliveries (webhook_id, endpoint_id, connection_id, event_type, payload)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::bytea[])
ON CONFLICT (webhook_id) DO NOTHING
"""


class Change(NamedTuple):
    """One change of the stream: its sequence, its message id (the webhook ids derive from
    it) and what it says."""

    seq: int
    msg_id: str
    change: ConnectionChanged


class CheckpointMoved(Exception):
    """The checkpoint is not where this fan-out read it: another one wrote it meanwhile."""


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
        changes: list[Change] = []
        firsts: set[int] = set()  # sequences delivered for the first time
        good: list[Msg] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                change = change_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.error("undecodable change terminated", extra=fields(subject=msg.subject))
                await msg.term()
                continue
            changes.append(Change(seq, _msg_id(msg.headers, seq), change))
            if msg.metadata.num_delivered == 1:
                firsts.add(seq)
            good.append(msg)
        if not changes:
            return True
        try:
            queued, complete = await self._queue(changes, firsts)
        except (
            asyncpg.PostgresError,
            OSError,
            asyncpg.InterfaceError,
            LeaseLost,
            CheckpointMoved,
            nats.errors.Error,
        ) as exc:
            log.warning("queueing webhooks failed, will retry: %s", exc)
            for msg in good:
                await msg.nak()
            if self._lease is None:
                raise LeaseLost(_LEASE) from exc
            await self._lease.confirm()  # LeaseLost if its session is gone: take it anew
            return False
        for msg in good:
            # a batch behind a gap longer than one read comes back (the gap was shortened)
            await (msg.ack() if complete else msg.nak())
        if queued:
            self.on_queued()
        return True

    async def _queue(self, changes: list[Change], firsts: set[int]) -> tuple[int, bool]:
        """Queue what ``changes`` add past the checkpoint, after the changes of the stream
        between the checkpoint and them. (deliveries queued, whether all of ``changes`` are
        at or below the checkpoint now)."""
        if self._lease is None:
            raise LeaseLost(_LEASE)
        stream = self.consumer.stream
        async with self._lease.session() as conn:
            checkpoint: int | None = await conn.fetchval(_READ_CHECKPOINT, stream)
        if checkpoint is not None and any(c.seq <= checkpoint for c in changes if c.seq in firsts):
            # a change first delivered now cannot be behind what was queued unless the stream
            # started again (deleted and declared anew): its sequences mean something else
            log.warning(
                "changes stream %s is behind the fan-out's checkpoint %d: it was re-created;"
                " starting from these changes",
                stream,
                checkpoint,
            )
            checkpoint = None
        todo = sorted(
            {c.seq: c for c in changes if checkpoint is None or c.seq > checkpoint}.values()
        )
        complete = True
        if checkpoint is not None and todo:
            fetched = {c.seq for c in todo}
            todo, complete = await self._with_gaps(checkpoint, todo)
            if missed := [c.seq for c in todo if c.seq not in fetched]:
                log.info(
                    "read %d change(s) from the stream, fetched before and not acked",
                    len(missed),
                    extra=fields(after_seq=checkpoint, first=missed[0], last=missed[-1]),
                )
        if not todo:
            return 0, complete
        async with self._lease.session() as conn, conn.transaction():
            ids = list({c.change.connection_id for c in todo})
            subscribers: dict[uuid.UUID, list[asyncpg.Record]] = collections.defaultdict(list)
            for r in await conn.fetch(_ENDPOINTS, ids):
                subscribers[r["connection_id"]].append(r)
            rows: list[tuple[object, ...]] = []
            for _, change_id, change in todo:
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
            written = await conn.execute(_WRITE_CHECKPOINT, stream, checkpoint, todo[-1].seq)
            if written != "INSERT 0 1":
                raise CheckpointMoved(f"{stream}: not at {checkpoint} any more")
        for row in rows:
            self.metrics.queued.labels(str(row[3])).inc()
        return len(rows), complete

    async def _with_gaps(self, checkpoint: int, todo: list[Change]) -> tuple[list[Change], bool]:
        """``todo`` (sorted, past ``checkpoint``) with the changes of the stream in between
        that it lacks (fetched earlier and not acked), read from the stream, in order. At most
        a batch is read: then the list ends before the rest of the gap, and False says so."""
        ordered: list[Change] = []
        read = 0
        expected = checkpoint + 1
        for item in todo:
            while expected < item.seq:
                if read >= self.batch:
                    return ordered, False
                msg = await self.consumer.read_from(expected)
                read += 1
                if msg is None or msg.seq is None or msg.seq >= item.seq:
                    break  # gone from the stream (its limits), or nothing in between
                expected = msg.seq + 1
                try:
                    change = change_decoder.decode(msg.data or b"")
                except msgspec.DecodeError:
                    log.error("undecodable change skipped", extra=fields(seq=msg.seq))
                    continue
                ordered.append(Change(msg.seq, _msg_id(msg.headers, msg.seq), change))
            ordered.append(item)
            expected = item.seq + 1
        return ordered, True


def _msg_id(hdrs: dict[str, str] | None, seq: int) -> str:
    """The id a change's webhook ids derive from: its message id, else its sequence."""
    return (hdrs or {}).get(headers.MSG_ID) or f"seq:{seq}"
