"""Holds: tell Postgres which connections a worker is working on, so the watchdog waits.

A create can sit in a worker for a long time without any event: waiting for the breaker to
close, for a create slot during a burst, or inside a 30 s call. While it does, the worker
pushes ``connections.held_until`` forward on every heartbeat (one UPDATE for all held rows);
the watchdog never re-drives or times out a row whose hold has not expired. A worker that dies
stops renewing, and its holds lapse after ``hold_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Iterator

import asyncpg

from zapbus import db

log = logging.getLogger("zapbus.session_worker")

_RENEW = (
    "UPDATE connections SET held_until = now() + make_interval(secs => $2)"
    " WHERE id = ANY($1::uuid[])"
)


class Holds:
    def __init__(self, pool: asyncpg.Pool | None, every_seconds: float, hold_seconds: float):
        self.pool = pool
        self.every = every_seconds
        self.hold_seconds = hold_seconds
        self._held: Counter[uuid.UUID] = Counter()
        self._stopping = asyncio.Event()
        self._fresh = asyncio.Event()  # a new hold: renew now, not at the next beat

    @contextlib.contextmanager
    def hold(self, connection_id: uuid.UUID) -> Iterator[None]:
        """Mark ``connection_id`` as held while the block runs (renewed by ``run``)."""
        if not self._held[connection_id]:
            self._fresh.set()
        self._held[connection_id] += 1
        try:
            yield
        finally:
            self._held[connection_id] -= 1
            if self._held[connection_id] <= 0:
                del self._held[connection_id]

    async def renew(self) -> None:
        if self.pool is None or not self._held:
            return
        try:
            await self.pool.execute(_RENEW, list(self._held), self.hold_seconds)
        except db.UNAVAILABLE as exc:
            log.warning("could not renew %d holds: %s", len(self._held), exc)

    def stop(self) -> None:
        self._stopping.set()
        self._fresh.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._fresh.clear()
            await self.renew()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._fresh.wait()
                    await asyncio.sleep(0.05)  # gather the holds of one fetched batch
