"""The pool manager: health, failover, drain --move and the creates waiting for room.

A loop in every session worker. Each tick every replica reads ``baileys_servers`` (so its
calls skip a server the probes see down) and exports the pool's gauges; one replica at a
time (a lease: a Postgres advisory lock that Postgres takes back from a replica frozen for
``leader_timeout_seconds``, ``zapbus/leases.py``; its writes go through the lease's
connection, so a replica that wakes up after losing it writes nothing) also

* asks every server's health (``GET /health`` or the dialect's route) every
  ``baileys_health_interval_seconds``: two failed probes in a row mark it down (since the
  first), one answer marks it up (on probation for ``baileys_rejoin_after_seconds`` after an
  outage);
* fails over: the connections of a server down for ``baileys_failover_after_seconds`` are
  moved to the others (``moves.py``), at most ``baileys_failover_per_second``;
* drains with ``--move``: one connection at a time, the next only once the previous one is
  live again elsewhere (``qr_ready``, ``code_ready``, ``pairing``, ``connected``, or ended);
* queues again, oldest first, the creates waiting for room, as many as there is room for;
* folds the changes of the connection counts (``zapbus/counts.py``) into the counts.

Nothing in a tick counts every connection: each server's placements come from the counts,
the creates not placed yet and the waiting ones from partial indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto.commands import CreateSession
from proto.names import Names
from services.session_worker.moves import move_connection
from services.session_worker.placement import PlacementPolicy, pool_views
from services.session_worker.server_pool import Server, ServerPool
from zapbus import db
from zapbus.connection import states
from zapbus.connection.states import TERMINAL, Status
from zapbus.counts import COUNTS, FOLD, PLACED_COUNTS
from zapbus.httpkit import LATENCY_BUCKETS
from zapbus.leases import DEFAULT_TIMEOUT_SECONDS, Lease, LeaseLost
from zapbus.logs import fields
from zapbus.outbox import insert_outbox
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.pool")

_LEASE = "zapbus.pool_manager"
_REQUEUE_AFTER_SECONDS = 15.0
# placed and not ended, as the partial index connections_placed (a literal list: the planner
# matches it to the index's predicate)
_PLACED = f"status NOT IN {states.sql_list(TERMINAL)}"
# creates waiting for room, along the partial index connections_waiting
WAITING = (
    "SELECT count(*) FROM connections WHERE placement_wait_since IS NOT NULL"
    " AND status = ANY($1::text[])"
)
# creates not placed yet, read along the partial index connections_live_status
UNPLACED = (
    "SELECT count(*) FROM connections WHERE server IS NULL"
    f" AND status IN {states.sql_list(states.AWAITING_CREATE)}"
)


class ServerPoolMetrics:
    def __init__(self, registry: CollectorRegistry, names: list[str]) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["server"], registry=registry)

        self.up = gauge("zapbus_baileys_server_up", "1 while the server answers its health check.")
        self.sessions = gauge(
            "zapbus_baileys_server_sessions",
            "Sessions the server says it holds (/health; -1: it does not say, or is down).",
        )
        self.placements = gauge(
            "zapbus_baileys_server_placements",
            "Live connections zapbus placed on the server (its load for placement).",
        )
        self.drained = gauge("zapbus_baileys_server_drained", "1 while the server is drained.")
        self.info = Gauge(
            "zapbus_baileys_server_info",
            "Each configured Baileys server (always 1), with its URL (without credentials).",
            ["server", "url"],
            registry=registry,
        )
        self.max_sessions = Gauge(
            "zapbus_baileys_server_max_sessions",
            "Sessions per server at most (ZAPBUS_BAILEYS_MAX_SESSIONS; 0: no cap).",
            registry=registry,
        )
        self.waiting = Gauge(
            "zapbus_pool_waiting_creates",
            "Creates waiting for room on a Baileys server (every server full, drained or down).",
            registry=registry,
        )
        self.moves = Counter(
            "zapbus_pool_moves_total",
            "Connections moved off a server, by server and why (failover, drain).",
            ["server", "why"],
            registry=registry,
        )
        self.requeued = Counter(
            "zapbus_pool_requeued_creates_total",
            "Waiting creates queued again as room freed.",
            registry=registry,
        )
        self.tick = Histogram(
            "zapbus_pool_tick_seconds",
            "Time of one pool manager tick (leading or not; probes included when due).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for name in names:
            for why in ("failover", "drain"):
                self.moves.labels(name, why)


@dataclass
class _Health:
    failures: int = 0
    first_failure: datetime | None = None


class ServerPoolManager(Stoppable):
    def __init__(
        self,
        pool: asyncpg.Pool,
        names: Names,
        servers: ServerPool,
        metrics: ServerPoolMetrics,
        policy: PlacementPolicy,
        health_interval_seconds: float,
        failover_after_seconds: float,
        failover_per_second: float,
        tick_seconds: float = 1.0,
        leader_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.pool = pool
        self.names = names
        self.servers = servers
        self.metrics = metrics
        self.policy = policy
        self.health_interval = health_interval_seconds
        self.failover_after = timedelta(seconds=failover_after_seconds)
        self.rate = failover_per_second
        self.tick = min(tick_seconds, health_interval_seconds)
        # a token bucket of a second's moves, holding one at least: a rate below 1 (0.5: one
        # move every 2 s) must still fill to one move
        self._burst = max(1.0, failover_per_second)
        self._tokens = self._burst
        self._room = 0.0
        self._no_room_logged: dict[str, float] = {}
        self.leader_timeout = leader_timeout_seconds
        self._leader: Lease | None = None  # held while leading
        self._pings = contextlib.AsyncExitStack()  # its kept_alive() while leading
        self._health: dict[str, _Health] = {s: _Health() for s in servers.servers}
        self._last_probe = float("-inf")
        super().__init__()
        metrics.max_sessions.set(policy.max_sessions)
        for spec in servers.specs:
            metrics.info.labels(spec.name, spec.public_url).set(1)

    async def run(self) -> None:
        try:
            while not self.stopping:
                started = time.perf_counter()
                try:
                    await self.step()
                except (*db.UNAVAILABLE, LeaseLost) as exc:
                    log.warning("pool manager step failed: %s", exc)
                self.metrics.tick.observe(time.perf_counter() - started)
                await self.pause(self.tick)
        finally:
            await self._step_down()

    async def step(self) -> None:
        """One tick: lead if no other replica does, then mirror the table. Leadership is
        kept from tick to tick (the lock is held on a connection of its own), so one replica
        counts probe failures and spends the failover rate, not each in turn."""
        if self._leader is None:
            conn = await self.pool.acquire()
            lease = Lease(conn, _LEASE, self.leader_timeout)
            try:
                won = await lease.take()
            except BaseException:
                await self.pool.release(conn)
                raise
            if won:
                self._leader = lease
                # pinged between ticks (and while probes run): only a frozen replica idles
                # long enough for Postgres to end the lease's session
                self._pings = contextlib.AsyncExitStack()
                await self._pings.enter_async_context(lease.kept_alive())
                log.info("pool manager leads: probes, failover, drains, waiting creates")
            else:
                await self.pool.release(conn)
        if self._leader is not None:
            try:
                async with self._leader.session() as conn:
                    await self._lead(conn)
            except (*db.UNAVAILABLE, LeaseLost):
                await self._step_down()  # its lock may be gone with its connection
                raise
        await self._mirror()

    async def _step_down(self) -> None:
        lease, self._leader = self._leader, None
        if lease is None:
            return
        await self._pings.aclose()
        await lease.release()
        with contextlib.suppress(*db.UNAVAILABLE):
            await self.pool.release(lease.conn)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        self._tokens = min(self._burst, self._tokens + self.rate * self.tick)
        if loop.time() - self._last_probe >= self.health_interval:
            self._last_probe = loop.time()
            await self._probe_all(conn)
        await conn.execute(FOLD)  # the counts' changes since the last tick
        now: datetime = await conn.fetchval("SELECT now()")
        self._room = await self._room_elsewhere(conn, now)
        await self._fail_over(conn, now)
        await self._drain_moves(conn)
        await self._requeue_waiting(conn, now)

    async def _probe_all(self, conn: asyncpg.Connection) -> None:
        specs = self.servers.specs
        await conn.executemany(
            "INSERT INTO baileys_servers (name, url) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET url = excluded.url",
            [(s.name, s.public_url) for s in specs],
        )
        # A server taken out of ZAPBUS_BAILEYS_URLS while connections are placed on it can no
        # longer be called: it counts as unreachable (since it left), so they fail over.
        gone = await conn.fetch(
            "UPDATE baileys_servers SET up = false, checked_at = now(), updated_at = now(),"
            " down_since = coalesce(down_since, now()) WHERE NOT (name = ANY($1::text[]))"
            " AND up IS DISTINCT FROM false RETURNING name",
            [s.name for s in specs],
        )
        for row in gone:
            log.warning(
                "Baileys server %r is no longer configured: its connections fail over",
                row["name"],
            )
        results = await asyncio.gather(*(self._probe(s) for s in self.servers.servers.values()))
        now: datetime = await conn.fetchval("SELECT now()")
        for server, (up, sessions) in zip(self.servers.servers.values(), results, strict=True):
            seen = self._health[server.name]
            if up:
                seen.failures, seen.first_failure = 0, None
                await conn.execute(
                    "UPDATE baileys_servers SET up_since = CASE WHEN up IS false"
                    " THEN now() ELSE up_since END, up = true, sessions = $2,"
                    f" sessions_ours = (SELECT coalesce(sum(n), 0) FROM {COUNTS} c"
                    " WHERE server = $1 AND status = ANY($3::text[])),"
                    " checked_at = now(), down_since = NULL, updated_at = now()"
                    " WHERE name = $1",
                    server.name,
                    sessions,
                    states.values(states.WANTED_LIVE),  # its create went through
                )
                continue
            seen.failures += 1
            seen.first_failure = seen.first_failure or now
            if seen.failures < 2:
                await conn.execute(
                    "UPDATE baileys_servers SET checked_at = now() WHERE name = $1", server.name
                )
                continue
            changed = await conn.fetchval(
                "UPDATE baileys_servers SET up = false, checked_at = now(), updated_at = now(),"
                " down_since = coalesce(down_since, $2) WHERE name = $1"
                " RETURNING up IS DISTINCT FROM true",
                server.name,
                seen.first_failure,
            )
            if changed and seen.failures == 2:
                log.warning("Baileys server %r does not answer its health check", server.name)

    async def _probe(self, server: Server) -> tuple[bool, int | None]:
        try:
            async with asyncio.timeout(max(1.0, min(5.0, self.health_interval))):
                health = await server.dialect.health()
        except TimeoutError:
            return False, None
        except Exception as exc:  # a dialect's unexpected error is a failed probe
            log.debug("health probe of %r failed: %r", server.name, exc)
            return False, None
        return health.up, health.sessions

    async def _room_elsewhere(self, conn: asyncpg.Connection, now: datetime) -> float:
        """How many connections the servers that take placements can still take, less the
        creates not placed yet: a move is made only where the moved connection can go (a
        move with nowhere to go would end a session, maybe linked, for nothing)."""
        views = await pool_views(conn, self.servers.specs, self.policy, now)
        room = sum(
            max(0.0, v.free(self.policy.max_sessions))
            for v in views
            if not v.drained and v.up is not False and not v.refusing
        )
        unplaced = await conn.fetchval(UNPLACED)
        return float(room - unplaced)

    def _take_room(self, server: str, why: str) -> bool:
        """One move's worth of rate and room; False (logged once a minute) without room."""
        if self._tokens < 1:
            return False
        if self._room < 1:
            loop = asyncio.get_running_loop()
            if loop.time() - self._no_room_logged.get(server, float("-inf")) > 60:
                self._no_room_logged[server] = loop.time()
                log.warning(
                    "cannot move connections off %r (%s): no other server has room", server, why
                )
            return False
        self._tokens -= 1
        self._room -= 1
        return True

    async def _fail_over(self, conn: asyncpg.Connection, now: datetime) -> None:
        lost = await conn.fetch(
            "SELECT name, down_since FROM baileys_servers WHERE up IS false"
            " AND down_since <= $1 ORDER BY name",
            now - self.failover_after,
        )
        for server in lost:
            budget = int(min(self._tokens, self._room))
            if budget < 1:
                left = await conn.fetchval(
                    f"SELECT count(*) FROM connections WHERE server = $1 AND {_PLACED}",
                    server["name"],
                )
                if left:
                    self._take_room(server["name"], "unreachable")  # logs why nothing moves
                return
            rows = await conn.fetch(
                f"SELECT id FROM connections WHERE server = $1 AND {_PLACED}"
                " ORDER BY status = $3, created_at LIMIT $2",  # the linked ones last
                server["name"],
                budget,
                Status.CONNECTED.value,
            )
            down_for = int((now - server["down_since"]).total_seconds())
            for row in rows:
                if not self._take_room(server["name"], "unreachable"):
                    return
                moved = await move_connection(
                    conn,
                    self.names,
                    row["id"],
                    server["name"],
                    "server_lost",
                    f"Baileys server {server['name']!r} unreachable for {down_for} s:"
                    " moved to another server; link it again",
                )
                if moved is not None:
                    self.metrics.moves.labels(server["name"], "failover").inc()
                    log.warning(
                        "connection failed over",
                        extra=fields(
                            connection_id=str(row["id"]), generation=moved, server=server["name"]
                        ),
                    )

    async def _drain_moves(self, conn: asyncpg.Connection) -> None:
        draining = await conn.fetch("SELECT name, moving FROM baileys_servers WHERE move")
        for server in draining:
            name, moving = server["name"], server["moving"]
            if moving is not None:
                row = await conn.fetchrow(
                    "SELECT status, server FROM connections WHERE id = $1", moving
                )
                if row is not None and row["status"] not in TERMINAL | states.LIVE_AGAIN:
                    continue  # the one being moved is not live elsewhere yet
                if row is not None and row["server"] == name and row["status"] not in TERMINAL:
                    continue  # not moved yet (the move did not happen)
            nxt = await conn.fetchval(
                f"SELECT id FROM connections WHERE server = $1 AND {_PLACED}"
                " ORDER BY status = $2, created_at, id LIMIT 1",  # the linked ones last
                name,
                Status.CONNECTED.value,
            )
            if nxt is None:
                await conn.execute(
                    "UPDATE baileys_servers SET move = false, moving = NULL, updated_at = now()"
                    " WHERE name = $1",
                    name,
                )
                log.info("Baileys server %r drained: no connection left on it", name)
                continue
            if not self._take_room(name, "drained"):
                continue
            moved = await move_connection(
                conn,
                self.names,
                nxt,
                name,
                "server_drained",
                f"Baileys server {name!r} drained: moved to another server; link it again",
            )
            await conn.execute(
                "UPDATE baileys_servers SET moving = $2, updated_at = now() WHERE name = $1",
                name,
                nxt,
            )
            if moved is not None:
                self.metrics.moves.labels(name, "drain").inc()
                log.info(
                    "connection moved off a drained server",
                    extra=fields(connection_id=str(nxt), generation=moved, server=name),
                )

    async def _requeue_waiting(self, conn: asyncpg.Connection, now: datetime) -> None:
        # rows locked in id order, as every statement that locks several does (the worker's
        # batched placements too), so no two of them deadlock
        await conn.execute(
            "UPDATE connections c SET placement_wait_since = NULL, placement_requeued_at = NULL"
            " FROM (SELECT id FROM connections WHERE placement_wait_since IS NOT NULL"
            " AND NOT (status = ANY($1::text[])) ORDER BY id FOR UPDATE) l WHERE c.id = l.id",
            states.values(states.AWAITING_CREATE),
        )
        views = await pool_views(conn, self.servers.specs, self.policy, now)
        usable = [v for v in views if not v.drained and v.up is not False]
        room = sum(max(0.0, v.free(self.policy.max_sessions)) for v in usable)
        if room < 1:
            return
        rows = await conn.fetch(
            "SELECT id, tenant_id, generation, session_name, command_id, login, phone_number"
            " FROM connections WHERE placement_wait_since IS NOT NULL"
            " AND status = ANY($3::text[])"
            " AND (placement_requeued_at IS NULL OR placement_requeued_at < $1)"
            " ORDER BY placement_wait_since, id LIMIT $2",
            now - timedelta(seconds=_REQUEUE_AFTER_SECONDS),
            int(min(room, 500)),
            states.values(states.AWAITING_CREATE),
        )
        for row in rows:
            async with conn.transaction():
                cmd = CreateSession(
                    command_id=row["command_id"] or uuid.uuid4(),
                    connection_id=row["id"],
                    tenant_id=row["tenant_id"],
                    generation=row["generation"],
                    session_name=row["session_name"],
                    requested_at=now,
                    login=row["login"],
                    phone_number=row["phone_number"],
                )
                await insert_outbox(
                    conn, self.names, cmd, msg_id=f"{cmd.command_id}:requeue:{uuid.uuid4().hex}"
                )
                await conn.execute(
                    "UPDATE connections SET placement_requeued_at = now() WHERE id = $1",
                    row["id"],
                )
            self.metrics.requeued.inc()

    async def _mirror(self) -> None:
        """This replica's view of the table: which servers to skip, and the gauges."""
        rows = await self.pool.fetch(
            "SELECT name, up, drained, sessions, down_since, checked_at, now() AS now"
            " FROM baileys_servers"
        )
        placed = {r["server"]: r["n"] for r in await self.pool.fetch(PLACED_COUNTS)}
        loop = asyncio.get_running_loop()
        seen = {r["name"]: r for r in rows}
        stale = timedelta(seconds=self.policy.stale_after_seconds)
        for name, server in self.servers.servers.items():
            row = seen.get(name)
            fresh = row is not None and row["checked_at"] and row["now"] - row["checked_at"] < stale
            if fresh and row is not None and row["up"] is False and row["down_since"]:
                ago = (row["now"] - row["down_since"]).total_seconds()
                server.down_since = loop.time() - ago
            else:
                server.down_since = None
            self.metrics.up.labels(name).set(0 if server.down_since is not None else 1)
            sessions = row["sessions"] if row is not None and row["up"] else None
            self.metrics.sessions.labels(name).set(-1 if sessions is None else sessions)
            self.metrics.placements.labels(name).set(placed.get(name, 0))
            self.metrics.drained.labels(name).set(1 if row is not None and row["drained"] else 0)
        self.metrics.waiting.set(
            await self.pool.fetchval(WAITING, states.values(states.AWAITING_CREATE))
        )
