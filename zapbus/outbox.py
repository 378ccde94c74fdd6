"""Writing to the transactional outbox (relayed to JetStream by ``zapbus/relay.py``).

An outbox row is (msg_id, subject, payload, headers); ``msg_id`` becomes the JetStream
``Nats-Msg-Id``. The ``*_row`` functions build the values, so a caller can also insert them
inside a larger statement (the gateway's single-statement create).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from proto import headers
from proto.changes import ConnectionChanged, change_encoder
from proto.commands import Command, DeleteSession, command_encoder
from proto.names import Names

OutboxRow = tuple[str, str, bytes, str]

_INSERT = "INSERT INTO outbox (msg_id, subject, payload, headers) VALUES ($1, $2, $3, $4)"


def command_row(names: Names, cmd: Command, msg_id: str | None = None) -> OutboxRow:
    """``msg_id`` defaults to the command id. The watchdog passes a fresh one when it
    re-drives a command, so JetStream's duplicate window cannot swallow the re-drive, while
    the command itself keeps its id."""
    hdrs = {headers.COMMAND_ID: str(cmd.command_id), headers.CONNECTION_ID: str(cmd.connection_id)}
    return (
        msg_id or str(cmd.command_id),
        names.command_subject(cmd.kind),
        command_encoder.encode(cmd),
        msgspec.json.encode(hdrs).decode(),
    )


def change_row(names: Names, change: ConnectionChanged) -> OutboxRow:
    return (
        f"chg:{uuid.uuid4()}",
        names.change_subject(change.connection_id),
        change_encoder.encode(change),
        msgspec.json.encode({headers.CONNECTION_ID: str(change.connection_id)}).decode(),
    )


_TRACK_DELETE = """
INSERT INTO session_deletes (session_name, connection_id, generation, command_id, phone_number,
    server)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (session_name) DO UPDATE SET command_id = excluded.command_id, last_driven_at = now(),
    phone_number = coalesce(excluded.phone_number, session_deletes.phone_number),
    server = coalesce(excluded.server, session_deletes.server)
"""


async def insert_outbox(
    conn: asyncpg.Connection, names: Names, cmd: Command, msg_id: str | None = None
) -> bool:
    """Queue ``cmd`` in the caller's transaction; False if that message id is queued already.

    A delete is also tracked in ``session_deletes`` until the worker reports the session gone,
    so the watchdog can re-drive it and the reconciler can check it: whatever happens to the
    command on the bus, a session zapbus wants gone is not forgotten.
    """
    done = await conn.execute(
        _INSERT + " ON CONFLICT (msg_id) DO NOTHING", *command_row(names, cmd, msg_id)
    )
    if isinstance(cmd, DeleteSession):
        await conn.execute(
            _TRACK_DELETE,
            cmd.session_name,
            cmd.connection_id,
            cmd.generation,
            cmd.command_id,
            cmd.phone_number,
            cmd.server,
        )
    return bool(done.endswith(" 1"))


async def queue_delete(
    conn: asyncpg.Connection,
    names: Names,
    connection_id: uuid.UUID,
    tenant_id: uuid.UUID,
    generation: int,
    session: str,
    phone_number: str | None = None,
    server: str | None = None,
) -> DeleteSession:
    """Queue the deletion of one generation's session (a fresh command) in the caller's tx;
    ``server``: the Baileys server holding it (None: where the generation was placed)."""
    cmd = DeleteSession(
        command_id=uuid.uuid4(),
        connection_id=connection_id,
        tenant_id=tenant_id,
        generation=generation,
        session_name=session,
        requested_at=datetime.now(UTC),
        phone_number=phone_number,
        server=server,
    )
    await insert_outbox(conn, names, cmd)
    return cmd


async def queue_change(conn: asyncpg.Connection, names: Names, change: ConnectionChanged) -> None:
    """Queue a connection-change snapshot (for live updates) in the caller's transaction."""
    await conn.execute(_INSERT, *change_row(names, change))


async def untrack_delete(pool: asyncpg.Pool, session: str) -> None:
    """The session is gone or wanted again: its delete needs no re-drive."""
    await pool.execute("DELETE FROM session_deletes WHERE session_name = $1", session)
