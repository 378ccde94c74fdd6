"""Partitions of the events stream, each projected by one projector at a time.

A connection's events all land in one partition (``Names.event_partition``), and a partition
is projected by one projector loop at a time, batch after batch, so a connection's events are
applied in the order JetStream stored them, however many projector processes run.

Ownership is a lease in Postgres (``projector_leases``), renewed every ``renew_seconds`` and
valid for ``lease_seconds``:

* every batch transaction first reads its partition's lease ``FOR SHARE`` and projects only
  if this projector still holds it (``PartitionLease.held``);
* a projector takes a partition only once its lease has expired (or was released), with an
  ``UPDATE`` that waits for a batch in flight; so even a projector that lost its lease without
  noticing (a long pause) can no longer commit once another holds it;
* projectors announce themselves in ``projector_members``; each holds at most its fair share
  (partitions / live projectors, rounded up) and releases the rest, so a new projector gets
  work within a few renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable

import asyncpg

from zapbus import db
from zapbus.logs import fields
from zapbus.runtime import Runner
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.projector")

_RELEASED = uuid.UUID(int=0)  # the owner of a lease handed back on purpose


class PartitionLost(Exception):
    """This projector no longer holds the partition: stop projecting it."""


class PartitionLease:
    """One partition's lease as seen by its holder."""

    def __init__(self, partition: int, owner: uuid.UUID) -> None:
        self.partition = partition
        self.owner = owner

    async def held(self, conn: asyncpg.Connection) -> bool:
        """In the caller's transaction: is the lease still ours? (Blocks a takeover until
        that transaction ends.)"""
        return bool(
            await conn.fetchval(
                "SELECT true FROM projector_leases WHERE partition = $1 AND owner = $2"
                " AND expires_at > now() FOR SHARE",
                self.partition,
                self.owner,
            )
        )


class PartitionOwner(Stoppable):
    """Takes, renews and releases partition leases; runs one projector loop per partition held."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        partitions: int,
        build: Callable[[PartitionLease], Runner],
        renew_seconds: float = 2.0,
        lease_seconds: float = 10.0,
        takeover_delay_seconds: float = 0.0,
    ) -> None:
        self.pool = pool
        self.partitions = partitions
        self.build = build
        self.renew_seconds = renew_seconds
        self.lease_seconds = lease_seconds
        # A partition taken from a projector that died holding it starts this late: the
        # consumer's ack_wait, so what the dead one had fetched and not acked is redelivered
        # (before anything newer) first, and order holds across the takeover.
        self.takeover_delay = takeover_delay_seconds
        self.member = uuid.uuid4()
        self._loops: dict[int, tuple[Runner, asyncio.Task[None]]] = {}
        super().__init__()

    @property
    def held(self) -> list[int]:
        return sorted(self._loops)

    async def run(self) -> None:
        try:
            while not self.stopping:
                try:
                    await self._round()
                except db.UNAVAILABLE as exc:
                    # Leases we cannot renew will expire; stop before someone else takes them.
                    log.warning("partition leases not renewed: %s", exc)
                    await self._stop_loops(self.held)
                await self.pause(self.renew_seconds)
        finally:
            held = self.held
            await self._stop_loops(held)
            with contextlib.suppress(*db.UNAVAILABLE):
                await self._release(held, leave=True)

    async def _round(self) -> None:
        """Renew what we hold, drop loops that ended, take or give back partitions."""
        for partition, (_, task) in list(self._loops.items()):
            if task.done():  # lost its lease, or crashed: give the partition back
                del self._loops[partition]
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.warning("partition %d loop ended: %r", partition, exc)
                await self._release([partition])
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO projector_members (member, expires_at)"
                " VALUES ($1, now() + make_interval(secs => $2))"
                " ON CONFLICT (member) DO UPDATE SET expires_at = excluded.expires_at",
                self.member,
                self.lease_seconds,
            )
            await conn.execute("DELETE FROM projector_members WHERE expires_at < now()")
            renewed = await conn.fetch(
                "UPDATE projector_leases SET expires_at = now() + make_interval(secs => $2)"
                " WHERE owner = $1 AND partition = ANY($3::int[]) AND expires_at > now()"
                " RETURNING partition",
                self.member,
                self.lease_seconds,
                self.held,
            )
            members = await conn.fetchval("SELECT count(*) FROM projector_members")
        lost = set(self.held) - {r["partition"] for r in renewed}
        if lost:
            log.warning("partition leases lost: %s", sorted(lost))
            await self._stop_loops(sorted(lost))
        share = math.ceil(self.partitions / max(1, members))
        if len(self._loops) > share:
            extra = self.held[share:]
            await self._stop_loops(extra)
            await self._release(extra)
        elif len(self._loops) < share:
            await self._take(share - len(self._loops))

    async def _take(self, wanted: int) -> None:
        for partition in range(self.partitions):
            if wanted <= 0:
                return
            if partition in self._loops:
                continue
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO projector_leases (partition, owner, expires_at)"
                    " VALUES ($1, $2, now() - interval '1 second') ON CONFLICT DO NOTHING",
                    partition,
                    self.member,
                )
                previous = await conn.fetchrow(
                    "WITH prev AS (SELECT owner FROM projector_leases WHERE partition = $1"
                    " FOR UPDATE)"
                    " UPDATE projector_leases l SET owner = $2,"
                    " expires_at = now() + make_interval(secs => $3)"
                    " FROM prev WHERE l.partition = $1 AND (l.expires_at < now() OR l.owner = $2)"
                    " RETURNING prev.owner",
                    partition,
                    self.member,
                    self.lease_seconds,
                )
            if previous is not None:
                died = previous["owner"] not in (self.member, _RELEASED)
                runner = self.build(PartitionLease(partition, self.member))
                task = asyncio.create_task(
                    self._start(runner, self.takeover_delay if died else 0.0),
                    name=f"zapbus-projector-p{partition}",
                )
                self._loops[partition] = (runner, task)
                wanted -= 1
                log.info(
                    "partition taken",
                    extra=fields(partition=partition, member=str(self.member)),
                )

    async def _start(self, runner: Runner, delay: float) -> None:
        if delay > 0:
            log.info("partition taken over from a projector that died; starting in %.0f s", delay)
            await self.pause(delay)
        await runner.run()

    async def _stop_loops(self, partitions: list[int]) -> None:
        for partition in partitions:
            entry = self._loops.pop(partition, None)
            if entry is None:
                continue
            runner, task = entry
            runner.stop()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=self.lease_seconds / 2)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await task
            except Exception as exc:
                log.warning("partition %d loop ended: %r", partition, exc)

    async def _release(self, partitions: list[int], leave: bool = False) -> None:
        """Give leases back at once (their loops have stopped), so another takes them now."""
        async with self.pool.acquire() as conn:
            if partitions:
                await conn.execute(
                    "UPDATE projector_leases SET owner = $3,"
                    " expires_at = now() - interval '1 second'"
                    " WHERE owner = $1 AND partition = ANY($2::int[])",
                    self.member,
                    partitions,
                    _RELEASED,
                )
            if leave:
                await conn.execute("DELETE FROM projector_members WHERE member = $1", self.member)
