"""The one writer of a connection's status (zapbus/connection/writer.py), against Postgres:
each forced move updates the row, bumps its version, writes one history row and queues one
change, in the caller's transaction; a move the graph does not allow raises and writes
nothing."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from proto.changes import ConnectionChanged, change_decoder
from services.gateway.lifecycle import create_connection
from zapbus.config import Settings
from zapbus.connection.machine import Forced, IllegalTransition
from zapbus.connection.writer import transition
from zapbus.tenants import create_tenant


async def _changes(pool: asyncpg.Pool, connection_id: uuid.UUID) -> list[ConnectionChanged]:
    rows = await pool.fetch("SELECT payload FROM outbox WHERE msg_id LIKE 'chg:%' ORDER BY id")
    found = [change_decoder.decode(r["payload"]) for r in rows]
    return [c for c in found if c.connection_id == connection_id]


async def _history(pool: asyncpg.Pool, connection_id: uuid.UUID) -> list[tuple[object, ...]]:
    rows = await pool.fetch(
        "SELECT event_type, from_status, to_status, applied, reason, reason_code"
        " FROM connection_events WHERE connection_id = $1 ORDER BY seq",
        connection_id,
    )
    return [tuple(r) for r in rows]


async def test_a_forced_move_writes_row_version_history_and_change_or_nothing(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    names = settings.names
    tenant, _ = await create_tenant(pool, "writer")
    created, _ = await create_connection(pool, names, tenant.id, "w", None)
    cid = created.id

    async with pool.acquire() as conn, conn.transaction():
        row = await transition(
            conn,
            names,
            cid,
            Forced.FAIL,
            cause="watchdog.timeout",
            reason="timeout: no progress",
            reason_code="timeout",
        )
    assert (row["status"], row["version"], row["reason_code"]) == ("failed", 2, "timeout")

    # failed is terminal: failing it again is not a move the graph allows; nothing is written
    async with pool.acquire() as conn:
        with pytest.raises(IllegalTransition):
            async with conn.transaction():
                await transition(conn, names, cid, Forced.FAIL, cause="watchdog.timeout")

    async with pool.acquire() as conn, conn.transaction():
        row = await transition(
            conn,
            names,
            cid,
            Forced.RERUN,
            cause="dlq.replayed",
            changes={"attempts": 0},
            note="replayed",
        )
    # the re-run clears the failure's reason and reason code
    assert (row["status"], row["version"], row["status_reason"], row["reason_code"]) == (
        "pending",
        3,
        None,
        None,
    )

    changes = await _changes(pool, cid)
    assert [(c.cause, c.previous_status, c.status, c.version, c.reason_code) for c in changes] == [
        ("create.requested", None, "pending", 1, None),
        ("watchdog.timeout", "pending", "failed", 2, "timeout"),
        ("dlq.replayed", "failed", "pending", 3, None),
    ]
    assert await _history(pool, cid) == [
        ("create.requested", None, "pending", True, None, None),
        ("watchdog.timeout", "pending", "failed", True, "timeout: no progress", "timeout"),
        ("dlq.replayed", "failed", "pending", True, "replayed", None),
    ]
