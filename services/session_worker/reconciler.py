"""The reconciler: level-triggered repair of drift between Postgres and the Baileys server.

Edges (commands, webhooks) make zapbus fast; this loop makes it true. Every
``reconcile_interval_seconds`` one replica (a lease, ``zapbus/leases.py``: a replica frozen
mid-sweep loses it, and checks it before repairing) reads what the server
holds (``GET /sessions``, or ``GET /sessions/{name}`` per wanted session where there is no
list route), compares it with the rows (``drift.compute``) and repairs through the same paths
as everything else, so each repair is fenced, retried, dead-lettered and in history:

* orphan (and unknown, when allowed) -> a DeleteSession command through the outbox;
* lost -> the row goes ``reconnecting`` ("session lost on server") and its CreateSession is
  queued again for the same generation; after ``reconcile_max_recreates`` -> ``failed``;
* state -> a ``reconcile.status`` event on SESSION_EVENTS, applied by the projector's state
  machine like a webhook.

It runs in the session worker: that is the role that talks to the Baileys servers (their
clients, their breakers: a server whose breaker is open or whose health probes fail is not
swept, since a server that does not answer would look empty), and it needs no state of its own
beyond two columns on the row. With a pool of servers each is compared with the rows placed on
it: a session on one server of a generation placed on another is an orphan there too.

A sweep reads what it compares from indexes, not every row: the wanted sessions placed on the
server (name and state) from the partial index ``connections_wanted`` (an index-only scan on
a vacuumed table), the rows an earlier sweep missed from ``connections_missed``, and in full
only the rows ``drift.narrow`` names (none at rest).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto import headers
from proto.commands import CreateSession
from proto.events import EVENT_SUBJECT_KIND, SessionObserved, event_encoder
from proto.names import Names
from services.session_worker.drift import (
    KINDS,
    LOST_REASON,
    Drift,
    DriftItem,
    Observed,
    ReconcilePolicy,
    RowView,
    compute,
    narrow,
)
from services.session_worker.server_pool import Server, ServerPool
from zapbus import db, jsretry
from zapbus.connection import states
from zapbus.connection.machine import Forced
from zapbus.connection.states import Status
from zapbus.connection.writer import Raw, record, transition
from zapbus.dialects.base import SessionList
from zapbus.dialects.errors import BaileysError
from zapbus.httpkit import LATENCY_BUCKETS
from zapbus.leases import DEFAULT_TIMEOUT_SECONDS, Lease, LeaseLost
from zapbus.logs import fields
from zapbus.outbox import insert_outbox, queue_delete
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.reconciler")

_LEASE = "zapbus.reconciler"
_PROBE_CONCURRENCY = 10

ROWS = """
SELECT id, tenant_id, generation, session_name, status, updated_at, status_changed_at,
       reconcile_misses, reconcile_recreates, held_until, server
