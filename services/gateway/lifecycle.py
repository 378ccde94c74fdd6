"""The gateway's writes: create, recreate and delete, each with its commands in the outbox.

Every write is one transaction (create: one statement) holding the row change, the commands
for the session worker, the change notification for live updates and the history row.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from proto.commands import CreateSession, DeleteSession, RequestPairingCode
from proto.names import Names
from services.gateway.models import Connection
from services.gateway.store import COLUMNS as _COLUMNS
from services.gateway.store import to_connection as _to_connection
from zapbus.connection import states
from zapbus.connection.machine import Forced, force
from zapbus.connection.states import Status
from zapbus.connection.writer import change_from, record, transition
from zapbus.outbox import change_row, command_row, insert_outbox
from zapbus.tokens import session_name


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class PhoneInUse(Exception):
    """A live connection of the tenant already uses the phone number, on a server that holds
    one connection per phone (a second would silently take the first one's over)."""

    def __init__(self, connection_id: uuid.UUID) -> None:
        super().__init__(str(connection_id))
        self.connection_id = connection_id


async def _check_phone_free(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    phone_number: str,
    connection_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
) -> None:
    """Raise PhoneInUse when another live connection of the tenant uses ``phone_number``.

    Takes a transaction-scoped lock on (tenant, phone) first, so two creates for one phone in
    parallel are checked one after the other: the second sees the first's committed row. The
    connection being recreated (``connection_id``) and the one an identical earlier create made
    (same ``idempotency_key``) are not in the way.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"zapbus:phone:{tenant_id}:{phone_number}",
    )
    holder = await conn.fetchval(
        "SELECT id FROM connections WHERE phone_number = $1 AND tenant_id = $2"
        " AND status = ANY($3::text[]) AND id IS DISTINCT FROM $4"
        " AND ($5::text IS NULL OR idempotency_key IS DISTINCT FROM $5) LIMIT 1",
        phone_number,
        tenant_id,
        states.values(states.LIVE),
        connection_id,
        idempotency_key,
    )
    if holder is not None:
        raise PhoneInUse(holder)


def request_hash(name: str, login: str = "qr", phone_number: str | None = None) -> bytes:
    request: dict[str, str] = {"name": name}
    if login != "qr" or phone_number is not None:
        request |= {"login": login, "phone_number": phone_number or ""}
    return hashlib.sha256(msgspec.json.encode(request)).digest()


# One statement, so one round trip, atomic on its own: the row, its create command and its
# change notification (both into the outbox), and the first history row. A conflicting
# Idempotency-Key inserts nothing at all (every part selects FROM the empty ``c``).
_CREATE = f"""
WITH c AS (
    INSERT INTO connections (id, tenant_id, name, generation, session_name, status,
        idempotency_key, request_hash, command_id, created_at, updated_at, status_changed_at,
        login, phone_number)
    VALUES ($1, $2, $3, 1, $4, $20, $5, $6, $7, $8, $8, $8, $18, $19)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING {_COLUMNS}
), command AS (
    INSERT INTO outbox (msg_id, subject, payload, headers) SELECT $9, $10, $11, $12 FROM c
), change AS (
    INSERT INTO outbox (msg_id, subject, payload, headers) SELECT $13, $14, $15, $16 FROM c
), history AS (
    INSERT INTO connection_events (event_id, connection_id, generation, event_type,
        from_status, to_status, applied, command_id, occurred_at)
    SELECT $17, c.id, 1, 'create.requested', NULL, c.status, true, $7, $8 FROM c
)
SELECT * FROM c
"""


async def create_connection(
    pool: asyncpg.Pool,
    names: Names,
    tenant_id: uuid.UUID,
    name: str,
    idempotency_key: str | None,
    login: str = "qr",
    phone_number: str | None = None,
    one_per_phone: bool = False,
) -> tuple[Connection, bool]:
    """Insert the connection and its create command atomically, in one round trip.

    Returns (connection, created); ``created`` is False when the Idempotency-Key matched an
    earlier identical request, whose connection is returned instead. ``one_per_phone`` (a
    server keyed by phone number): PhoneInUse when a live connection of the tenant uses the
    phone (checked under a lock, in the insert's transaction).
    """
    status = force(None, Forced.CREATE).status  # a new row: pending
    connection_id = uuid.uuid4()
    digest = request_hash(name, login, phone_number)
    now = datetime.now(UTC)
    cmd = CreateSession(
        command_id=uuid.uuid4(),
        connection_id=connection_id,
        tenant_id=tenant_id,
        generation=1,
        session_name=session_name(connection_id, 1),
        requested_at=now,
        login=login,
        phone_number=phone_number,
    )
    connection = Connection(
        id=connection_id,
        name=name,
        status=status.value,
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
        login=login,
        phone_number=phone_number,
        version=1,  # the column's default: the row's first version
    )
    args = (
        connection_id,
        tenant_id,
        name,
        cmd.session_name,
        idempotency_key,
        digest,
        cmd.command_id,
        now,
        *command_row(names, cmd),
        *change_row(names, change_from(msgspec.structs.asdict(connection), "create.requested")),
        uuid.uuid4(),
        login,
        phone_number,
        status.value,
    )
    if one_per_phone and phone_number is not None:
        async with pool.acquire() as conn, conn.transaction():
            await _check_phone_free(conn, tenant_id, phone_number, None, idempotency_key)
            row = await conn.fetchrow(_CREATE, *args)
    else:
        row = await pool.fetchrow(_CREATE, *args)
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
    return _to_connection(record), False


def _delete_command(
    tenant_id: uuid.UUID, connection_id: uuid.UUID, old: asyncpg.Record, now: datetime
) -> DeleteSession:
    """The command that removes the Baileys session of the row's current generation."""
    return DeleteSession(
        command_id=uuid.uuid4(),
        connection_id=connection_id,
        tenant_id=tenant_id,
        generation=old["generation"],
        session_name=old["session_name"],
        requested_at=now,
        phone_number=old["phone_number"],
        server=old["server"],
    )


class ConnectionDeleted(Exception):
    """The connection was deleted; it cannot be recreated."""


class PhoneNumberRequired(Exception):
    """Code login without a phone number."""


class CodeNotAvailable(Exception):
    """No pairing code can be asked for now (with the row's status, or "not code login")."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class TooSoon(Exception):
    """A new pairing code was asked for too recently (with seconds to wait)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


async def request_pairing_code(
    pool: asyncpg.Pool,
    names: Names,
    tenant_id: uuid.UUID,
    connection_id: uuid.UUID,
    min_interval_seconds: float,
) -> Connection | None:
    """Queue a request for a new pairing code (code login only, while not linked yet);
    at most one per ``min_interval_seconds``."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS}, tenant_id, pairing_code_requested_at,"
            " now() - pairing_code_requested_at AS since FROM connections"
            " WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            connection_id,
            tenant_id,
        )
        if row is None:
            return None
        if row["login"] != "code" or not row["phone_number"]:
            raise CodeNotAvailable(row["status"], "this connection links by QR code")
        if row["status"] not in states.CODE_ASKABLE:
            raise CodeNotAvailable(row["status"], f"no code can be asked for in {row['status']}")
        since = row["since"]
        if since is not None and since.total_seconds() < min_interval_seconds:
            raise TooSoon(max(1, int(min_interval_seconds - since.total_seconds()) + 1))
        cmd = RequestPairingCode(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=row["generation"],
            session_name=row["session_name"],
            requested_at=datetime.now(UTC),
            phone_number=row["phone_number"],
        )
        await conn.execute(
            "UPDATE connections SET pairing_code_requested_at = now() WHERE id = $1",
            connection_id,
        )
        await insert_outbox(conn, names, cmd)
        await record(
            conn,
            connection_id,
            row["generation"],
            "pairing_code.requested",
            from_status=row["status"],
            to_status=row["status"],
            applied=False,
            command_id=cmd.command_id,
        )
        shown = dict(row)
        for extra in ("tenant_id", "pairing_code_requested_at", "since"):
            shown.pop(extra)
        return _to_connection(shown)


async def recreate_connection(
    pool: asyncpg.Pool,
    names: Names,
    tenant_id: uuid.UUID,
    connection_id: uuid.UUID,
    login: str | None = None,
    phone_number: str | None = None,
    one_per_phone: bool = False,
) -> Connection | None:
    """Move to the next generation: a new session name, the old session deleted.
    ``one_per_phone``: as in ``create_connection`` (PhoneNumberRequired without a phone).

    Commands and events of the old generation are fenced from then on (the worker checks the
    generation before creating; the projector ignores other generations).
    """
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            "SELECT generation, session_name, status, login, phone_number, server"
            " FROM connections WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            connection_id,
            tenant_id,
        )
        if old is None:
            return None
        if old["status"] == Status.DELETED:
            raise ConnectionDeleted
        generation = old["generation"] + 1
        login = login or old["login"]
        phone_number = phone_number or old["phone_number"]
        if (login == "code" or one_per_phone) and not phone_number:
            raise PhoneNumberRequired
        if one_per_phone and phone_number:
            await _check_phone_free(conn, tenant_id, phone_number, connection_id)
        create = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=connection_id,
            tenant_id=tenant_id,
            generation=generation,
            session_name=session_name(connection_id, generation),
            requested_at=now,
            login=login,
            phone_number=phone_number,
        )
        delete = _delete_command(tenant_id, connection_id, old, now)
        await insert_outbox(conn, names, delete)
        await insert_outbox(conn, names, create)
        row = await transition(
            conn,
            names,
            connection_id,
            Forced.RESTART,
            cause="recreate.requested",
            changes={
                "generation": generation,
                "session_name": create.session_name,
                "qr_seq": 0,
                "attempts": 0,
                "command_id": create.command_id,
                "redrives": 0,
                "reconcile_misses": 0,
                "reconcile_recreates": 0,
                "login": login,
                "phone_number": phone_number,
                "pairing_code_requested_at": None,
                "server": None,
                "placement_excluded": None,
            },
            command_id=create.command_id,
            occurred_at=now,
        )
        return _to_connection(row)


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
        delete = _delete_command(tenant_id, connection_id, old, datetime.now(UTC))
        await insert_outbox(conn, names, delete)
        row = await transition(
            conn,
            names,
            connection_id,
            Forced.DELETE,
            cause="delete.requested",
            reason="deleted by the tenant",
            note=None,
            command_id=delete.command_id,
            occurred_at=delete.requested_at,
        )
        return _to_connection(row)
