"""The gateway's read queries: a tenant's connections, one connection, its history."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from services.gateway.models import Connection, HistoryEntry
from zapbus.connection.writer import SHOWN

COLUMNS = SHOWN  # the row as the API shows it


def to_connection(row: Mapping[str, Any]) -> Connection:
    fields = dict(row)
    phone, name = fields.pop("account_phone", None), fields.pop("account_name", None)
    if phone or name:
        fields["account"] = {"phone": phone, "name": name}
    return msgspec.convert(fields, Connection)


async def get_connection(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, connection_id: uuid.UUID
) -> Connection | None:
    row = await pool.fetchrow(
        f"SELECT {COLUMNS} FROM connections WHERE id = $1 AND tenant_id = $2",
        connection_id,
        tenant_id,
    )
    return to_connection(row) if row else None


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
            f"SELECT {COLUMNS} FROM connections WHERE tenant_id = $1"
            " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4",
            tenant_id,
            at,
            cid,
            limit + 1,
        )
    else:
        rows = await pool.fetch(
            f"SELECT {COLUMNS} FROM connections WHERE tenant_id = $1"
            " ORDER BY created_at DESC, id DESC LIMIT $2",
            tenant_id,
            limit + 1,
        )
    items = [to_connection(r) for r in rows[:limit]]
    more = len(rows) > limit
    return items, encode_cursor(items[-1].created_at, items[-1].id) if more and items else None


def encode_seq_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq|{seq}".encode()).decode().rstrip("=")


def decode_seq_cursor(cursor: str) -> int:
    """Raises ValueError on a cursor this gateway did not hand out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, number = raw.partition("|")
        if kind != "seq" or not (number.isascii() and number.isdigit()) or len(number) > 18:
            raise ValueError("not a history cursor")
        return int(number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("malformed cursor") from exc


async def history(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    connection_id: uuid.UUID,
    limit: int,
    cursor: str | None,
) -> tuple[list[HistoryEntry], str | None] | None:
    """Oldest first, keyset-paginated by seq; None if the tenant has no such connection.
    Raises ValueError on a bad cursor."""
    after = decode_seq_cursor(cursor) if cursor else 0
    owned = await pool.fetchval(
        "SELECT 1 FROM connections WHERE id = $1 AND tenant_id = $2", connection_id, tenant_id
    )
    if not owned:
        return None
    rows = await pool.fetch(
        "SELECT seq, generation, event_type, from_status, to_status, applied, code, reason,"
        " occurred_at, recorded_at, reason_code, server FROM connection_events"
        " WHERE connection_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        connection_id,
        after,
        limit + 1,
    )
    items = [msgspec.convert(dict(r), HistoryEntry) for r in rows[:limit]]
    more = len(rows) > limit
    return items, encode_seq_cursor(items[-1].seq) if more and items else None
