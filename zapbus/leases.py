"""One replica at a time: a Postgres advisory lock that a frozen holder cannot keep.

Loops that must run on one replica only (the pool manager, the reconciler, the notifier's
fan-out, history retention) hold a session-level advisory lock on a connection of their
own. A plain advisory lock outlives a holder that hangs without dying (SIGSTOP, a stuck
event loop, a VM paused): its TCP connection stays open, so the lock is never released and
every other replica waits forever. So the connection that takes the lock is first set to
``idle_session_timeout``: a holder that has not used it for that long has its session ended
by Postgres, which releases the lock, and another replica takes over. The holder finds out at
its next statement on that connection (which fails), so work written on the lock's
connection is fenced for free; work written elsewhere asks ``confirm()`` first.

A holder that idles while alive (the reconciler while it asks the Baileys servers, the pool
manager between ticks, the fan-out while no change comes) keeps the session alive with
``kept_alive()``, a task that pings it every third of the timeout: it stops with its process,
which is the point. Work on the lock's connection goes through ``session()``, one statement
at a time with the pings.

The lock is keyed by name and schema, so deployments (and tests) sharing a database in
separate schemas do not wait for each other. ``idle_session_timeout`` needs PostgreSQL 14;
on older servers the lock works as before (a frozen holder keeps it), said once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

log = logging.getLogger("zapbus.leases")

DEFAULT_TIMEOUT_SECONDS = 30.0

_KEY = "hashtext($1), hashtext(current_schema())"
_old_server_logged = False


class LeaseLost(Exception):
    """The lock's session is gone (ended by Postgres after the holder froze, or broken)."""


class Lease:
    """An advisory lock named ``name`` on ``conn`` (a connection the caller owns, and hands
    back to its pool only after ``release()``: pooled connections are not reset)."""

    def __init__(
        self, conn: asyncpg.Connection, name: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.conn = conn
        self.name = name
        self.timeout_seconds = timeout_seconds
        self.held = False
        self._busy = asyncio.Lock()  # one statement at a time on the connection

    async def take(self) -> bool:
        """Try once; True when this replica holds the lock now."""
        async with self._busy:
            self.held = bool(
                await self.conn.fetchval(f"SELECT pg_try_advisory_lock({_KEY})", self.name)
            )
            if self.held:
                await _set_idle_timeout(self.conn, self.timeout_seconds)
        return self.held

    async def take_within(self, seconds: float, every: float = 0.2) -> bool:
        """Try until ``seconds`` have passed (at least once)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not await self.take():
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(every)
        return True

    async def confirm(self) -> None:
        """Raise LeaseLost unless the lock is still held (a round trip on its session)."""
        if not self.held:
            raise LeaseLost(self.name)
        try:
            async with self._busy:
                await self.conn.fetchval("SELECT 1")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self.held = False
            raise LeaseLost(f"{self.name}: {exc}") from exc

    async def release(self) -> None:
        """Give the lock back (nothing to do when its session is gone)."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            async with self._busy:
                await self.conn.execute(f"SELECT pg_advisory_unlock({_KEY})", self.name)
                await self.conn.execute("SET idle_session_timeout = 0")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[asyncpg.Connection]:
        """The lock's connection, for work fenced by it, one user at a time (the pings of
        ``kept_alive`` share it). LeaseLost when the lock is known gone."""
        if not self.held:
            raise LeaseLost(self.name)
        async with self._busy:
            yield self.conn

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[None]:
        """While inside, ping the lock's session so it is not ended for idling."""
        task = asyncio.create_task(self._ping())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.timeout_seconds / 3)
            try:
                async with self._busy:
                    await self.conn.fetchval("SELECT 1")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                self.held = False
                return


async def _set_idle_timeout(conn: asyncpg.Connection, seconds: float) -> None:
    global _old_server_logged
    millis = max(1, int(seconds * 1000))
    try:
        await conn.execute(f"SET idle_session_timeout = {millis}")
    except asyncpg.UndefinedObjectError:
        if not _old_server_logged:
            _old_server_logged = True
            log.warning(
                "PostgreSQL < 14 has no idle_session_timeout: a replica that freezes while it"
                " holds a lock (pool manager, reconciler, fan-out) keeps it until it dies"
            )
