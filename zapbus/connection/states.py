"""The connection states and every subset of them, by name.

``proto/states.py`` holds the states themselves (the bus and frontend contract; ``proto``
imports nothing of zapbus); this module re-exports them and names each subset the code reads.
Nothing else spells a list of state names: a new state is added there and sorted into the
subsets here. SQL reads a subset as a bind parameter (``status = ANY($1::text[])`` with
``values(SUBSET)``), or, where the planner must match a partial index's predicate (which a
parameter cannot), as a literal list rendered by ``sql_list``.
"""

from __future__ import annotations

from collections.abc import Iterable

from proto.states import RANK, TERMINAL, Status

__all__ = [
    "AWAITING_CREATE",
    "CODE_ASKABLE",
    "CODE_WAITS",
    "CREATE_RUNS",
    "LIVE",
    "LIVE_AGAIN",
    "RANK",
    "STUCK",
    "TERMINAL",
    "WANTED_LIVE",
    "Status",
    "sql_list",
    "values",
]

# TERMINAL (from proto): qr_expired, logged_out, conflict, failed, deleted end a generation.

LIVE: frozenset[Status] = frozenset(Status) - TERMINAL
"""Not ended: the generation is wanted (being created, linking, linked or reconnecting)."""

AWAITING_CREATE: frozenset[Status] = frozenset({Status.PENDING, Status.CREATING})
"""The create call has not made the session yet (no server holds it for sure)."""

CREATE_RUNS: frozenset[Status] = AWAITING_CREATE | {Status.RECONNECTING}
"""A create command is carried out (the reconciler re-creates a lost session through
``reconnecting``); past these, the session exists and a copy of the create has nothing to do."""

WANTED_LIVE: frozenset[Status] = LIVE - AWAITING_CREATE
"""The server holds the generation's session (its create went through) and it is wanted."""

STUCK: frozenset[Status] = AWAITING_CREATE | {Status.AWAITING_QR}
"""Watched for progress by the watchdog (as the partial index ``connections_live_status``)."""

LIVE_AGAIN: frozenset[Status] = frozenset(
    {Status.QR_READY, Status.CODE_READY, Status.PAIRING, Status.CONNECTED}
)
"""A moved connection is up on its new server: it shows a code to link, pairs or is linked."""

CODE_WAITS: frozenset[Status] = CREATE_RUNS | {Status.AWAITING_QR, Status.CODE_READY}
"""A pairing code may be asked of the server (the generation waits to be linked)."""

CODE_ASKABLE: frozenset[Status] = frozenset({Status.AWAITING_QR, Status.CODE_READY})
"""A tenant may ask for a new pairing code (the session is up and not linked)."""


def values(subset: Iterable[Status]) -> list[str]:
    """The subset's names, sorted, to bind as ``status = ANY($n::text[])``."""
    return sorted(s.value for s in subset)


def sql_list(subset: Iterable[Status]) -> str:
    """The subset as an SQL literal list, ``('a', 'b')``: only where a partial
    index's predicate must be matched by the planner (a bind parameter cannot be)."""
    return "(" + ", ".join(f"'{v}'" for v in values(subset)) + ")"
