"""Holds: tell Postgres which connections a worker is working on, so the watchdog waits.

A create can sit in a worker for a long time without any event: waiting for the breaker to
close, for a create slot during a burst, or inside a 30 s call. While it does, the worker
pushes ``connections.held_until`` forward on every heartbeat (one UPDATE for all held rows);
the watchdog never re-drives or times out a row whose hold has not expired. A worker that dies
stops renewing, and its holds lapse after ``hold_seconds``; a hold whose work ended is released
at once (``held_until`` cleared), since the reconciler too waits for a held row: a session lost
right after its create must not wait out the rest of the hold to be re-created.
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

# Rows are locked in id order, as the projector's batch locks them (projector/store.py): a
# plain UPDATE ... WHERE id = ANY(...) locks in the order of its scan (a bitmap heap scan goes
# by physical position), and a renew crossing a projector batch in the other order deadlocked
# (seen in the 1,000-session burst: one of the two transactions aborted, the batch redelivered).
_RENEW = """
UPDATE connections c SET held_until = now() + make_interval(secs => $2)
FROM (SELECT id FROM connections WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE) l
WHERE c.id = l.id
"""
_RELEASE = """
UPDATE connections c SET held_until = NULL
FROM (SELECT id FROM connections WHERE id = ANY($1::uuid[]) AND held_until IS NOT NULL
      ORDER BY id FOR UPDATE) l
WHERE c.id = l.id
"""


class Holds:
    def __init__(self, pool: asyncpg.Pool | None, every_seconds: float, hold_seconds: float):
        self.pool = pool
        self.every = every_seconds
        self.hold_seconds = hold_seconds
        self._held: Counter[uuid.UUID] = Counter()
        self._released: set[uuid.UUID] = set()  # no longer held here, not yet cleared
        self._stopping = asyncio.Event()
        self._fresh = asyncio.Event()  # a new hold: renew now, not at the next beat

    @contextlib.contextmanager
    def hold(self, connection_id: uuid.UUID) -> Iterator[None]:
        """Mark ``connection_id`` as held while the block runs (renewed by ``run``)."""
        if not self._held[connection_id]:
            self._fresh.set()
        self._held[connection_id] += 1
        self._released.discard(connection_id)
        try:
            yield
        finally:
            self._held[connection_id] -= 1
            if self._held[connection_id] <= 0:
                del self._held[connection_id]
                self._released.add(connection_id)
                self._fresh.set()  # release it now, not when the hold would lapse

    async def renew(self) -> None:
        """Push the held rows' ``held_until`` forward; clear it on rows released since."""
        if self.pool is None:
            return
        released = list(self._released - set(self._held))
        self._released.clear()
        try:
            if self._held:
                await self.pool.execute(_RENEW, list(self._held), self.hold_seconds)
            if released:
                await self.pool.execute(_RELEASE, released)
        except db.UNAVAILABLE as exc:
            # a hold not cleared lapses by itself after hold_seconds
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
