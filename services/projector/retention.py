"""History retention: Postgres must not grow without bound.

Every ``every`` seconds (hourly), one projector replica (a lease, ``zapbus/leases.py``) removes, for
connections that ended more than ``ZAPBUS_HISTORY_RETENTION_DAYS`` ago (default 90; 0 keeps
everything):

* ``deleted``: the connection row and all its history;
* terminal (``failed``, ``logged_out``, ``qr_expired``, ``conflict``): its history rows older
  than the cut-off; the row stays (the tenant still sees it, and may recreate it).

"Ended" is ``status_changed_at``, set when the row entered its state. The connections are
walked in keyset pages of ``batch`` along the partial index ``connections_ended`` (migration
004), each page in its own short transaction, so the job never holds many locks for long.
A connection deleted here frees its ``Idempotency-Key``.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from zapbus import db
from zapbus.connection.states import TERMINAL, Status, sql_list
from zapbus.leases import Lease
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.retention")

_LEASE = "zapbus.retention"
# A literal list, not a parameter: the planner matches it to the partial index's predicate.
_PAGE = f"""
SELECT id, status, status_changed_at FROM connections
WHERE status IN {sql_list(TERMINAL)} AND status_changed_at < $1
    AND (status_changed_at, id) > ($2, $3)
ORDER BY status_changed_at, id LIMIT $4
"""


class RetentionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deleted = Counter(
            "zapbus_retention_deleted_rows_total",
            "Rows removed by the history retention job, by table.",
            ["table"],
            registry=registry,
        )


class Retention(Stoppable):
    """A runner (zapbus.supervisor): ``purge`` every ``every`` seconds."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        days: float,
        metrics: RetentionMetrics,
        every: float = 3600.0,
        batch: int = 1000,
    ) -> None:
        self.pool = pool
        self.days = days
        self.metrics = metrics
        self.every = every
        self.batch = batch
        super().__init__()

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self.purge()
            except db.UNAVAILABLE as exc:
                log.warning("history retention failed, will retry: %s", exc)
            await self.pause(self.every)

    async def purge(self, now: datetime | None = None) -> tuple[int, int] | None:
        """Remove what is past retention; (history rows, connection rows) removed, or None
        when retention is off or another replica is at it."""
        if self.days <= 0:
            return None
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.days)
        history = connections = 0
        async with self.pool.acquire() as conn:
            lease = Lease(conn, _LEASE)
            if not await lease.take():
                return None
            try:
                at, last = datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0)
                while not self.stopping:
                    async with conn.transaction():
                        rows = await conn.fetch(_PAGE, cutoff, at, last, self.batch)
                        if not rows:
                            break
                        gone = [r["id"] for r in rows if r["status"] == Status.DELETED]
                        ended = [r["id"] for r in rows if r["status"] != Status.DELETED]
                        history += _count(
                            await conn.execute(
                                "DELETE FROM connection_events WHERE connection_id = ANY($1)"
                                " AND (recorded_at < $2 OR connection_id = ANY($3))",
                                ended + gone,
                                cutoff,
                                gone,
                            )
                        )
                        connections += _count(
                            await conn.execute(
                                "DELETE FROM connections WHERE id = ANY($1)"
                                " AND status = $3 AND status_changed_at < $2",
                                gone,
                                cutoff,
                                Status.DELETED.value,
                            )
                        )
                    at, last = rows[-1]["status_changed_at"], rows[-1]["id"]
            finally:
                await lease.release()
        self.metrics.deleted.labels("connection_events").inc(history)
        self.metrics.deleted.labels("connections").inc(connections)
        if history or connections:
            log.info(
                "history retention removed %d history rows and %d deleted connections"
                " (ended before %s)",
                history,
                connections,
                cutoff.isoformat(timespec="seconds"),
            )
        return history, connections


def _count(status: str) -> int:
    """``DELETE 12`` -> 12."""
    return int(status.rsplit(" ", 1)[-1])
