"""A fleet of connections at rest, bulk-loaded into a benchmark's schema.

``load(conn, n, servers)`` inserts ``n`` connection rows of one tenant with one statement
(``generate_series``), in the shares of ``MIX`` (about two thirds live, mostly linked; a third
ended), spread round robin over ``servers``, each placed (``placements``) and with three history
rows, as a fleet that has run for a while looks. Nothing in it is stuck or drifting: the live
rows' sessions are what the stand-in servers are told to hold (``sessions``). Then VACUUM
ANALYZE, as autovacuum would have done on a fleet at rest.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

import asyncpg

from zapbus.connection.states import AWAITING_CREATE, WANTED_LIVE, Status

# per thousand connections
MIX: dict[Status, int] = {
    Status.CONNECTED: 600,
    Status.QR_READY: 30,
    Status.AWAITING_QR: 10,
    Status.CODE_READY: 5,
    Status.PAIRING: 5,
    Status.RECONNECTING: 20,
    Status.PENDING: 5,
    Status.CREATING: 5,
    Status.DELETED: 180,
    Status.FAILED: 60,
    Status.LOGGED_OUT: 50,
    Status.QR_EXPIRED: 25,
    Status.CONFLICT: 5,
}
HISTORY_PER_CONNECTION = 3
# what the stand-in says of a wanted session, by the row's state (none contradicts it)
SERVER_WORD = {Status.CONNECTED: "connected"}


def _wheel() -> list[str]:
    wheel = [s.value for s, per in MIX.items() for _ in range(per)]
    assert len(wheel) == 1000, len(wheel)
    return wheel


async def load(conn: asyncpg.Connection, n: int, servers: list[str]) -> uuid.UUID:
    """``n`` connections of a new tenant (its id) over ``servers``; VACUUM ANALYZE."""
    tenant: uuid.UUID = await conn.fetchval(
        "INSERT INTO tenants (id, name, api_key_hash) VALUES (gen_random_uuid(),"
        " 'fleet-' || gen_random_uuid(), sha256(gen_random_uuid()::text::bytea)) RETURNING id"
    )
    # row i: state wheel[(i * 7919) % 1000] (a prime stride mixes states across servers),
    # server servers[i % len] (pending: not placed yet)
    await conn.execute(
        """
        INSERT INTO connections (id, tenant_id, name, generation, session_name, status, server,
            qr_seq, command_id, created_at, updated_at, status_changed_at, last_event_at)
        SELECT g.id, $1, 'c' || g.i, 1, 'zb_' || replace(g.id::text, '-', '') || '_g1', g.status,
            CASE WHEN g.status = $4 THEN NULL
                 ELSE ($3::text[])[1 + g.i % array_length($3::text[], 1)] END,
            CASE WHEN g.status = ANY($5::text[]) THEN 0 ELSE 1 END,
            gen_random_uuid(), now() - make_interval(days => g.i % 90), now(), now(), now()
        FROM (SELECT i, gen_random_uuid() AS id, ($2::text[])[1 + (i * 7919) % 1000] AS status
              FROM generate_series(1, $6) i) g
        """,
        tenant,
        _wheel(),
        servers,
        Status.PENDING.value,  # not placed yet
        sorted(s.value for s in AWAITING_CREATE | {Status.AWAITING_QR}),  # no QR yet
        n,
    )
    await conn.execute(
        "INSERT INTO placements (connection_id, generation, server)"
        " SELECT id, 1, server FROM connections WHERE tenant_id = $1 AND server IS NOT NULL",
        tenant,
    )
    await conn.execute(
        """
        INSERT INTO connection_events (event_id, connection_id, generation, event_type,
            from_status, to_status, applied, occurred_at)
        SELECT gen_random_uuid(), c.id, 1, 'status.reported', c.status, c.status, true,
            c.created_at + make_interval(secs => e)
        FROM connections c, generate_series(1, $2) e WHERE c.tenant_id = $1
        """,
        tenant,
        HISTORY_PER_CONNECTION,
    )
    for table in ("tenants", "connections", "placements", "connection_events"):
        await conn.execute(f"VACUUM ANALYZE {table}")
    return tenant


async def sessions(conn: asyncpg.Connection) -> dict[str, list[tuple[str, str | None]]]:
    """What each server holds at rest: the sessions of the live rows placed on it."""
    held: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for r in await conn.fetch(
        "SELECT server, session_name, status FROM connections"
        " WHERE server IS NOT NULL AND status = ANY($1::text[])",
        sorted(s.value for s in WANTED_LIVE),
    ):
        held[r["server"]].append((r["session_name"], SERVER_WORD.get(Status(r["status"]))))
    return dict(held)
