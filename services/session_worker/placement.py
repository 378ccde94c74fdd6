"""Placement: which Baileys server takes a connection generation, recorded once for good.

A new generation goes to the healthy, undrained server with the most free capacity, counting
zapbus's own placements (rows not terminal) and the server's own ``/health`` ``sessions``
figure (other apps may share it): its load is zapbus's live placements there now plus the
sessions the server held for others at its last probe (its figure less zapbus's sessions
created there then), so placements made between two probes all count. A server back after an
outage is on probation for ``rejoin_after_seconds`` and takes placements only when no other
server can. The choice goes into ``placements`` (and the row's ``server``, and history) under
one advisory lock, so concurrent creates see each other's choices; every later call for that
generation reads it back. No room anywhere: the row waits (``placement_wait_since``, the
reason in ``status_reason``) and the pool manager queues its create again when room frees.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from proto.commands import CreateSession
from proto.names import Names
from zapbus.coalesce import BatchLoader
from zapbus.connection import states
from zapbus.connection.machine import Forced
from zapbus.connection.writer import KEEP_REASON, record, transition
from zapbus.counts import PLACED_COUNTS
from zapbus.outbox import insert_outbox, queue_delete
from zapbus.servers import ServerSpec

LOCK_ID = 0x7A62706C  # "zbpl": every placement among several servers (or under a cap)
WAITING_PREFIX = "waiting for a Baileys server: "
_SERVERS = (
    "SELECT name, drained, up, sessions, sessions_ours, checked_at, up_since,"
    " create_failed_at FROM baileys_servers"
)


@dataclass(frozen=True)
class ServerView:
    """What placement knows of one configured server."""

    name: str
    drained: bool = False
    up: bool | None = None  # None: not probed (recently): assumed up
    sessions: int | None = None  # the server's own figure
    foreign: int = 0  # sessions it held for others at its last probe
    placed: int = 0  # zapbus's live placements there
    probation: bool = False  # back from an outage, or failing creates, not for long yet
    refusing: bool = False  # failed a create for good lately: no room for moves there

    def load(self) -> int:
        return self.placed + self.foreign

    def free(self, cap: int) -> float:
        return float("inf") if cap <= 0 else cap - self.load()


@dataclass(frozen=True)
class PlacementPolicy:
    max_sessions: int = 0  # 0: no cap
    rejoin_after_seconds: float = 60.0
    # health older than this is not trusted (no pool manager probing): assumed up
    stale_after_seconds: float = 30.0


def choose(
    views: list[ServerView], cap: int, failed: tuple[str, ...] = ()
) -> tuple[str | None, str]:
    """(the server to place on, "") or (None, why nothing can take it). ``views`` leaves out
    the servers in ``failed`` (they failed this create), which the reason names. Pure."""
    name, why = _choose(views, cap, bool(failed))
    if name is None and failed:
        why += f"; {', '.join(sorted(failed))} failed this create"
    return name, why


def _choose(views: list[ServerView], cap: int, others_failed: bool) -> tuple[str | None, str]:
    usable = [v for v in views if not v.drained and v.up is not False]
    for group in (
        [v for v in usable if not v.probation],
        [v for v in usable if v.probation],
    ):
        room = [v for v in group if v.free(cap) > 0]
        if room:
            best = max(room, key=lambda v: (v.free(cap), -v.load(), -v.placed, _rev(v.name)))
            return best.name, ""
    if not views:
        return None, "no other Baileys server" if others_failed else "no Baileys server"
    if all(v.drained for v in views):
        return None, f"every {'other ' if others_failed else ''}Baileys server is drained"
    down = sum(1 for v in views if v.up is False)
    drained = sum(1 for v in views if v.drained)
    others = ", ".join(
        part
        for part in (f"{down} down" if down else "", f"{drained} drained" if drained else "")
        if part
    )
    if not usable:
        return None, f"no Baileys server is reachable ({others})"
    if others:
        return None, f"every other Baileys server is at its cap of {cap} sessions ({others})"
    every = "every other" if others_failed else "every"
    return None, f"{every} Baileys server is at its cap of {cap} sessions"


def _rev(name: str) -> tuple[int, ...]:
    """Sort key that prefers the alphabetically first name under ``max``."""
    return tuple(-ord(c) for c in name)


async def pool_views(
    conn: asyncpg.Connection | asyncpg.Pool,
    specs: tuple[ServerSpec, ...],
    policy: PlacementPolicy,
    now: datetime,
    count: bool = True,
) -> list[ServerView]:
    """The configured servers as placement sees them now.

    zapbus's placements per server: the counts the triggers of migration 016 keep
    (``zapbus/counts.py``), exact as of this transaction's statement, whatever the number of
    connections; under the placement lock every placement made before is counted. ``count``
    False: left at 0 (one server with no cap: nothing to compare, so placement skips it)."""
    seen = {r["name"]: r for r in await conn.fetch(_SERVERS)}
    placed: dict[str, int] = {}
    if count:
        placed = {r["server"]: r["n"] for r in await conn.fetch(PLACED_COUNTS)}
    stale = now - timedelta(seconds=policy.stale_after_seconds)
    rejoin = now - timedelta(seconds=policy.rejoin_after_seconds)
    views = []
    for spec in specs:
        row = seen.get(spec.name)
        fresh = row is not None and row["checked_at"] is not None and row["checked_at"] > stale
        views.append(
            ServerView(
                name=spec.name,
                drained=bool(row and row["drained"]),
                up=row["up"] if fresh and row is not None else None,
                sessions=row["sessions"] if fresh and row is not None else None,
                foreign=_foreign(row) if fresh and row is not None else 0,
                placed=placed.get(spec.name, 0),
                refusing=bool(
                    row is not None and row["create_failed_at"] and row["create_failed_at"] > rejoin
                ),
                # back from an outage, or failing creates lately: only if nothing else can
                probation=bool(
                    row is not None
                    and (
                        (fresh and row["up_since"] and row["up_since"] > rejoin)
                        or (row["create_failed_at"] and row["create_failed_at"] > rejoin)
                    )
                ),
            )
        )
    return views


def _foreign(row: asyncpg.Record) -> int:
    """The server's sessions at its last probe that were not zapbus's."""
    if row["sessions"] is None:
        return 0
    return max(0, int(row["sessions"]) - int(row["sessions_ours"] or 0))


@dataclass(frozen=True)
class Placed:
    server: str
    new: bool  # placed by this call (else read back)


@dataclass(frozen=True)
class Waiting:
    reason: str


class Gone:
    """The row is no longer this generation's (nothing to place)."""


