"""Moving a connection off its Baileys server: the next generation, placed anew.

A session's WhatsApp link (its Signal keys) lives on the server that holds it and cannot be
copied to another, so a moved connection is linked again: the row goes back to ``pending`` as
a new generation (new session name) with ``reason_code`` ``server_lost`` (failover) or
``server_drained`` (drain --move), its create is queued and placed on another server, and the
old session's delete is queued for the old server (deferred while that server does not
answer; the reconciler deletes it when it comes back). One transaction per connection.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from proto.commands import CreateSession
from proto.names import Names
from zapbus import history
from zapbus.outbox import insert_outbox, queue_delete, queue_row_change
from zapbus.tokens import session_name

ENDED = ("deleted", "failed", "logged_out", "qr_expired", "conflict")


async def move_connection(
    conn: asyncpg.Connection,
    names: Names,
    connection_id: uuid.UUID,
    server: str,
    reason_code: str,
    reason: str,
) -> int | None:
    """Re-place the connection if it is still live on ``server``; its new generation, or
    None when it no longer is (moved, deleted or ended meanwhile). Runs on ``conn`` (the pool
    manager's lease connection: a replica that lost its lease moves nothing)."""
    async with conn.transaction():
        old = await conn.fetchrow(
            "SELECT tenant_id, generation, session_name, status, login, phone_number, server"
            " FROM connections WHERE id = $1 FOR UPDATE",
            connection_id,
        )
        if old is None or old["server"] != server or old["status"] in ENDED:
            return None
        generation = old["generation"] + 1
        create = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=old["tenant_id"],
            generation=generation,
            session_name=session_name(connection_id, generation),
            requested_at=datetime.now(UTC),
            login=old["login"],
            phone_number=old["phone_number"],
        )
        await conn.execute(
            "UPDATE connections SET generation = $2, session_name = $3, status = 'pending',"
            " status_reason = $4, reason_code = $5, server = NULL, qr = NULL, qr_seq = 0,"
            " qr_expires_at = NULL, attempts = 0, command_id = $6, redrives = 0,"
            " reconcile_misses = 0, reconcile_recreates = 0, pairing_code = NULL,"
            " pairing_code_expires_at = NULL, pairing_code_requested_at = NULL,"
            " placement_wait_since = NULL, placement_requeued_at = NULL,"
            " placement_excluded = NULL,"
            " updated_at = now(), status_changed_at = now(), version = version + 1"
            " WHERE id = $1",
            connection_id,
            generation,
            create.session_name,
            reason,
            reason_code,
            create.command_id,
        )
        await queue_delete(
            conn,
            names,
            connection_id,
            old["tenant_id"],
            old["generation"],
            old["session_name"],
            old["phone_number"],
            server=server,
        )
        await insert_outbox(conn, names, create)
        event = "failover.moved" if reason_code == "server_lost" else "drain.moved"
        await history.record(
            conn,
            connection_id,
            generation,
            event,
            from_status=old["status"],
            to_status="pending",
            applied=True,
            reason=reason,
            command_id=create.command_id,
            reason_code=reason_code,
            server=server,
        )
        await queue_row_change(conn, names, connection_id, event, old["status"])
        return int(generation)
