"""The gateway's Postgres queries: connections of a tenant, and the outbox row of a command."""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from proto.changes import ConnectionChanged
from proto.commands import CreateSession, DeleteSession
from proto.names import Names
from proto.states import Status
from services.gateway.models import Connection, HistoryEntry
from zapbus.outbox import change_row, command_row, insert_outbox, queue_change
from zapbus.tokens import session_name

_COLUMNS = (
    "id, name, status, status_reason, generation, session_name, qr, qr_seq, qr_expires_at,"
    " attempts, created_at, updated_at, status_changed_at"
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


def _to_connection(row: asyncpg.Record) -> Connection:
    return msgspec.convert(dict(row), Connection)


def change_of(c: Connection, cause: str) -> ConnectionChanged:
    return ConnectionChanged(
        connection_id=c.id,
        generation=c.generation,
        status=c.status,
        status_reason=c.status_reason,
        qr=c.qr,
        qr_seq=c.qr_seq,
        qr_expires_at=c.qr_expires_at,
        cause=cause,
        changed_at=c.updated_at,
    )


def request_hash(name: str) -> bytes:
    return hashlib.sha256(msgspec.json.encode({"name": name})).digest()


# One statement, so one round trip, atomic on its own: the row, its create command and its
# change notification (both into the outbox), and the first history row. A conflicting
# Idempotency-Key inserts nothing at all (every part selects FROM the empty ``c``).
_CREATE = f"""
WITH c AS (
    INSERT INTO connections (id, tenant_id, name, generation, session_name, status,
        idempotency_key, request_hash, command_id, created_at, updated_at, status_changed_at)
    VALUES ($1, $2, $3, 1, $4, 'pending', $5, $6, $7, $8, $8, $8)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING {_COLUMNS}
), command AS (
    INSERT INTO outbox (msg_id, subject, payload, headers) SELECT $9, $10, $11, $12 FROM c
), change AS (
    INSERT INTO outbox (msg_id, subject, payload, headers) SELECT $13, $14, $15, $16 FROM c
), history AS (
    INSERT INTO connection_events (event_id, connection_id, generation, event_type,
        from_status, to_status, applied, command_id, occurred_at)
    SELECT $17, c.id, 1, 'create.requested', NULL, 'pending', true, $7, $8 FROM c
)
SELECT * FROM c
"""


async def create_connection(
    pool: asyncpg.Pool,
    names: Names,
    tenant_id: uuid.UUID,
    name: str,
    idempotency_key: str | None,
) -> tuple[Connection, bool]:
    """Insert the connection and its create command atomically, in one round trip.

    Returns (connection, created); ``created`` is False when the Idempotency-Key matched an
    earlier identical request, whose connection is returned instead.
    """
    connection_id = uuid.uuid4()
    digest = request_hash(name)
    now = datetime.now(UTC)
    cmd = CreateSession(
        command_id=uuid.uuid4(),
        connection_id=connection_id,
        tenant_id=tenant_id,
        generation=1,
        session_name=session_name(connection_id, 1),
        requested_at=now,
    )
    connection = Connection(
        id=connection_id,
        name=name,
        status=Status.PENDING.value,
        status_reason=None,
        generation=1,
        session_name=cmd.session_name,
        qr=None,
        qr_seq=0,
        qr_expires_at=None,
        attempts=0,
        created_at=now,
        updated_at=now,
        status_changed_at=now,
    )
    row = await pool.fetchrow(
        _CREATE,
        connection_id,
        tenant_id,
        name,
        cmd.session_name,
        idempotency_key,
        digest,
        cmd.command_id,
        now,
        *command_row(names, cmd),
        *change_row(names, change_of(connection, "create.requested")),
        uuid.uuid4(),
    )
    if row is not None:
        return _to_connection(row), True
    existing = await pool.fetchrow(
        f"SELECT {_COLUMNS}, request_hash FROM connections"
        " WHERE tenant_id = $1 AND idempotency_key = $2",
        tenant_id,
        idempotency_key,
    )
    assert existing is not None  # the conflicting row is committed (ON CONFLICT waited)
    if existing["request_hash"] != digest:
        raise IdempotencyConflict
    record = dict(existing)
    record.pop("request_hash")
    return msgspec.convert(record, Connection), False


async def _record(
    conn: asyncpg.Connection,
    cmd: CreateSession | DeleteSession,
    event_type: str,
    from_status: Status | None,
    to_status: Status,
    reason: str | None = None,
) -> None:
    """A history row for a change the gateway itself made."""
    await conn.execute(
        "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
        " from_status, to_status, applied, reason, command_id, occurred_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, true, $7, $8, $9)",
        uuid.uuid4(),
        cmd.connection_id,
        cmd.generation,
        event_type,
        from_status.value if from_status else None,
        to_status.value,
        reason,
        cmd.command_id,
        cmd.requested_at,
    )


class ConnectionDeleted(Exception):
    """The connection was deleted; it cannot be recreated."""


async def recreate_connection(
    pool: asyncpg.Pool, names: Names, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> Connection | None:
    """Move to the next generation: a new session name, the old session deleted.

    Commands and events of the old generation are fenced from then on (the worker checks the
    generation before creating; the projector ignores other generations).
    """
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            "SELECT generation, session_name, status FROM connections"
            " WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            connection_id,
            tenant_id,
        )
        if old is None:
            return None
        if old["status"] == Status.DELETED:
            raise ConnectionDeleted
        generation = old["generation"] + 1
        create = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=generation,
            session_name=session_name(connection_id, generation),
            requested_at=now,
        )
        delete = DeleteSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=old["generation"],
            session_name=old["session_name"],
            requested_at=now,
        )
        row = await conn.fetchrow(
            f"UPDATE connections SET generation = $2, session_name = $3, status = $4,"
            f" status_reason = NULL, qr = NULL, qr_seq = 0, qr_expires_at = NULL, attempts = 0,"
            f" command_id = $5, redrives = 0, updated_at = now(), status_changed_at = now()"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            connection_id,
            generation,
            create.session_name,
            Status.PENDING.value,
            create.command_id,
        )
        await insert_outbox(conn, names, delete)
        await insert_outbox(conn, names, create)
        await _record(conn, create, "recreate.requested", Status(old["status"]), Status.PENDING)
        connection = _to_connection(row)
        await queue_change(conn, names, change_of(connection, "recreate.requested"))
        return connection