# The row locked with what placement reads of it, in one round trip. The placement read here
# uses the statement's snapshot: one a copy made while this waited for the row lock is not
# seen, and the INSERT below finds it instead (ON CONFLICT), so it is still read back.
_CLAIM = """
SELECT c.generation, c.status, c.placement_wait_since, c.placement_excluded, now() AS now,
    (SELECT server FROM placements p WHERE p.connection_id = c.id AND p.generation = $2)
    AS placed
FROM connections c WHERE c.id = $1 FOR UPDATE
"""
# The placement, the row's server and the history row, in one statement: nothing is written
# to the row or history when the placement existed already (a copy placed it).
_RECORD = """
WITH placed AS (
    INSERT INTO placements (connection_id, generation, server) VALUES ($1, $2, $3)
    ON CONFLICT (connection_id, generation) DO NOTHING RETURNING server
), moved AS (
    UPDATE connections SET server = $3, placement_wait_since = NULL,
        placement_requeued_at = NULL,
        status_reason = CASE WHEN status_reason LIKE $4 THEN NULL ELSE status_reason END,
        version = version + 1
    WHERE id = $1 AND EXISTS (SELECT FROM placed)
), told AS (
    INSERT INTO connection_events (event_id, connection_id, generation, event_type,
        from_status, to_status, applied, reason, command_id, occurred_at, server)
    SELECT $5, $1, $2, 'placement.assigned', $6, $6, false, $7, $8, now(), $3
    WHERE EXISTS (SELECT FROM placed)
)
SELECT EXISTS (SELECT FROM placed)
"""


