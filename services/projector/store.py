"""Postgres side of the projector: fold a batch of events into rows in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec

from proto import headers
from proto.changes import ConnectionChanged, change_encoder
from proto.events import Event, event_type
from proto.names import Names
from proto.states import Status
from services.projector.transitions import Outcome, QrPolicy, Row, apply


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one event of a batch."""

    event: Event
    outcome: Outcome | None  # None: already projected (redelivery) or unknown connection
    from_status: Status | None = None
    duplicate: bool = False
    # the row's version after this event (applied ones only): each applied event bumps it
    version: int | None = None


_LOAD = """
SELECT id, status, generation, status_reason, qr, qr_seq, qr_expires_at, attempts, login,
       pairing_code, pairing_code_expires_at, reason_code, conflicts, conflicts_since,
       account_phone, account_name, server, version
FROM connections WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""

# One statement per batch for each table (arrays unnested), not one per row: half the
# projector's database time went into executemany's per-row round of messages.
_UPDATE = """
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

_HISTORY = """
INSERT INTO connection_events (event_id, connection_id, generation, event_type, from_status,
    to_status, applied, code, reason, command_id, occurred_at, reason_code)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                     $7::bool[], $8::int[], $9::text[], $10::uuid[], $11::timestamptz[],
                     $12::text[])
ON CONFLICT (event_id) DO NOTHING
"""

# Every applied transition's snapshot goes to the changes stream through the outbox, in the
# batch's transaction: a crash after the commit cannot lose it (the notifier needs them all).
_CHANGES = """
INSERT INTO outbox (msg_id, subject, payload, headers)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[])
ON CONFLICT (msg_id) DO NOTHING
"""


async def project(
    conn: asyncpg.Connection, events: Sequence[Event], policy: QrPolicy, names: Names
) -> list[Applied]:
    """Apply ``events`` in order to their connections, and queue a change snapshot of every
    applied one in the outbox; the caller owns the transaction."""
    ids = sorted({e.connection_id for e in events})
    loaded = await conn.fetch(_LOAD, ids)
    # the rows are locked: each applied event bumps the version here, the UPDATE writes it
    versions: dict[uuid.UUID, int] = {r["id"]: r["version"] for r in loaded}
    rows: dict[uuid.UUID, Row] = {
        r["id"]: Row(
            status=Status(r["status"]),
            generation=r["generation"],
            status_reason=r["status_reason"],
            qr=r["qr"],
            qr_seq=r["qr_seq"],
            qr_expires_at=r["qr_expires_at"],
            attempts=r["attempts"],
            login=r["login"],
            pairing_code=r["pairing_code"],
            pairing_code_expires_at=r["pairing_code_expires_at"],
            reason_code=r["reason_code"],
            conflicts=r["conflicts"],
            conflicts_since=r["conflicts_since"],
            account_phone=r["account_phone"],
            account_name=r["account_name"],
            server=r["server"],
        )
        for r in loaded
    }
    seen = {
        r["event_id"]
        for r in await conn.fetch(
            "SELECT event_id FROM connection_events WHERE event_id = ANY($1::uuid[])",
            [e.event_id for e in events],
        )
    }
    results: list[Applied] = []
    history: list[tuple[object, ...]] = []
    changed: dict[uuid.UUID, datetime] = {}
    for event in events:
        row = rows.get(event.connection_id)
        if row is None or event.event_id in seen:
            results.append(Applied(event=event, outcome=None, duplicate=row is not None))
            continue
        seen.add(event.event_id)
        outcome = apply(row, event, policy)
        if outcome.applied:
            versions[event.connection_id] += 1
        results.append(
            Applied(
                event=event,
                outcome=outcome,
                from_status=row.status,
                version=versions[event.connection_id] if outcome.applied else None,
            )
        )
        history.append(
            (
                event.event_id,
                event.connection_id,
                event.generation,
                event_type(event),
                row.status.value,
                outcome.row.status.value,
                outcome.applied,
                outcome.code,
                outcome.reason,
                event.command_id,
                event.occurred_at,
                outcome.row.reason_code if outcome.applied else None,
            )
        )
        if outcome.applied:
            rows[event.connection_id] = outcome.row
            changed[event.connection_id] = event.occurred_at
    if changed:
        updates: list[tuple[object, ...]] = [
            (
                cid,
                rows[cid].status.value,
                rows[cid].status_reason,
                rows[cid].qr,
                rows[cid].qr_seq,
                rows[cid].qr_expires_at,
                rows[cid].attempts,
                at,
                rows[cid].pairing_code,
                rows[cid].pairing_code_expires_at,
                rows[cid].reason_code,
                rows[cid].conflicts,
                rows[cid].conflicts_since,
                rows[cid].account_phone,
                rows[cid].account_name,
                versions[cid],
            )
            for cid, at in changed.items()
        ]
        await conn.execute(_UPDATE, *_columns(updates, 16))
    if history:
        await conn.execute(_HISTORY, *_columns(history, 12))
    # the transaction's own time, which is also the rows' updated_at (a reader of the row
    # tells a change it already saw by ``version``: this time is the transaction's start)
    tx_time = await conn.fetchval("SELECT now()") if changed else None
    changes = [_change_row(names, r, tx_time) for r in results if r.outcome and r.outcome.applied]
    if changes:
        await conn.execute(_CHANGES, *_columns(changes, 4))
    return results


def _change_row(names: Names, result: Applied, at: datetime | None) -> tuple[object, ...]:
    """The outbox row of one applied transition (message id ``chg:<event id>``)."""
    assert result.outcome is not None
    row, event = result.outcome.row, result.event
    change = ConnectionChanged(
        connection_id=event.connection_id,
        generation=row.generation,
        status=row.status.value,
        status_reason=row.status_reason,
        qr=row.qr,
        qr_seq=row.qr_seq,
        qr_expires_at=row.qr_expires_at,
        cause=event_type(event),
        changed_at=at or datetime.now(UTC),
        pairing_code=row.pairing_code,
        pairing_code_expires_at=row.pairing_code_expires_at,
        reason_code=row.reason_code,
        previous_status=result.from_status.value if result.from_status else None,
        server=row.server,
        version=result.version,
    )
    return (
        f"chg:{event.event_id}",
        names.change_subject(event.connection_id),
        change_encoder.encode(change),
        msgspec.json.encode({headers.CONNECTION_ID: str(event.connection_id)}).decode(),
    )


def _columns(rows: list[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to one list per column, for ``unnest``."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width
