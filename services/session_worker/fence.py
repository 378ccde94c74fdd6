"""Fencing: may a command still act on the Baileys server, given what Postgres says now?

Postgres holds the truth. A create is carried out only while its generation is the row's
current one and the row still waits for that session (``pending``, ``creating``, or
``reconnecting`` after the reconciler found the session lost). Otherwise:

* the row moved on (newer generation, deleted, or a terminal state): the session is not wanted,
  and one an earlier call may have made is deleted (``Verdict.UNDO``);
* the row is past creation (``awaiting_qr`` ... ``connected``): an earlier copy of the command
  already made the session, which is wanted; nothing to do (``Verdict.DONE``).

A delete is carried out unless the row's current generation is that session's and is not
terminal: a DLQ replay or the reconciler made the session wanted again (``Verdict.DONE``).

Checks made together (a fetched batch's creates as they start, a burst's creates reading their
rows again after their calls) are read together: one query for the ids asked for in one turn of
the event loop (``BatchLoader``).

If Postgres cannot be asked, the verdict is ``Verdict.UNKNOWN`` and the worker goes ahead: the
check after the call, the watchdog and the reconciler are the nets for that rare case.
"""

from __future__ import annotations

import enum
import logging
import uuid

import asyncpg

from proto.commands import CreateSession, DeleteSession, RequestPairingCode
from zapbus import db
from zapbus.coalesce import BatchLoader
from zapbus.connection import states
from zapbus.connection.states import CREATE_RUNS, TERMINAL, Status

log = logging.getLogger("zapbus.session_worker")


class Verdict(enum.Enum):
    RUN = "run"  # carry the command out
    DONE = "done"  # nothing to do: ack
    UNDO = "undo"  # the session must not exist: make sure it is deleted, then ack
    UNKNOWN = "unknown"  # Postgres could not be asked: go ahead


def create_verdict(row: tuple[int, str] | None, cmd: CreateSession) -> Verdict:
    """What to do with a create, given the row's (generation, status) or None if gone."""
    if row is None:
        return Verdict.UNDO
    generation, raw = row
    status = Status(raw)
    if generation != cmd.generation or status in TERMINAL:
        return Verdict.UNDO
    return Verdict.RUN if status in CREATE_RUNS else Verdict.DONE


def pairing_code_verdict(row: tuple[int, str] | None, cmd: RequestPairingCode) -> Verdict:
    """A pairing code is asked for only while the generation waits to be linked. The worker
    asks right after the create: the projector may not have moved the row out of ``pending``
    yet, which waits too."""
    if row is None or row[0] != cmd.generation:
        return Verdict.DONE
    return Verdict.RUN if Status(row[1]) in states.CODE_WAITS else Verdict.DONE


def delete_verdict(row: tuple[int, str] | None, cmd: DeleteSession) -> Verdict:
    """What to do with a delete, given the row's (generation, status) or None if gone."""
    if row is None:
        return Verdict.RUN
    generation, raw = row
    if generation == cmd.generation and Status(raw) not in TERMINAL:
        return Verdict.DONE
    return Verdict.RUN


class Fence:
    def __init__(self, pool: asyncpg.Pool | None) -> None:
        self.pool = pool
        # connection id -> (generation, status): the checks of one loop turn are one query
        self._rows: BatchLoader[uuid.UUID, tuple[int, str]] = BatchLoader(self._load)

    async def _load(self, connection_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, str]]:
        assert self.pool is not None
        rows = await self.pool.fetch(
            "SELECT id, generation, status FROM connections WHERE id = ANY($1::uuid[])",
            connection_ids,
        )
        return {r["id"]: (r["generation"], r["status"]) for r in rows}

    async def check_create(self, cmd: CreateSession) -> Verdict:
        found, row = await self._read(cmd.connection_id)
        return create_verdict(row, cmd) if found else Verdict.UNKNOWN

    async def check_pairing_code(self, cmd: RequestPairingCode) -> Verdict:
        found, row = await self._read(cmd.connection_id)
        return pairing_code_verdict(row, cmd) if found else Verdict.UNKNOWN

    async def check_delete(self, cmd: DeleteSession) -> Verdict:
        found, row = await self._read(cmd.connection_id)
        if not found:
            return Verdict.UNKNOWN
        verdict = delete_verdict(row, cmd)
        if verdict is Verdict.DONE and cmd.server is not None and self.pool is not None:
            # The generation is wanted, but placed on another server: the copy on this one
            # (the reconciler found it there) goes.
            try:
                placed = await self.pool.fetchval(
                    "SELECT server FROM placements WHERE connection_id = $1 AND generation = $2",
                    cmd.connection_id,
                    cmd.generation,
                )
            except db.UNAVAILABLE:
                return verdict
            if placed != cmd.server:
                return Verdict.RUN  # not placed there (or not placed at all, for now)
        return verdict

    async def phone_serves_another(self, cmd: DeleteSession) -> bool:
        """Does another live connection use the delete's phone on its server? A server keyed
        by phone (fazer) holds one connection per phone: it now serves that one, which its
        delete would end. False when Postgres cannot be asked (the delete goes ahead)."""
        if self.pool is None or cmd.phone_number is None:
            return False
        try:
            other = await self.pool.fetchval(
                "SELECT id FROM connections WHERE phone_number = $1 AND id <> $2"
                " AND status = ANY($3::text[])"
                " AND (server IS NULL OR $4::text IS NULL OR server = $4) LIMIT 1",
                cmd.phone_number,
                cmd.connection_id,
                states.values(states.LIVE),
                cmd.server,
            )
        except db.UNAVAILABLE as exc:
            log.warning("phone check skipped, database unavailable: %s", exc)
            return False
        return other is not None

    async def _read(self, connection_id: uuid.UUID) -> tuple[bool, tuple[int, str] | None]:
        """(asked, (generation, status) or None when there is no such row)."""
        if self.pool is None:
            return False, None
        try:
            return True, await self._rows.get(connection_id)
        except db.UNAVAILABLE as exc:
            log.warning("fence check skipped, database unavailable: %s", exc)
            return False, None