# One server with no cap: nothing to choose between, so the placements asked for together (a
# burst's creates, one turn of the worker's event loop) are one statement (no transaction of
# several round trips, no round trip each): the rows locked in id order (as every statement
# here that locks several rows locks them, so no two deadlock), each placed on the server unless
# it is drained or (freshly probed) down or excluded for that generation, as ``choose`` would
# decide. A row another transaction holds is skipped, not waited for (``{lock}`` is SKIP LOCKED
# for a batch): one slow row must not hold up, or time out, the placements of the whole burst;
# it is placed on its own afterwards, waiting for its lock like the one-row statement did. The
# lock is NO KEY UPDATE, what the UPDATE takes anyway: it does not conflict with the key-share
# locks that inserting a row's history takes (nor skip those rows).
# Per asked (id, generation): the row's generation (NULL: no row, or skipped), whether it was
# skipped, and whether it was placed now (false: placed before by a copy, or not placeable now,
# which ``place`` then tells the slow way).
_PLACE_ON_THE_ONLY_SERVER = """
WITH asked AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::uuid[])
        AS a(id, generation, command_id, event_id)
), c AS (
    SELECT id, generation, status, placement_excluded FROM connections
    WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE {lock}
), usable AS (
    SELECT a.id, a.generation, a.command_id, a.event_id, c.status FROM asked a JOIN c USING (id)
    WHERE c.generation = a.generation AND NOT ($5 = ANY(coalesce(c.placement_excluded, '{{}}')))
    AND NOT EXISTS (
        SELECT FROM baileys_servers b WHERE b.name = $5
        AND (b.drained OR (b.up IS FALSE AND b.checked_at > now() - make_interval(secs => $6)))
    )
), placed AS (
    INSERT INTO placements (connection_id, generation, server)
    SELECT id, generation, $5 FROM usable
    ON CONFLICT (connection_id, generation) DO NOTHING RETURNING connection_id, generation
), moved AS (
    UPDATE connections SET server = $5, placement_wait_since = NULL,
        placement_requeued_at = NULL,
        status_reason = CASE WHEN status_reason LIKE $7 THEN NULL ELSE status_reason END,
        version = version + 1
    WHERE id IN (SELECT connection_id FROM placed)
), told AS (
    INSERT INTO connection_events (event_id, connection_id, generation, event_type,
        from_status, to_status, applied, reason, command_id, occurred_at, server)
    SELECT u.event_id, u.id, u.generation, 'placement.assigned', u.status, u.status, false,
        $8, u.command_id, now(), $5
    FROM usable u WHERE (u.id, u.generation) IN (SELECT connection_id, generation FROM placed)
)
SELECT a.id, a.generation AS asked, c.generation,
    c.id IS NULL AND EXISTS (SELECT FROM connections x WHERE x.id = a.id) AS skipped,
    (a.id, a.generation) IN (SELECT connection_id, generation FROM placed) AS placed
FROM asked a LEFT JOIN c USING (id)
"""
_PLACE_SKIPPING_LOCKED = _PLACE_ON_THE_ONLY_SERVER.format(lock="SKIP LOCKED")
_PLACE_WAITING_FOR_LOCKS = _PLACE_ON_THE_ONLY_SERVER.format(lock="")

_Ask = tuple[uuid.UUID, int, uuid.UUID]  # (connection id, generation, command id)
_Answer = tuple[int | None, bool]  # (the row's generation or None, placed now by this ask)


class OnlyServerPlacements:
    """Placements on a pool's only server (no cap), batched: the asks of one turn of the
    event loop are one statement (``_PLACE_ON_THE_ONLY_SERVER``). ``place`` takes one; without
    it each placement is a statement of its own (the same statement, for one)."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 1000) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._loaders: dict[tuple[str, float], BatchLoader[_Ask, _Answer | None]] = {}

    async def place(self, ask: _Ask, server: str, stale_after_seconds: float) -> _Answer:
        key = (server, stale_after_seconds)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._loaders[key] = BatchLoader(
                lambda asks: _place_on_only_server(self.pool, asks, server, stale_after_seconds),
                max_batch=self.max_batch,
            )
        answer = await loader.get(ask)
        if answer is None:  # its row was held by another transaction: alone, waiting for it
            return await _place_one_on_only_server(self.pool, ask, server, stale_after_seconds)
        return answer


async def _place_one_on_only_server(
    pool: asyncpg.Pool, ask: _Ask, server: str, stale_after_seconds: float
) -> _Answer:
    """One ask, waiting for its row's lock (a single ask is never skipped)."""
    answer = (await _place_on_only_server(pool, [ask], server, stale_after_seconds))[ask]
    assert answer is not None
    return answer


