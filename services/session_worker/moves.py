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
from zapbus.connection.machine import Forced
from zapbus.connection.states import TERMINAL
from zapbus.connection.writer import transition
from zapbus.outbox import insert_outbox, queue_delete
from zapbus.tokens import session_name


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
        if old is None or old["server"] != server or old["status"] in TERMINAL:
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
        await transition(
            conn,
            names,
            connection_id,
            Forced.RESTART,
            cause="failover.moved" if reason_code == "server_lost" else "drain.moved",
            reason=reason,
            reason_code=reason_code,
            changes={
                "generation": generation,
                "session_name": create.session_name,
                "server": None,
                "qr_seq": 0,
                "attempts": 0,
                "command_id": create.command_id,
                "redrives": 0,
                "reconcile_misses": 0,
                "reconcile_recreates": 0,
                "pairing_code_requested_at": None,
                "placement_wait_since": None,
                "placement_requeued_at": None,
                "placement_excluded": None,
            },
            command_id=create.command_id,
            server=server,
        )
        return int(generation)