async def delete_connection(
    pool: asyncpg.Pool, names: Names, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> Connection | None:
    """Mark the connection deleted at once and queue the deletion of its Baileys session."""
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM connections WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            connection_id,
            tenant_id,
        )
        if old is None:
            return None
        if old["status"] == Status.DELETED:
            return _to_connection(old)  # deleting twice is fine
        delete = DeleteSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=old["generation"],
            session_name=old["session_name"],
            requested_at=datetime.now(UTC),
        )
        row = await conn.fetchrow(
            f"UPDATE connections SET status = $2, status_reason = 'deleted by the tenant',"
            f" qr = NULL, qr_expires_at = NULL, updated_at = now(), status_changed_at = now()"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            connection_id,
            Status.DELETED.value,
        )
        await insert_outbox(conn, names, delete)
        await _record(conn, delete, "delete.requested", Status(old["status"]), Status.DELETED)
        connection = _to_connection(row)
        await queue_change(conn, names, change_of(connection, "delete.requested"))
        return connection


async def get_connection(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> Connection | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM connections WHERE id = $1 AND tenant_id = $2",
        connection_id,
        tenant_id,
    )
    return _to_connection(row) if row else None


def encode_cursor(created_at: datetime, connection_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{connection_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Raises ValueError on a cursor this gateway did not hand out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, cid = raw.split("|", 1)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("cursor time without zone")
        return when.astimezone(UTC), uuid.UUID(cid)
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError("malformed cursor") from exc


async def list_connections(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[Connection], str | None]:
    """Newest first, keyset-paginated by (created_at, id)."""
    if cursor:
        at, cid = decode_cursor(cursor)
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM connections WHERE tenant_id = $1"
            " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4",
            tenant_id,
            at,
            cid,
            limit + 1,
        )
    else:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM connections WHERE tenant_id = $1"
            " ORDER BY created_at DESC, id DESC LIMIT $2",
            tenant_id,
            limit + 1,
        )
    items = [_to_connection(r) for r in rows[:limit]]
    more = len(rows) > limit
    return items, encode_cursor(items[-1].created_at, items[-1].id) if more and items else None


async def history(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> list[HistoryEntry] | None:
    owned = await pool.fetchval(
        "SELECT 1 FROM connections WHERE id = $1 AND tenant_id = $2", connection_id, tenant_id
    )
    if not owned:
        return None
    rows = await pool.fetch(
        "SELECT seq, generation, event_type, from_status, to_status, applied, code, reason,"
        " occurred_at, recorded_at FROM connection_events WHERE connection_id = $1 ORDER BY seq",
        connection_id,
    )
    return [msgspec.convert(dict(r), HistoryEntry) for r in rows]