FROM connections WHERE id = ANY($1::uuid[])
"""
# the wanted sessions, as the partial index connections_wanted (a literal list: the planner
# matches it to the index's predicate); in a pool, those placed on server $1
WANTED = (
    "SELECT server, session_name, status FROM connections"
    f" WHERE status IN {states.sql_list(states.WANTED_LIVE)}"
)
WANTED_ON = WANTED + " AND server = $1"
MISSED = "SELECT id FROM connections WHERE reconcile_misses > 0"


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sweeps = Counter(
            "zapbus_reconcile_sweeps_total",
            "Reconciler sweeps, by outcome (done, not_leader, server_unavailable, error).",
            ["outcome"],
            registry=registry,
        )
        self.found = Counter(
            "zapbus_reconcile_drift_found_total",
            "Drift found by the reconciler, by kind (orphan, lost, state, unknown).",
            ["kind"],
            registry=registry,
        )
        self.repairs = Counter(
            "zapbus_reconcile_repairs_total",
            "Repairs made by the reconciler, by kind.",
            ["kind"],
            registry=registry,
        )
        self.drift = Gauge(
            "zapbus_reconcile_drift",
            "Drift seen by the last sweep, by kind.",
            ["kind"],
            registry=registry,
        )
        self.persistent = Gauge(
            "zapbus_reconcile_drift_persistent",
            "Drift (by session) seen by the last sweep and the one before it too.",
            registry=registry,
        )
        self.last_sweep = Gauge(
            "zapbus_reconcile_last_sweep_timestamp_seconds",
            "When the last complete sweep ended (Unix time).",
            registry=registry,
        )
        self.sweep_seconds = Histogram(
            "zapbus_reconcile_sweep_seconds",
            "Time of one complete sweep of every server (lists, comparison, repairs).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for kind in KINDS:
            self.found.labels(kind)
            self.repairs.labels(kind)
            self.drift.labels(kind).set(0)
        for outcome in ("done", "not_leader", "server_unavailable", "error"):
            self.sweeps.labels(outcome)


class Reconciler(Stoppable):
    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        names: Names,
        servers: ServerPool,
        metrics: ReconcileMetrics,
        interval_seconds: float,
        policy: ReconcilePolicy,
        leader_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.pool = pool
        self.leader_timeout = leader_timeout_seconds
        self.js = js
        self.names = names
        self.servers = servers
        self.metrics = metrics
        self.interval = interval_seconds
        self.policy = policy
        super().__init__()
        self._previous: set[tuple[str, str]] = set()

    async def run(self) -> None:
        if not self.servers.observable:
            log.info("reconciler off: a %s server cannot be read back", self.servers.kind)
        while not await self.pause(self.interval):
            try:
                await self.sweep()
            except db.UNAVAILABLE as exc:
                self.metrics.sweeps.labels("error").inc()
                log.warning("reconcile sweep failed: %s", exc)

    async def sweep(self, dry_run: bool = False, wait_for_lock: float = 0.0) -> Drift | None:
        """One pass: observe, compare, repair (unless ``dry_run``). None when another
        replica holds the lock (after ``wait_for_lock`` seconds) or no server answered."""
        if not self.servers.observable:
            return None  # the server cannot be read back (fazer): nothing to compare
        if not any(s.available for s in self.servers.servers.values()):
            self.metrics.sweeps.labels("server_unavailable").inc()
            return None
        async with self.pool.acquire() as conn:
            lease = Lease(conn, _LEASE, self.leader_timeout)
            if not await lease.take_within(wait_for_lock):
                self.metrics.sweeps.labels("not_leader").inc()
                return None
            try:
                async with lease.kept_alive():
                    return await self._sweep_locked(dry_run, lease)
            except LeaseLost as exc:
                self.metrics.sweeps.labels("not_leader").inc()
                log.warning("reconcile sweep stopped: this replica lost its lease (%s)", exc)
                return None
            finally:
                await lease.release()

    async def _sweep_locked(self, dry_run: bool, lease: Lease) -> Drift | None:
        started = time.perf_counter()
        items: list[DriftItem] = []
        misses: dict[uuid.UUID, int] = {}
        swept = 0
        for server in self.servers.servers.values():
            if not server.available:
                log.info("reconcile skips %r: it does not answer", server.name)
                continue
            drift = await self._sweep_server(server, dry_run, lease)
            if drift is not None:
                swept += 1
                items.extend(drift.items)
                misses.update(drift.misses)
        if not swept:
            self.metrics.sweeps.labels("server_unavailable").inc()
            return None
        merged = Drift(items=items, misses=misses)
        self._count(merged)
        if not dry_run:
            self.metrics.sweeps.labels("done").inc()
            self.metrics.last_sweep.set_to_current_time()
            self.metrics.sweep_seconds.observe(time.perf_counter() - started)
        return merged

    async def _sweep_server(self, server: Server, dry_run: bool, lease: Lease) -> Drift | None:
        only = self.servers.only
        try:
            observed = await self._observe(server)
        except BaileysError as exc:
            log.warning(
                "reconcile skipped %r, the Baileys server did not answer: %s",
                server.name,
                exc.reason,
            )
            return None
        if only is not None:  # a pool of one: rows not placed are on it too
            wanted = {
                r["session_name"]: Status(r["status"])
                for r in await self.pool.fetch(WANTED)
                if (r["server"] or only.name) == server.name
            }
        else:
            wanted = {
                r["session_name"]: Status(r["status"])
                for r in await self.pool.fetch(WANTED_ON, server.name)
            }
        missed = [r["id"] for r in await self.pool.fetch(MISSED)]
        ids, seen = narrow(wanted, observed, missed)
        rows = {r["id"]: _row_view(r) for r in await self.pool.fetch(ROWS, list(ids))}
        tracked = await self.pool.fetch(
            "SELECT session_name, last_driven_at, server FROM session_deletes"
            " WHERE server IS NULL OR server = $1",
            server.name,
        )
        deleting = {r["session_name"]: r["last_driven_at"] for r in tracked}
        drift = compute(
            rows,
            seen,
            deleting,
            datetime.now(UTC),
            self.policy,
            server=server.name,
            default_server=only.name if only is not None else None,
        )
        if not dry_run:
            await lease.confirm()  # frozen since the lease was taken: another replica leads
            await self._repair(drift, rows)
            if observed.complete:
                # of unknown server (the generation's placement) only in a pool of one
                ours = [r["session_name"] for r in tracked if r["server"] or only is not None]
                await self._forget_finished_deletes(observed, ours)
        return drift

    async def _observe(self, server: Server) -> Observed:
        at = datetime.now(UTC)
        listed = await server.dialect.list_sessions()
        unreadable = listed.unreadable if isinstance(listed, SessionList) else 0
        if listed is not None and not unreadable:
            return Observed(sessions={s.name: s.state for s in listed}, at=at, complete=True)
        # No list route, or a list with items that could not be read (any of them may be a
        # wanted session: none may be judged missing from it): ask for each session that
        # should be live there, and each pending delete there, that was not listed.
        seen = {s.name: s.state for s in listed or ()}
        if unreadable:
            log.warning(
                "%r listed %d sessions it did not name readably: each wanted one is asked for",
                server.name,
                unreadable,
            )
        single = self.servers.only is not None
        names = [
            r["session_name"]
            for r in await self.pool.fetch(
                "SELECT session_name FROM connections WHERE status = ANY($1::text[])"
                " AND (server = $2 OR (server IS NULL AND $3))"
                " UNION SELECT session_name FROM session_deletes"
                " WHERE server = $2 OR (server IS NULL AND $3)",
                states.values(states.WANTED_LIVE),
                server.name,
                single,
            )
        ]
        limit = asyncio.Semaphore(_PROBE_CONCURRENCY)

        async def probe(name: str) -> tuple[str, str | None, bool]:
            async with limit:
                found = await server.dialect.get_session(name)
            return name, (found.state if found else None), found is not None

        results = await asyncio.gather(*(probe(n) for n in names if n not in seen))
        seen.update({name: state for name, state, live in results if live})
        return Observed(sessions=seen, at=at, complete=False, probed=frozenset(names) | set(seen))

    def _count(self, drift: Drift) -> None:
        by_kind = dict.fromkeys(KINDS, 0)
        for item in drift.items:
            by_kind[item.kind] += 1
            self.metrics.found.labels(item.kind).inc()
        for kind, n in by_kind.items():
            self.metrics.drift.labels(kind).set(n)
        current = {(i.kind, i.session_name) for i in drift.items}
        self.metrics.persistent.set(len(current & self._previous))
        self._previous = current
        if drift.items:
            log.info(
                "drift found",
                extra=fields(
                    **{k: v for k, v in by_kind.items() if v},
                    sessions=[f"{i.kind}:{i.session_name}" for i in drift.items[:20]],
                ),
            )

    async def _repair(self, drift: Drift, rows: dict[uuid.UUID, RowView]) -> None:
        if drift.misses:
            ids, counts = zip(*drift.misses.items(), strict=True)
            await self.pool.execute(
                # rows locked in id order, as every statement locking several does
                "UPDATE connections c SET reconcile_misses = u.n"
                " FROM unnest($1::uuid[], $2::int[]) AS u(id, n),"
                " (SELECT id FROM connections WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE) l"
                " WHERE c.id = u.id AND l.id = u.id",
                list(ids),
                list(counts),
            )
        for item in drift.items:
            done = False
            match item.kind:
                case "orphan" | "unknown" if item.action == "delete":
                    done = await self._delete(item)
                case "lost" if item.ripe and item.connection_id in rows:
                    done = await self._recover(item, rows[item.connection_id])
                case "state":
                    done = await self._report(item)
            if done:
                self.metrics.repairs.labels(item.kind).inc()
                log.info(
                    "drift repaired",
                    extra=fields(
                        kind=item.kind,
                        connection_id=str(item.connection_id),
                        generation=item.generation,
                        action=item.action,
                    ),
                )

    async def _delete(self, item: DriftItem) -> bool:
        assert item.connection_id is not None and item.generation is not None
        async with self.pool.acquire() as conn, conn.transaction():
            cmd = await queue_delete(
                conn,
                self.names,
                item.connection_id,
                item.tenant_id or uuid.UUID(int=0),
                item.generation,
                item.session_name,
                server=item.server,
            )
            if item.kind == "orphan":
                await _history(
                    conn,
                    item,
                    "reconcile.session_deleted",
                    item.row_status,
                    False,
                    item.reason,
                    cmd.command_id,
                )
        return True

    async def _recover(self, item: DriftItem, seen: RowView) -> bool:
        """Re-create a lost session (same generation) or, past the limit, fail the row."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT status, generation, reconcile_recreates FROM connections"
                " WHERE id = $1 FOR UPDATE",
                seen.id,
            )
            if row is None or row["generation"] != seen.generation or row["status"] != seen.status:
                return False  # the row moved since we looked: next sweep decides again
            give_up = row["reconcile_recreates"] >= self.policy.max_recreates
            changes: dict[str, object] = {"reconcile_misses": 0, "attempts": 0}
            if give_up:
                kind, reason = (
                    Forced.FAIL,
                    f"{LOST_REASON} ({row['reconcile_recreates']} re-creates)",
                )
                command_id = None
            else:
                kind, reason = Forced.RECREATE, LOST_REASON
                command_id = uuid.uuid4()
                cmd = CreateSession(
                    command_id=command_id,
                    connection_id=seen.id,
                    tenant_id=seen.tenant_id,
                    generation=seen.generation,
                    session_name=seen.session_name,
                    requested_at=datetime.now(UTC),
                )
                await insert_outbox(conn, self.names, cmd)
                changes |= {
                    "reconcile_recreates": Raw("reconcile_recreates + 1"),
                    "command_id": command_id,
                }
            await transition(
                conn,
                self.names,
                seen.id,
                kind,
                cause="reconcile.failed" if give_up else "reconcile.recreated",
                reason=reason,
                reason_code="session_lost",
                changes=changes,
                command_id=command_id,
            )
        return True

    async def _report(self, item: DriftItem) -> bool:
        assert item.connection_id is not None and item.generation is not None
        assert item.report is not None
        event = SessionObserved(
            event_id=uuid.uuid4(),
            connection_id=item.connection_id,
            generation=item.generation,
            occurred_at=datetime.now(UTC),
            status=item.report,
            reason=item.reason,
        )
        await jsretry.publish(
            self.js,
            self.names.event_subject(EVENT_SUBJECT_KIND[SessionObserved], event.connection_id),
            event_encoder.encode(event),
            headers={
                headers.MSG_ID: str(event.event_id),
                headers.CONNECTION_ID: str(event.connection_id),
            },
        )
        return True

    async def _forget_finished_deletes(self, observed: Observed, tracked: list[str]) -> None:
        """A tracked delete (of ``tracked``, the server's) whose session the server's complete
        list no longer shows is done."""
        gone = [name for name in tracked if name not in observed.sessions]
        if gone:
            await self.pool.execute(
                "DELETE FROM session_deletes WHERE requested_at < $1"
                " AND session_name = ANY($2::text[])",
                observed.at,
                gone,
            )


def _row_view(r: asyncpg.Record) -> RowView:
    return RowView(
        id=r["id"],
        tenant_id=r["tenant_id"],
        generation=r["generation"],
        session_name=r["session_name"],
        status=Status(r["status"]),
        updated_at=r["updated_at"],
        status_changed_at=r["status_changed_at"],
        misses=r["reconcile_misses"],
        recreates=r["reconcile_recreates"],
        held_until=r["held_until"],
        server=r["server"],
    )


async def _history(
    conn: asyncpg.Connection,
    item: DriftItem,
    event_type: str,
    to_status: str | None,
    applied: bool,
    reason: str | None,
    command_id: uuid.UUID | None,
    reason_code: str | None = None,
) -> None:
    await record(
        conn,
        item.connection_id,
        item.generation,
        event_type,
        from_status=item.row_status,
        to_status=to_status,
        applied=applied,
        reason=reason,
        command_id=command_id,
        reason_code=reason_code,
    )
