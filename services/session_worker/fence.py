"""Generation fencing: is a command still about the connection's current generation?

Postgres holds the truth. A create for generation 1 that arrives after a recreate (or after a
delete) must not create a session. If Postgres cannot be asked, the answer is "unknown" and the
worker goes ahead: the check after the call and the watchdog are the nets for that rare case.
"""

from __future__ import annotations

import logging
import time
import uuid

import asyncpg

from proto.commands import CreateSession
from proto.states import Status

log = logging.getLogger("zapbus.session_worker")


_PRIMED_FOR_SECONDS = 1.0
_ERRORS = (asyncpg.PostgresError, OSError, asyncpg.InterfaceError)


class Fence:
    def __init__(self, pool: asyncpg.Pool | None) -> None:
        self.pool = pool
        # connection id -> (generation, status, when read): one query per fetched batch
        # instead of one per command (each entry answers one check, within a second).
        self._primed: dict[uuid.UUID, tuple[int, str, float]] = {}

    async def prime(self, connection_ids: list[uuid.UUID]) -> None:
        """Read the rows of a fetched batch of commands in one query."""
        if self.pool is None or not connection_ids:
            return
        try:
            rows = await self.pool.fetch(
                "SELECT id, generation, status FROM connections WHERE id = ANY($1::uuid[])",
                connection_ids,
            )
        except _ERRORS as exc:
            log.warning("fence prefetch skipped, database unavailable: %s", exc)
            return
        now = time.monotonic()
        for row in rows:
            self._primed[row["id"]] = (row["generation"], row["status"], now)

    async def is_current(self, cmd: CreateSession, fresh: bool = False) -> bool | None:
        """True/False, or None when the database could not be asked. ``fresh`` skips the
        primed batch read (after the Baileys call, which may have taken seconds)."""
        primed = None if fresh else self._primed.pop(cmd.connection_id, None)
        if primed is not None and time.monotonic() - primed[2] < _PRIMED_FOR_SECONDS:
            generation, status = primed[0], primed[1]
        else:
            if self.pool is None:
                return None
            try:
                row = await self.pool.fetchrow(
                    "SELECT generation, status FROM connections WHERE id = $1",
                    cmd.connection_id,
                )
            except _ERRORS as exc:
                log.warning("fence check skipped, database unavailable: %s", exc)
                return None
            if row is None:
                return False
            generation, status = row["generation"], row["status"]
        return bool(generation == cmd.generation and status != Status.DELETED)
