"""Generation fencing: is a command still about the connection's current generation?

Postgres holds the truth. A create for generation 1 that arrives after a recreate (or after a
delete) must not create a session. If Postgres cannot be asked, the answer is "unknown" and the
worker goes ahead: the check after the call and the watchdog are the nets for that rare case.
"""

from __future__ import annotations

import logging

import asyncpg

from proto.commands import CreateSession
from proto.states import Status

log = logging.getLogger("zapbus.session_worker")


class Fence:
    def __init__(self, pool: asyncpg.Pool | None) -> None:
        self.pool = pool

    async def is_current(self, cmd: CreateSession) -> bool | None:
        """True/False, or None when the database could not be asked."""
        if self.pool is None:
            return None
        try:
            row = await self.pool.fetchrow(
                "SELECT generation, status FROM connections WHERE id = $1", cmd.connection_id
            )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("fence check skipped, database unavailable: %s", exc)
            return None
        if row is None:
            return False
        return bool(row["generation"] == cmd.generation and row["status"] != Status.DELETED)
