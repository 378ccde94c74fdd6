"""The gateway's Postgres queries: connections of a tenant, and the outbox row of a command."""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from proto import headers
from proto.commands import CreateSession, command_encoder
from proto.names import Names
from proto.states import Status
from services.gateway.models import Connection, HistoryEntry
from zapbus.tokens import session_name

_COLUMNS = (
    "id, name, status, status_reason, generation, session_name, qr, qr_seq, qr_expires_at,"
    " attempts, created_at, updated_at, status_changed_at"
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


def _to_connection(row: asyncpg.Record) -> Connection:
    return msgspec.convert(dict(row), Connection)


def request_hash(name: str) -> bytes:
    return hashlib.sha256(msgspec.json.encode({"name": name})).digest()


async def insert_outbox(conn: asyncpg.Connection, names: Names, cmd: CreateSession) -> None:
    await conn.execute(
        "INSERT INTO outbox (msg_id, subject, payload, headers) VALUES ($1, $2, $3, $4)",
        str(cmd.command_id),
        names.command_subject(cmd.kind),
        command_encoder.encode(cmd),
        msgspec.json.encode(
            {headers.COMMAND_ID: str(cmd.command_id), headers.CONNECTION_ID: str(cmd.connection_id)}
        ).decode(),
    )


async def create_connection(
    pool: asyncpg.Pool,
    names: Names,
    tenant_id: uuid.UUID,
    name: str,
    idempotency_key: str | None,
) -> tuple[Connection, bool]:
    """Insert the connection and its create command in one transaction.

    Returns (connection, created); ``created`` is False when the Idempotency-Key matched an
    earlier identical request, whose connection is returned instead.
    """
    connection_id = uuid.uuid4()
    digest = request_hash(name)
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO connections (id, tenant_id, name, generation, session_name, status,"
            f" idempotency_key, request_hash) VALUES ($1, $2, $3, 1, $4, $5, $6, $7)"
            f" ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
            connection_id, tenant_id, name, session_name(connection_id, 1),
            Status.PENDING.value, idempotency_key, digest,
        )  # fmt: skip
        if row is None:
            existing = await conn.fetchrow(
                f"SELECT {_COLUMNS}, request_hash FROM connections"
                " WHERE tenant_id = $1 AND idempotency_key = $2",
                tenant_id, idempotency_key,
            )  # fmt: skip
            assert existing is not None
            if existing["request_hash"] != digest:
                raise IdempotencyConflict
            record = dict(existing)
            record.pop("request_hash")
            return msgspec.convert(record, Connection), False
        cmd = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=1,
            session_name=row["session_name"],
            requested_at=now,
        )
        await insert_outbox(conn, names, cmd)
        await conn.execute(
            "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
            " from_status, to_status, applied, command_id, occurred_at)"
            " VALUES ($1, $2, 1, 'create.requested', NULL, 'pending', true, $3, $4)",
            uuid.uuid4(), connection_id, cmd.command_id, now,
        )  # fmt: skip
        return _to_connection(row), True


async def get_connection(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> Connection | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM connections WHERE id = $1 AND tenant_id = $2",
        connection_id, tenant_id,
    )  # fmt: skip
    return _to_connection(row) if row else None


def encode_cursor(created_at: datetime, connection_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{connection_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Raises ValueError on a cursor this gateway did not hand out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, cid = raw.split("|", 1)
        return datetime.fromisoformat(at), uuid.UUID(cid)
    except (ValueError, UnicodeDecodeError) as exc:
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
            tenant_id, at, cid, limit + 1,
        )  # fmt: skip
    else:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM connections WHERE tenant_id = $1"
            " ORDER BY created_at DESC, id DESC LIMIT $2",
            tenant_id, limit + 1,
        )  # fmt: skip
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
