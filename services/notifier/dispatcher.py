"""Sends queued webhook deliveries, in order per (endpoint, connection), with retries.

Each pass claims the due head of every (endpoint, connection) queue (the oldest pending
delivery; a later one waits until it succeeded or was given up), marks it claimed for a
while in Postgres, sends it and records the attempt. A notifier killed mid-delivery loses
nothing: its claim runs out and the delivery is sent again, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import uuid
from datetime import timedelta

import asyncpg
import msgspec

from services.notifier.metrics import NotifierMetrics
from services.notifier.sender import Attempt, Sender
from zapbus.logs import fields
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.notifier")

_POLL_SECONDS = 0.25
_BACKLOG_EVERY_SECONDS = 5.0

_CLAIM = """
WITH heads AS (
    SELECT DISTINCT ON (d.endpoint_id, d.connection_id) d.id, d.next_attempt_at, d.claimed_until
    FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
    WHERE d.state = 'pending'
    ORDER BY d.endpoint_id, d.connection_id, d.id
), due AS (
    SELECT id FROM heads
    WHERE next_attempt_at <= now() AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY next_attempt_at LIMIT $1
)
UPDATE webhook_deliveries d SET claimed_until = now() + make_interval(secs => $2)
FROM due, webhook_endpoints e
WHERE d.id = due.id AND e.id = d.endpoint_id AND d.state = 'pending'
  AND (d.claimed_until IS NULL OR d.claimed_until < now())
RETURNING d.id, d.webhook_id, d.endpoint_id, d.connection_id, d.event_type, d.payload,
          d.attempts, d.retry_from, e.url, e.secret,
          CASE WHEN e.previous_until > now() THEN e.previous_secret END AS previous_secret
"""


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    webhook_id: str
    endpoint_id: uuid.UUID
    connection_id: uuid.UUID
    event_type: str
    payload: bytes
    attempts: int
    url: str
    secrets: list[str]


class DeliveryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    retry_base_seconds: float
    retry_max_seconds: float
    retry_for_seconds: float
    disable_after_seconds: float
    timeout_seconds: float

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next try: ``base * 2^(attempt-1)`` up to the maximum, with
        +-20 % jitter; a receiver's ``Retry-After`` wins (up to the maximum)."""
        if retry_after is not None:
            return min(retry_after, self.retry_max_seconds)
        base = min(self.retry_base_seconds * 2.0 ** min(attempt - 1, 30), self.retry_max_seconds)
        return float(base * random.uniform(0.8, 1.2))