async def _place_on_only_server(
    pool: asyncpg.Pool, asks: list[_Ask], server: str, stale_after_seconds: float
) -> dict[_Ask, _Answer | None]:
    """Each ask's answer; None for one whose row another transaction held (a batch skips
    those). Of copies of one command asking together (same connection and generation) the
    first is placed; the others find it placed, as they would one by one."""
    first: dict[tuple[uuid.UUID, int], _Ask] = {}
    for ask in asks:
        first.setdefault((ask[0], ask[1]), ask)
    unique = list(first.values())
    statement = _PLACE_SKIPPING_LOCKED if len(unique) > 1 else _PLACE_WAITING_FOR_LOCKS
    answers: dict[tuple[uuid.UUID, int], _Answer | None] = {
        (r["id"], r["asked"]): None if r["skipped"] else (r["generation"], r["placed"])
        for r in await _run(pool, statement, unique, server, stale_after_seconds)
    }
    out: dict[_Ask, _Answer | None] = {}
    for ask in asks:
        answer = answers[ask[0], ask[1]]
        out[ask] = answer if answer is None or first[ask[0], ask[1]] == ask else (answer[0], False)
    return out


async def _run(
    pool: asyncpg.Pool, statement: str, asks: list[_Ask], server: str, stale_after_seconds: float
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        statement,
        [a[0] for a in asks],
        [a[1] for a in asks],
        [a[2] for a in asks],
        [uuid.uuid4() for _ in asks],
        server,
        stale_after_seconds,
        WAITING_PREFIX + "%",
        f"placed on {server}",
    )
    return rows


async def place(
    pool: asyncpg.Pool,
    cmd: CreateSession,
    specs: tuple[ServerSpec, ...],
    policy: PlacementPolicy,
    batch: OnlyServerPlacements | None = None,
) -> Placed | Waiting | Gone:
    """The generation's server: read back if placed, else chosen and recorded now.

    A new placement on the only server (no cap) is one statement, shared by the placements
    asked for together through ``batch`` (the worker's); among several servers, or
    with a cap, five round trips (BEGIN, the row locked with its placement, the servers'
    view, one statement recording it, COMMIT). It cost eleven, which the 1,000-session burst
    paid a thousand times over in the worker and in Postgres."""
    # the choice depends on the others' placements: one at a time (one server with no cap
    # has nothing to count, and a burst need not queue on the lock)
    compare = len(specs) > 1 or policy.max_sessions > 0
    if not compare and specs:
        (only,) = specs
        stale = policy.stale_after_seconds
        ask = (cmd.connection_id, cmd.generation, cmd.command_id)
        if batch is None:
            answer = await _place_one_on_only_server(pool, ask, only.name, stale)
        else:
            answer = await batch.place(ask, only.name, stale)
        generation, placed_now = answer
        if generation != cmd.generation:
            return Gone()
        if placed_now:
            return Placed(only.name, new=True)
        found = await server_of(pool, cmd.connection_id, cmd.generation)
        if found is not None:
            return Placed(found, new=False)
        # not placeable now (drained, down, excluded): the slow way records why it waits
    async with pool.acquire() as conn, conn.transaction():
        if compare:
            found = await server_of(conn, cmd.connection_id, cmd.generation)
            if found is not None:
                return Placed(found, new=False)  # before queueing on the lock
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        row = await conn.fetchrow(_CLAIM, cmd.connection_id, cmd.generation)
        if row is None or row["generation"] != cmd.generation:
            return Gone()
        if row["placed"] is not None:
            return Placed(str(row["placed"]), new=False)
        excluded = set(row["placement_excluded"] or ())
        views = [
            v
            for v in await pool_views(conn, specs, policy, row["now"], count=compare)
            if v.name not in excluded
        ]
        name, why = choose(views, policy.max_sessions, tuple(excluded))
        if name is None:
            reason = WAITING_PREFIX + why
            await conn.execute(
                "UPDATE connections SET placement_wait_since = coalesce(placement_wait_since,"
                " now()), status_reason = $2, updated_at = now(), version = version + 1"
                " WHERE id = $1",
                cmd.connection_id,
                reason,
            )
            if row["placement_wait_since"] is None:
                await _history(conn, cmd, "placement.waiting", row["status"], None, reason)
            return Waiting(reason)
        new = await conn.fetchval(
            _RECORD,
            cmd.connection_id,
            cmd.generation,
            name,
            WAITING_PREFIX + "%",
            uuid.uuid4(),
            row["status"],
            f"placed on {name}",
            cmd.command_id,
        )
        if not new:  # placed by a copy while we waited for the row
            found = await server_of(conn, cmd.connection_id, cmd.generation)
            assert found is not None
            return Placed(found, new=False)
        return Placed(name, new=True)


