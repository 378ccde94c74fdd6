"""Postgres side of the projector: fold a batch of events into rows in one transaction
(``machine.apply`` decides, ``writer.write_folded`` writes)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from proto.events import Event, event_type
from proto.names import Names
from zapbus.connection.machine import Outcome, QrPolicy, Row, apply
from zapbus.connection.states import Status
from zapbus.connection.writer import FoldedChange, folded_change, write_folded


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
    # the transaction's own time, which is also the rows' updated_at (a reader of the row
    # tells a change it already saw by ``version``: this time is the transaction's start)
    tx_time = await conn.fetchval("SELECT now()") if changed else None
    changes = [
        FoldedChange(
            event_id=r.event.event_id,
            change=folded_change(
                r.event.connection_id,
                r.outcome.row,
                event_type(r.event),
                r.from_status.value if r.from_status else None,
                r.version,
                tx_time,
            ),
        )
        for r in results
        if r.outcome and r.outcome.applied
    ]
    await write_folded(conn, names, updates, history, changes)
    return results