class Dispatcher(Stoppable):
    def __init__(
        self,
        pool: asyncpg.Pool,
        sender: Sender,
        policy: DeliveryPolicy,
        metrics: NotifierMetrics,
        concurrency: int = 64,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.sender = sender
        self.policy = policy
        self.metrics = metrics
        self.concurrency = concurrency
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._backlog_at = 0.0

    # kick(): new deliveries were queued: look now rather than at the next poll (Stoppable)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.stopping:
                try:
                    await self.dispatch_once()
                    if loop.time() - self._backlog_at >= _BACKLOG_EVERY_SECONDS:
                        self._backlog_at = loop.time()
                        await self._report_backlog()
                except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                    log.warning("dispatch pass failed: %s", exc)
                # a kick during the pass (a delivery done, new ones queued) ends it at once
                await self.pause(_POLL_SECONDS)
        finally:
            # in-flight attempts finish (within the HTTP timeout) so none is sent twice
            if self._inflight:
                await asyncio.wait(list(self._inflight.values()))

    async def dispatch_once(self) -> int:
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        claim_seconds = self.policy.timeout_seconds + 30.0
        rows = await self.pool.fetch(_CLAIM, free, claim_seconds)
        for r in rows:
            if r["id"] in self._inflight:
                continue
            claimed = Claimed(
                id=r["id"],
                webhook_id=r["webhook_id"],
                endpoint_id=r["endpoint_id"],
                connection_id=r["connection_id"],
                event_type=r["event_type"],
                payload=bytes(r["payload"]),
                attempts=r["attempts"],
                url=r["url"],
                secrets=[s for s in (r["secret"], r["previous_secret"]) if s],
            )
            task = asyncio.create_task(self._deliver(claimed))
            self._inflight[claimed.id] = task
            task.add_done_callback(functools.partial(self._done, claimed.id))
        return len(rows)

    def _done(self, delivery_id: int, _: asyncio.Task[None]) -> None:
        self._inflight.pop(delivery_id, None)
        self.kick()  # its connection's next delivery may go now

    async def _deliver(self, d: Claimed) -> None:
        result = await self.sender.send(d.url, d.secrets, d.webhook_id, d.payload)
        self.metrics.latency.observe(result.duration_ms / 1000)
        for wait in (0.5, 1.0, 2.0, 4.0, 8.0):
            try:
                outcome = await self._record(d, result)
                break
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                # the claim runs out and the delivery is sent again (same webhook-id)
                log.warning("recording an attempt failed: %s", exc)
                await asyncio.sleep(wait)
        else:
            return
        self.metrics.deliveries.labels(outcome).inc()
        log.info(
            "webhook attempt",
            extra=fields(
                webhook_id=d.webhook_id,
                endpoint_id=str(d.endpoint_id),
                connection_id=str(d.connection_id),
                event=d.event_type,
                attempt=d.attempts + 1,
                status_code=result.status_code,
                error=result.error,
                ms=result.duration_ms,
                outcome=outcome,
            ),
        )

    async def _record(self, d: Claimed, result: Attempt) -> str:
        attempt = d.attempts + 1
        async with self.pool.acquire() as conn, conn.transaction():
            retry_from = await conn.fetchval(
                "SELECT retry_from FROM webhook_deliveries WHERE id = $1 FOR UPDATE", d.id
            )
            if retry_from is None:
                return "gone"  # the endpoint was deleted meanwhile
            now = await conn.fetchval("SELECT now()")
            next_at = None
            if result.ok:
                outcome, state = "succeeded", "succeeded"
            elif result.retryable:
                next_at = now + timedelta(seconds=self.policy.delay(attempt, result.retry_after))
                deadline = retry_from + timedelta(seconds=self.policy.retry_for_seconds)
                outcome, state = (
                    ("retried", "pending")
                    if next_at <= deadline
                    else (
                        "given_up",
                        "given_up",
                    )
                )
                if state == "given_up":
                    next_at = None
            else:
                outcome, state = "given_up", "given_up"
            error = result.error or (None if result.ok else f"HTTP {result.status_code}")
            await conn.execute(
                "INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error,"
                " duration_ms, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6)",
                d.id,
                attempt,
                result.status_code,
                result.error,
                result.duration_ms,
                next_at,
            )
            await conn.execute(
                "UPDATE webhook_deliveries SET attempts = $2, state = $3,"
                " next_attempt_at = coalesce($4, next_attempt_at), claimed_until = NULL,"
                " last_error = $5,"
                " finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END"
                " WHERE id = $1",
                d.id,
                attempt,
                state,
                next_at,
                error,
            )
            if result.ok:
                await conn.execute(
                    "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1",
                    d.endpoint_id,
                )
            else:
                await self._failed(conn, d, error or "failed")
        return outcome

    async def _failed(self, conn: asyncpg.Connection, d: Claimed, error: str) -> None:
        """Count the failure against the endpoint; disable it when it has been failing,
        without a success, for ``disable_after_seconds``."""
        row = await conn.fetchrow(
            "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now())"
            " WHERE id = $1 RETURNING failing_since, now() - failing_since AS failing_for,"
            " enabled",
            d.endpoint_id,
        )
        if row is None or not row["enabled"]:
            return
        if row["failing_for"].total_seconds() < self.policy.disable_after_seconds:
            return
        reason = (
            f"disabled: no successful delivery since {row['failing_since'].isoformat()}"
            f" ({self.policy.disable_after_seconds:.0f} s); last error: {error}"
        )[:500]
        await conn.execute(
            "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2,"
            " disabled_at = now() WHERE id = $1",
            d.endpoint_id,
            reason,
        )
        await conn.execute(
            "UPDATE webhook_deliveries SET state = 'given_up', finished_at = now(),"
            " claimed_until = NULL, last_error = 'endpoint disabled'"
            " WHERE endpoint_id = $1 AND state = 'pending'",
            d.endpoint_id,
        )
        log.warning(
            "webhook endpoint disabled",
            extra=fields(endpoint_id=str(d.endpoint_id), reason=reason),
        )

    async def _report_backlog(self) -> None:
        rows = await self.pool.fetch(
            "SELECT endpoint_id, count(*) AS n FROM webhook_deliveries WHERE state = 'pending'"
            " GROUP BY endpoint_id"
        )
        self.metrics.backlog.clear()
        for r in rows:
            self.metrics.backlog.labels(str(r["endpoint_id"])).set(r["n"])
        self.metrics.pending.set(sum(r["n"] for r in rows))
        self.metrics.disabled.set(
            await self.pool.fetchval("SELECT count(*) FROM webhook_endpoints WHERE NOT enabled")
        )
