"""The one writer of a connection's status: row, version, history and change, together.

Every change of a connection's state is written here, in the caller's transaction:

* ``transition`` for the moves the system forces (the gateway's recreate and delete, the
  watchdog's time-out, the reconciler's re-create or give-up, a move to another server, a
  placement that failed, a dead letter replayed): checked by ``machine.force``, it updates the
  row (the state, what the caller passes, cleared QR and code), bumps its ``version``, writes
  the history row and queues the change (with ``previous_status``) in the outbox;
* ``write_folded`` for the projector's batches, whose rows ``machine.apply`` computed: one
  statement per table for the whole batch (the projector's hot path);
* ``record`` for a history row that changes no state (a re-drive, a placement, a session
  removed ...), and ``change_from`` for the snapshot of a row (a create, an SSE snapshot).

Nothing else writes ``connections.status`` (tests/test_boundaries.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from proto import headers
from proto.changes import ConnectionChanged, change_encoder
from proto.names import Names
from zapbus.connection.machine import Forced, Row, force
from zapbus.connection.states import Status
from zapbus.outbox import queue_change

# The row as the API shows it (and the change is built from).
SHOWN = (
    "id, name, status, status_reason, generation, session_name, qr, qr_seq, qr_expires_at,"
    " attempts, created_at, updated_at, status_changed_at, login, phone_number, pairing_code,"
    " pairing_code_expires_at, reason_code, account_phone, account_name, server, version"
)


class Raw(str):
    """An SQL expression for a column, instead of a value (``Raw("status_reason")`` keeps it,
    ``Raw("reconcile_recreates + 1")``); only code writes these, never input."""


KEEP_REASON = Raw("status_reason")


class _Same:
    """The history row's reason is the row's new ``status_reason``."""


SAME = _Same()

_COLUMN = re.compile(r"^[a-z_]+$")
# What a forced move sets itself (the caller may not pass these).
_OWN = frozenset(
    {
        "status",
        "status_reason",
        "reason_code",
        "qr",
        "qr_expires_at",
        "pairing_code",
        "pairing_code_expires_at",
        "updated_at",
        "status_changed_at",
        "version",
    }
)


class NoSuchConnection(Exception):
    """The row to move is gone (the caller checked it under its lock: a bug)."""


async def transition(
    conn: asyncpg.Connection,
    names: Names,
    connection_id: uuid.UUID,
    kind: Forced,
    *,
    cause: str,
    reason: str | Raw | None = None,
    reason_code: str | None = None,
    changes: Mapping[str, object] | None = None,
    note: str | _Same | None = SAME,
    command_id: uuid.UUID | None = None,
    server: str | None = None,
    occurred_at: datetime | None = None,
) -> asyncpg.Record:
    """Force ``kind`` on the connection, in the caller's transaction; the row as left
    (``SHOWN``). ``reason``: the new ``status_reason`` (``KEEP_REASON`` keeps it);
    ``changes``: other columns to set (values, or ``Raw`` expressions); ``note``: the
    history row's reason (default: the new ``status_reason``); ``cause``: the history event
    type and the change's cause. Raises IllegalTransition when the graph does not allow the move."""
    current = await conn.fetchrow(
        "SELECT status, reason_code FROM connections WHERE id = $1 FOR UPDATE", connection_id
    )
    if current is None:
        raise NoSuchConnection(str(connection_id))
    previous = Status(current["status"])
    move = force(previous, kind, reason_code, current["reason_code"])
    args: list[object] = [connection_id, move.status.value, move.reason_code]
    sets = [
        "status = $2",
        "reason_code = $3",
        "qr = NULL",
        "qr_expires_at = NULL",
        "pairing_code = NULL",
        "pairing_code_expires_at = NULL",
        "updated_at = now()",
        "status_changed_at = now()",
        "version = version + 1",
    ]
    for column, value in [("status_reason", reason), *(changes or {}).items()]:
        if not _COLUMN.match(column) or (column in _OWN and column != "status_reason"):
            raise ValueError(f"a transition does not set {column!r} that way")
        if isinstance(value, Raw):
            sets.append(f"{column} = {value}")
        else:
            args.append(value)
            sets.append(f"{column} = ${len(args)}")
    row = await conn.fetchrow(
        f"UPDATE connections SET {', '.join(sets)} WHERE id = $1 RETURNING {SHOWN}", *args
    )
    assert row is not None  # locked above
    await record(
        conn,
        connection_id,
        row["generation"],
        cause,
        from_status=previous.value,
        to_status=move.status.value,
        applied=True,
        reason=row["status_reason"] if isinstance(note, _Same) else note,
        command_id=command_id,
        occurred_at=occurred_at,
        reason_code=move.reason_code,
        server=server,
    )
    await queue_change(conn, names, change_from(row, cause, previous.value))
    return row


