"""The watchdog: no connection stays pending, creating or awaiting its QR forever.

Postgres, not the bus, holds the truth. Every ``interval`` one watchdog (an advisory lock keeps
replicas from doubling up) looks for connections whose state has not moved for ``deadline``:

* pending / creating: the create command is re-driven (re-published through the outbox with
  the same command id, under a fresh ``Nats-Msg-Id``) up to ``max_redrives`` times; this
  repairs a command that JetStream lost or that exhausted its deliveries without an answer;
  after that the connection fails with reason ``timeout``.
* awaiting_qr: the Baileys server accepted the session but no QR ever arrived: ``timeout``.

A row a worker is holding (``held_until`` in the future: waiting on the breaker, on a create
slot, or inside the call) is left alone. A time-out queues the deletion of the generation's
session (a timed-out POST may have made it), so a ``failed`` row never keeps a live session.

Deletes are re-driven the same way: every delete zapbus queued is tracked in
``session_deletes`` until the worker reports the session gone; one still there after
``deadline`` is published again (the reconciler is the backstop for the rest).

It also refreshes the ``zapbus_connections`` gauge (connections by state) from the counts the
triggers of migration 016 keep (``zapbus/counts.py``), folding their changes in. A sweep reads
only the watched rows, along partial indexes (``connections_live_status``,
``connections_unlinked_reconnecting``): its cost follows the stuck, not the fleet.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto.commands import CreateSession, DeleteSession
from proto.names import Names
from zapbus import db
from zapbus.connection import states
from zapbus.connection.machine import Forced
from zapbus.connection.states import Status
from zapbus.connection.writer import record, transition
from zapbus.counts import FOLD, STATUS_COUNTS
from zapbus.httpkit import LATENCY_BUCKETS
from zapbus.logs import fields
from zapbus.outbox import insert_outbox, queue_delete
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.watchdog")

_LOCK_ID = 0x7A627764  # "zbwd"
_STUCK = sorted(states.STUCK)
# What the watchdog watches, as literal lists the planner matches to the partial indexes
# connections_live_status and connections_unlinked_reconnecting (a bound list cannot be);
# ``status_changed_at < $1`` repeats what the greatest() implies, as an index condition.
_WATCHED = (
    f"(status IN {states.sql_list(states.STUCK)}"
    f" OR (status IN {states.sql_list({Status.RECONNECTING})} AND qr_seq = 0))"
)
STUCK_ROWS = (
    "SELECT id, tenant_id, generation, session_name, status, status_reason,"
    " command_id, redrives, phone_number FROM connections"
    # reconnecting before any QR: closes before the first QR, WhatsApp unreachable
    f" WHERE {_WATCHED} AND status_changed_at < $1"
    " AND greatest(status_changed_at, last_event_at) < $1"
    " AND (held_until IS NULL OR held_until < now())"
    # waiting for room on a Baileys server: queued, not stuck (the pool manager queues the
    # create again as room frees)
    " AND placement_wait_since IS NULL"
    " ORDER BY status_changed_at LIMIT 500 FOR UPDATE SKIP LOCKED"
)
STUCK_COUNTS = (
    "SELECT status, count(*) AS n FROM connections"
    f" WHERE status IN {states.sql_list(states.STUCK)} AND status_changed_at < $1"
    " AND greatest(status_changed_at, last_event_at) < $1 GROUP BY status"
)
# A delete that never completes (a server that refuses it for good) stops being re-driven
# after this many tries; it stays listed in session_deletes and counted.
_MAX_DELETE_REDRIVES = 10


class WatchdogMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter(
            "zapbus_watchdog_actions_total",
            "Stuck connections handled by the watchdog, by action (redriven, timed_out).",
            ["action"],
            registry=registry,
        )
        self.connections = Gauge(
            "zapbus_connections",
            "Connections by state (refreshed by the watchdog on every sweep).",
            ["status"],
            registry=registry,
        )
        self.stuck = Gauge(
            "zapbus_connections_stuck",
            "Connections in pending/creating/awaiting_qr past the watchdog deadline.",
            ["status"],
            registry=registry,
        )
        self.sweep = Histogram(
            "zapbus_watchdog_sweep_seconds",
            "Time of one watchdog sweep (gauges, stuck rows, unfinished deletes).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class Watchdog(Stoppable):
    def __init__(
        self,
        pool: asyncpg.Pool,
        names: Names,
        metrics: WatchdogMetrics,
        deadline_seconds: float,
        interval_seconds: float,
        max_redrives: int,
    ) -> None:
        self.pool = pool
        self.names = names
        self.metrics = metrics
        self.deadline = timedelta(seconds=deadline_seconds)
        self.interval = interval_seconds
        self.max_redrives = max_redrives
        super().__init__()

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self.sweep()
            except db.UNAVAILABLE as exc:
                log.warning("watchdog sweep failed: %s", exc)
            await self.pause(self.interval)

    async def sweep(self) -> None:
        started = time.perf_counter()
        # the counts' changes folded in a transaction of their own, so that the sweep's
        # transaction holds no count row
        await self.pool.execute(FOLD)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_ID):
                return  # another replica is sweeping
            await self._refresh_gauges(conn)
            rows = await conn.fetch(STUCK_ROWS, datetime.now(UTC) - self.deadline)
            redriven = failed = 0
            for row in rows:
                status = Status(row["status"])
                redrivable = status in states.AWAITING_CREATE
                if redrivable and row["redrives"] < self.max_redrives:
                    await self._redrive(conn, row)
                    redriven += 1
                else:
                    await self._time_out(conn, row, status)
                    failed += 1
            deletes = await self._redrive_deletes(conn)
        self.metrics.actions.labels("delete_redriven").inc(deletes)
        self.metrics.actions.labels("redriven").inc(redriven)
        self.metrics.actions.labels("timed_out").inc(failed)
        self.metrics.sweep.observe(time.perf_counter() - started)

    async def _redrive(self, conn: asyncpg.Connection, row: asyncpg.Record) -> None:
        attempt = row["redrives"] + 1
        command_id = row["command_id"] or uuid.uuid4()
        cmd = CreateSession(
            command_id=command_id,
            connection_id=row["id"],
            tenant_id=row["tenant_id"],
            generation=row["generation"],
            session_name=row["session_name"],
            requested_at=datetime.now(UTC),
        )
        await insert_outbox(conn, self.names, cmd, msg_id=f"{command_id}:redrive:{attempt}")
        # A re-drive is a new run of the create: its attempts count from 1 again.
        await conn.execute(
            "UPDATE connections SET redrives = $2, command_id = $3, attempts = 0,"
            " status_changed_at = now(), version = version + 1 WHERE id = $1",
            row["id"],
            attempt,
            command_id,
        )
        await self._history(
            conn,
            row,
            "watchdog.redriven",
            row["status"],
            False,
            f"no progress for {self.deadline.total_seconds():.0f} s;"
            f" create re-driven ({attempt}/{self.max_redrives})",
        )
        log.warning(
            "stuck connection re-driven",
            extra=fields(
                connection_id=str(row["id"]),
                generation=row["generation"],
                command_id=str(command_id),
                status=row["status"],
                redrive=attempt,
            ),
        )

    async def _time_out(
        self, conn: asyncpg.Connection, row: asyncpg.Record, status: Status
    ) -> None:
        seconds = self.deadline.total_seconds()
        if status == Status.RECONNECTING:
            # Closes before any QR, for the whole deadline: the server cannot reach WhatsApp.
            code = "whatsapp_unreachable"
            reason = (
                f"the Baileys server could not reach WhatsApp for {seconds:.0f} s"
                f" (last: {row['status_reason'] or 'connection closed'})"
            )[:300]
        else:
            code = "timeout"
            reason = f"timeout: no progress in {status.value} for {seconds:.0f} s"
        # A timed-out POST may have made the session after all: a failed row keeps none.
        await queue_delete(
            conn,
            self.names,
            row["id"],
            row["tenant_id"],
            row["generation"],
            row["session_name"],
            row["phone_number"],
        )
        await transition(
            conn,
            self.names,
            row["id"],
            Forced.FAIL,
            cause="watchdog.timeout",
            reason=reason,
            reason_code=code,
            command_id=row["command_id"],
        )
        log.warning(
            "stuck connection failed",
            extra=fields(
                connection_id=str(row["id"]), generation=row["generation"], status=status.value
            ),
        )

    async def _redrive_deletes(self, conn: asyncpg.Connection) -> int:
        """Publish again every tracked delete that has not completed within the deadline."""
        rows = await conn.fetch(
            "SELECT d.session_name, d.connection_id, d.generation, d.command_id, d.redrives,"
            " d.phone_number, d.server,"
            " c.tenant_id FROM session_deletes d LEFT JOIN connections c ON c.id = d.connection_id"
            " WHERE d.last_driven_at < $1 AND d.redrives < $2"
            " ORDER BY d.last_driven_at LIMIT 500 FOR UPDATE OF d SKIP LOCKED",
            datetime.now(UTC) - self.deadline,
            _MAX_DELETE_REDRIVES,
        )
        for row in rows:
            attempt = row["redrives"] + 1
            cmd = DeleteSession(
                command_id=row["command_id"],
                connection_id=row["connection_id"],
                tenant_id=row["tenant_id"] or uuid.UUID(int=0),
                generation=row["generation"],
                session_name=row["session_name"],
                requested_at=datetime.now(UTC),
                phone_number=row["phone_number"],
                server=row["server"],
            )
            await insert_outbox(conn, self.names, cmd, msg_id=f"{cmd.command_id}:redrive:{attempt}")
            await conn.execute(
                "UPDATE session_deletes SET redrives = $2 WHERE session_name = $1",
                row["session_name"],
                attempt,
            )
            log.warning(
                "unfinished session delete re-driven",
                extra=fields(
                    connection_id=str(row["connection_id"]),
                    generation=row["generation"],
                    command_id=str(cmd.command_id),
                    redrive=attempt,
                ),
            )
        return len(rows)

    async def _history(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        event_type: str,
        to_status: str,
        applied: bool,
        reason: str,
        reason_code: str | None = None,
    ) -> None:
        await record(
            conn,
            row["id"],
            row["generation"],
            event_type,
            from_status=row["status"],
            to_status=to_status,
            applied=applied,
            reason=reason,
            command_id=row["command_id"],
            reason_code=reason_code,
        )

    async def _refresh_gauges(self, conn: asyncpg.Connection) -> None:
        counts = {r["status"]: r["n"] for r in await conn.fetch(STATUS_COUNTS)}
        for status in Status:
            self.metrics.connections.labels(status.value).set(counts.get(status.value, 0))
        stuck = {
            r["status"]: r["n"]
            for r in await conn.fetch(STUCK_COUNTS, datetime.now(UTC) - self.deadline)
        }
        for status in _STUCK:
            self.metrics.stuck.labels(status.value).set(stuck.get(status.value, 0))
