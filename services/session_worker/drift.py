"""Drift: where what Postgres wants and what the Baileys server holds disagree. Pure functions.

Wanted: a connection's current generation has a live session while its row is ``awaiting_qr``,
``qr_ready``, ``pairing``, ``connected`` or ``reconnecting``; nothing is wanted for a terminal
or deleted row, nor for any superseded generation (``pending`` and ``creating`` belong to the
worker and the watchdog, and are left alone).

Kinds of drift, and the repair each gets (``reconciler.py`` carries them out):

* ``orphan``: live on the server, not wanted -> delete it through the command path;
* ``lost``: wanted, missing on the server for two sweeps in a row and the row unchanged for the
  grace period -> ``reconnecting`` and the create issued again (``failed`` after too many);
* ``state``: the server's state contradicts the row -> a status event through the projector;
* ``unknown``: named like zapbus's sessions but no connection here -> counted, deleted only when
  configured to (another deployment may share the server).

A sweep of a fleet at rest finds no drift, so it need not read every row: ``narrow`` compares
what the server lists with the wanted sessions' names and states (which Postgres reads from one
index) and names the few connections whose rows ``compute`` must see in full.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import msgspec

from zapbus.connection.states import TERMINAL, WANTED_LIVE, Status
from zapbus.connection.vocabulary import RECONNECTING_WORD, state_for_report

KINDS = ("orphan", "lost", "state", "unknown")
LOST_REASON = "session lost on server"

_SESSION_NAME = re.compile(r"^zb_([0-9a-f]{32})_g([0-9]{1,9})$")


def parse_session_name(name: str) -> tuple[uuid.UUID, int] | None:
    """(connection id, generation) of a zapbus session name, else None (not ours)."""
    match = _SESSION_NAME.match(name)
    if match is None:
        return None
    return uuid.UUID(hex=match.group(1)), int(match.group(2))


class RowView(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a connection row the reconciler compares."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    generation: int
    session_name: str
    status: Status
    updated_at: datetime
    status_changed_at: datetime
    misses: int = 0
    recreates: int = 0
    held_until: datetime | None = None
    server: str | None = None  # where the current generation is placed (None: not yet)


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """What the server was seen to hold. ``complete``: from the list route (a name not in
    ``sessions`` is absent); otherwise only the names in ``probed`` were asked about."""

    sessions: dict[str, str | None]  # name -> the server's state word, when it gave one
    at: datetime
    complete: bool
    probed: frozenset[str] = frozenset()

    def knows(self, name: str) -> bool:
        return self.complete or name in self.probed


class DriftItem(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    session_name: str
    action: str  # what the repair does (or would do)
    connection_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None
    generation: int | None = None
    row_status: str | None = None
    server_state: str | None = None
    # state drift: the status the event reports; lost: "recreate" or "fail"
    report: str | None = None
    reason: str | None = None
    ripe: bool = True  # False: seen, but not repaired yet (e.g. missing for one sweep only)
    server: str | None = None  # the Baileys server it was seen on (or missing from)


class ReconcilePolicy(msgspec.Struct, frozen=True, kw_only=True):
    grace_seconds: float = 30.0
    max_recreates: int = 3
    delete_unknown: bool = False


class Drift(msgspec.Struct, frozen=True, kw_only=True):
    items: list[DriftItem]
    # row id -> consecutive sweeps its wanted session was missing (after this sweep)
    misses: dict[uuid.UUID, int]


def _state_report(status: Status, state: str | None) -> tuple[str, str] | None:
    """The status event to send when the server's ``state`` contradicts a row in ``status``,
    else None."""
    if state is None:
        return None
    target = state_for_report(state, None, None)
    if target is None or target == status:
        return None
    why = f"server reports {state!r}"
    if target == Status.CONNECTED:
        return state, why
    if target in TERMINAL:
        return state, why
    if status == Status.CONNECTED:
        # Connected here, not there: the session dropped and nobody told us.
        return RECONNECTING_WORD, why
    return None  # e.g. qr_ready here, "connecting" there: the same phase in other words


def _id_hex(name: str) -> str:
    """The connection id (hex) a zapbus session name carries (a slice: no parsing)."""
    return name[3:35]


def narrow(
    wanted: Mapping[str, Status], observed: Observed, missed: Iterable[uuid.UUID] = ()
) -> tuple[set[uuid.UUID], Observed]:
    """The connections a sweep must read in full, and what the server holds of them.

    ``wanted``: session name -> row state of every wanted session placed on the server (or,
    in a pool of one, not placed); ``missed``: rows whose session an earlier sweep missed.
    Anything ``compute`` could report is about one of the connections returned: a listed name
    not wanted there (orphan, unknown, superseded, placed elsewhere), a wanted one the server
    reports in a contradicting state, a wanted one missing, and the missed ones (their count
    goes back to 0). ``observed`` is cut down to the sessions of those connections, so that
    ``compute`` on their rows finds what it would find on every row."""
    ids = set(missed)
    for name, state in observed.sessions.items():
        status = wanted.get(name)
        if status is None or _state_report(status, state) is not None:
            parsed = parse_session_name(name)
            if parsed is not None:
                ids.add(parsed[0])
    for name in wanted:
        if name not in observed.sessions and observed.knows(name):
            parsed = parse_session_name(name)
            if parsed is not None:
                ids.add(parsed[0])
    hexes = {i.hex for i in ids}
    kept = {n: s for n, s in observed.sessions.items() if _id_hex(n) in hexes}
    return ids, msgspec.structs.replace(observed, sessions=kept)


def compute(
    rows: dict[uuid.UUID, RowView],
    observed: Observed,
    deleting: dict[str, datetime],
    now: datetime,
    policy: ReconcilePolicy,
    server: str | None = None,
    default_server: str | None = None,
) -> Drift:
    """Compare ``rows`` (every wanted row, and every row an observed name points at) with
    ``observed``, what ``server`` holds (None: the only server, placement not considered).
    ``deleting``: session name -> when its pending delete was last driven.
    ``default_server``: where a row without a recorded placement is (a pool of one)."""

    def placed(row: RowView) -> str | None:
        return row.server or default_server

    items: list[DriftItem] = []
    misses: dict[uuid.UUID, int] = {}
    grace = timedelta(seconds=policy.grace_seconds)
    for name, state in sorted(observed.sessions.items()):
        parsed = parse_session_name(name)
        if parsed is None:
            continue  # not a zapbus session: none of our business
        cid, generation = parsed
        row = rows.get(cid)
        driven = deleting.get(name)
        in_hand = driven is not None and driven > now - grace  # a delete is on its way
        if row is None:
            action = "delete" if policy.delete_unknown and not in_hand else "none"
            items.append(
                DriftItem(
                    kind="unknown",
                    session_name=name,
                    action=action,
                    connection_id=cid,
                    generation=generation,
                    server_state=state,
                    reason="no connection of this deployment",
                    server=server,
                )
            )
            continue
        superseded = generation != row.generation
        elsewhere = server is not None and placed(row) is not None and placed(row) != server
        if superseded or row.status in TERMINAL or elsewhere:
            if superseded:
                why = f"generation {generation} superseded by {row.generation}"
            elif row.status in TERMINAL:
                why = f"connection is {row.status.value}"
            else:
                why = f"placed on {placed(row)}"
            items.append(
                DriftItem(
                    kind="orphan",
                    session_name=name,
                    action="none (delete pending)" if in_hand else "delete",
                    connection_id=cid,
                    tenant_id=row.tenant_id,
                    generation=generation,
                    row_status=row.status.value,
                    server_state=state,
                    reason=f"live on the server but not wanted: {why}",
                    server=server,
                )
            )
            continue
        if row.status in WANTED_LIVE and row.status_changed_at < observed.at:
            report = _state_report(row.status, state)
            if report is not None:
                items.append(
                    DriftItem(
                        kind="state",
                        session_name=name,
                        action=f"report {report[0]!r}",
                        connection_id=cid,
                        tenant_id=row.tenant_id,
                        generation=generation,
                        row_status=row.status.value,
                        server_state=state,
                        report=report[0],
                        reason=report[1],
                        server=server,
                    )
                )
    for row in rows.values():
        if row.status not in WANTED_LIVE or not observed.knows(row.session_name):
            continue
        if server is not None and placed(row) != server:
            continue  # its session is wanted on another server
        if row.session_name in observed.sessions:
            if row.misses:
                misses[row.id] = 0
            continue
        seen_missing = row.misses + 1
        misses[row.id] = seen_missing
        held = row.held_until is not None and row.held_until > now
        settled = row.updated_at <= now - grace and row.status_changed_at < observed.at
        ripe = seen_missing >= 2 and settled and not held
        give_up = row.recreates >= policy.max_recreates
        if ripe:
            action = "fail" if give_up else "recreate"
        else:
            action = f"wait (missing {min(seen_missing, 2)}/2 sweeps"
            action += ", row changed recently)" if not settled or held else ")"
        items.append(
            DriftItem(
                kind="lost",
                session_name=row.session_name,
                action=action,
                connection_id=row.id,
                tenant_id=row.tenant_id,
                generation=row.generation,
                row_status=row.status.value,
                report="fail" if give_up else "recreate",
                reason=LOST_REASON,
                ripe=ripe,
                server=server,
            )
        )
    return Drift(items=items, misses=misses)