def change_from(
    row: Mapping[str, Any], cause: str, previous_status: str | None = None
) -> ConnectionChanged:
    """The change snapshot of a row as ``SHOWN`` reads it (or the gateway's connection as a
    dict); ``previous_status``: its status before (None: a create, or a snapshot)."""
    return ConnectionChanged(
        connection_id=row["id"],
        generation=row["generation"],
        status=row["status"],
        status_reason=row["status_reason"],
        qr=row["qr"],
        qr_seq=row["qr_seq"],
        qr_expires_at=row["qr_expires_at"],
        cause=cause,
        changed_at=row["updated_at"],
        pairing_code=row["pairing_code"],
        pairing_code_expires_at=row["pairing_code_expires_at"],
        reason_code=row["reason_code"],
        previous_status=previous_status,
        server=row["server"],
        version=row["version"],
    )


# -- history -----------------------------------------------------------------------------------

_INSERT_HISTORY = """
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
    """One history row (``occurred_at`` None: the transaction's time): what the system did to
    a connection without moving its state (a move is recorded by ``transition``)."""
    await conn.execute(
        _INSERT_HISTORY,
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


# -- the projector's batches -------------------------------------------------------------------

# One statement per batch for each table (arrays unnested), not one per row: half the
# projector's database time went into executemany's per-row round of messages.
_FOLDED = """
UPDATE connections AS c SET status = u.status, status_reason = u.reason, qr = u.qr,
    qr_seq = u.qr_seq, qr_expires_at = u.qr_expires_at, attempts = u.attempts,
    last_event_at = u.at, updated_at = now(), pairing_code = u.code,
    pairing_code_expires_at = u.code_expires_at, reason_code = u.reason_code,
    conflicts = u.conflicts, conflicts_since = u.conflicts_since,
    account_phone = u.account_phone, account_name = u.account_name,
    status_changed_at = CASE WHEN c.status <> u.status THEN now() ELSE c.status_changed_at END,
    version = u.version
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
            $7::int[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::text[],
            $12::int[], $13::timestamptz[], $14::text[], $15::text[], $16::bigint[])
    AS u(id, status, reason, qr, qr_seq, qr_expires_at, attempts, at, code, code_expires_at,
         reason_code, conflicts, conflicts_since, account_phone, account_name, version)
WHERE c.id = u.id
"""
FOLDED_WIDTH = 16

_FOLDED_HISTORY = """
INSERT INTO connection_events (event_id, connection_id, generation, event_type, from_status,
    to_status, applied, code, reason, command_id, occurred_at, reason_code)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                     $7::bool[], $8::int[], $9::text[], $10::uuid[], $11::timestamptz[],
                     $12::text[])
ON CONFLICT (event_id) DO NOTHING
"""
FOLDED_HISTORY_WIDTH = 12

# Every applied transition's snapshot goes to the changes stream through the outbox, in the
# batch's transaction: a crash after the commit cannot lose it (the notifier needs them all).
_FOLDED_CHANGES = """
INSERT INTO outbox (msg_id, subject, payload, headers)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[])
ON CONFLICT (msg_id) DO NOTHING
"""


class FoldedChange(msgspec.Struct, frozen=True, kw_only=True):
    """One applied event's change: queued as ``chg:<event id>`` (a redelivery adds none)."""

    event_id: uuid.UUID
    change: ConnectionChanged


async def write_folded(
    conn: asyncpg.Connection,
    names: Names,
    rows: Sequence[tuple[object, ...]],
    history: Sequence[tuple[object, ...]],
    changes: Sequence[FoldedChange],
) -> None:
    """Write a batch of rows ``machine.apply`` moved, in the caller's transaction: ``rows``
    (the ``_FOLDED`` columns, each with the version its events bumped it to), ``history``
    (one row per event, applied or not) and the ``changes`` of the applied events; one
    statement per table."""
    if rows:
        await conn.execute(_FOLDED, *_columns(rows, FOLDED_WIDTH))
    if history:
        await conn.execute(_FOLDED_HISTORY, *_columns(history, FOLDED_HISTORY_WIDTH))
    if changes:
        outbox = [
            (
                f"chg:{c.event_id}",
                names.change_subject(c.change.connection_id),
                change_encoder.encode(c.change),
                msgspec.json.encode({headers.CONNECTION_ID: str(c.change.connection_id)}).decode(),
            )
            for c in changes
        ]
        await conn.execute(_FOLDED_CHANGES, *_columns(outbox, 4))


def folded_change(
    connection_id: uuid.UUID,
    row: Row,
    cause: str,
    previous_status: str | None,
    version: int | None,
    at: datetime | None,
) -> ConnectionChanged:
    """The change of a row ``machine.apply`` moved (``row``: its ``machine.Row``), as of the
    transaction's time ``at``."""
    return ConnectionChanged(
        connection_id=connection_id,
        generation=row.generation,
        status=row.status.value,
        status_reason=row.status_reason,
        qr=row.qr,
        qr_seq=row.qr_seq,
        qr_expires_at=row.qr_expires_at,
        cause=cause,
        changed_at=at or datetime.now(UTC),
        pairing_code=row.pairing_code,
        pairing_code_expires_at=row.pairing_code_expires_at,
        reason_code=row.reason_code,
        previous_status=previous_status,
        server=row.server,
        version=version,
    )


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to one list per column, for ``unnest``."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width
