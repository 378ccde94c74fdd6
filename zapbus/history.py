"""History rows written outside the projector: one place for the shape of ``connection_events``.

The projector writes its rows in bulk (``services/projector/store.py``); the gateway, the
worker's placement, the pool manager's moves, the reconciler, the watchdog and ``zapbus dlq
replay`` each record what they did to a connection through ``record``, inside the
transaction that did it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

_INSERT = """
INSERT INTO connection_events (event_id, connection_id, generation, event_type, from_status,
    to_status, applied, reason, command_id, occurred_at, reason_code, server)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, now()), $11, $12)
"""


async def record(
    conn: asyncpg.Connection,
    connection_id: uuid.UUID | None,
    generation: int | None,
    event_type: str,
    *,
    from_status: str | None,
    to_status: str | None,
    applied: bool,
    reason: str | None = None,
    command_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
    reason_code: str | None = None,
    server: str | None = None,
) -> None:
    """One history row (``occurred_at`` None: the transaction's time)."""
    await conn.execute(
        _INSERT,
        uuid.uuid4(),
        connection_id,
        generation,
        event_type,
        from_status,
        to_status,
        applied,
        reason,
        command_id,
        occurred_at,
        reason_code,
        server,
    )