async def place_elsewhere(
    pool: asyncpg.Pool,
    names: Names,
    cmd: CreateSession,
    server: str,
    specs: tuple[ServerSpec, ...],
    reason: str,
    refused: bool = False,
) -> bool:
    """The generation's create failed on ``server`` for good: place it anew, on another
    server (one it has not failed on), with its create queued again; a delete of whatever
    that server may hold under the name is queued for it, unless the server ``refused`` the
    create (a permanent error: it made no session). False when the row moved on or every
    server has failed this generation (it then fails as a single server would)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT generation, status, status_reason, reason_code, placement_excluded,"
            " phone_number FROM connections WHERE id = $1 FOR UPDATE",
            cmd.connection_id,
        )
        if row is None or row["generation"] != cmd.generation:
            return False
        if row["status"] not in states.AWAITING_CREATE:
            return False
        excluded = sorted(set(row["placement_excluded"] or ()) | {server})
        if all(s.name in excluded for s in specs):
            return False
        await conn.execute(
            "DELETE FROM placements WHERE connection_id = $1 AND generation = $2",
            cmd.connection_id,
            cmd.generation,
        )
        # Back to pending: no server is creating it now; it waits to be placed (and, with no
        # room anywhere, says so there like any create waiting for room).
        await transition(
            conn,
            names,
            cmd.connection_id,
            Forced.RERUN,
            cause="placement.failed",
            reason=KEEP_REASON,
            changes={"server": None, "placement_excluded": excluded},
            note=f"create failed on {server} ({reason}): placed again on another server",
            command_id=cmd.command_id,
            server=server,
        )
        await conn.execute(
            "UPDATE baileys_servers SET create_failed_at = now() WHERE name = $1", server
        )
        if not refused:  # attempts that timed out may have made it after all
            await queue_delete(
                conn,
                names,
                cmd.connection_id,
                cmd.tenant_id,
                cmd.generation,
                cmd.session_name,
                row["phone_number"],
                server=server,
            )
        again = msgspec.structs.replace(cmd, requested_at=datetime.now(UTC))
        await insert_outbox(
            conn, names, again, msg_id=f"{cmd.command_id}:elsewhere:{uuid.uuid4().hex}"
        )
        return True


async def server_of(
    conn: asyncpg.Connection | asyncpg.Pool, connection_id: uuid.UUID, generation: int
) -> str | None:
    """Where a generation was placed (None: never placed)."""
    value = await conn.fetchval(
        "SELECT server FROM placements WHERE connection_id = $1 AND generation = $2",
        connection_id,
        generation,
    )
    return str(value) if value is not None else None


async def _history(
    conn: asyncpg.Connection,
    cmd: CreateSession,
    event_type: str,
    status: str,
    server: str | None,
    reason: str,
) -> None:
    """A history row of a placement that moves no state."""
    await record(
        conn,
        cmd.connection_id,
        cmd.generation,
        event_type,
        from_status=status,
        to_status=status,
        applied=False,
        reason=reason,
        command_id=cmd.command_id,
        server=server,
    )
