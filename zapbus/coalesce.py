"""Concurrent reads of the same kind share one database round trip.

A burst of creates makes a thousand tasks ask Postgres the same small question at once: the
gateway looks up the same API key for each request while its cache is still cold, the session
worker reads each connection's row again after its create (the fence). One query per task
costs a round trip each, in the service and in Postgres, and on two busy cores those round
trips were a large part of the burst (py-spy: a quarter of the worker's CPU in socket writes
to Postgres).

- ``SingleFlight``: callers asking for the same key while a lookup of it runs wait for that
  lookup's answer instead of starting their own (a cache's cold start, or its expiry under
  load).
- ``BatchLoader``: the keys asked for in one turn of the event loop are read together, with
  one call of ``load(keys)``; each caller gets its key's value (None when absent).

A ``BatchLoader`` read starts after every caller of its batch asked, so a caller that needs a
fresh read (the fence, after a create's call) gets one. ``SingleFlight`` gives a caller that
joins a lookup already running that lookup's answer, which may have been read just before it
asked: use it where a slightly older answer is fine (the API-key cache, whose answers live for
seconds anyway). A failed read fails every caller waiting on it; a caller that is cancelled
leaves the others waiting, and does not stop the read. Reads run in a context of their own,
not in the first caller's (its log fields, say).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One lookup per key at a time; concurrent callers of that key share its answer."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    async def do(self, key: K, fetch: Callable[[], Coroutine[Any, Any, V]]) -> V:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(fetch(), context=contextvars.Context())
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
            # read here, so a lookup that failed after every caller gave up is not logged as
            # an exception nobody retrieved
            flight.add_done_callback(lambda t: t.cancelled() or t.exception())
        # shielded: a caller that gives up does not cancel the lookup the others wait for
        return await asyncio.shield(flight)

    def in_flight(self) -> int:
        return len(self._flights)


class BatchLoader(Generic[K, V]):
    """``get(key)`` calls made in one turn of the event loop are answered by one ``load``."""

    def __init__(
        self, load: Callable[[list[K]], Coroutine[Any, Any, Mapping[K, V]]], max_batch: int = 1000
    ) -> None:
        self._load = load
        self.max_batch = max_batch
        self._waiting: list[tuple[K, asyncio.Future[V | None]]] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V | None] = loop.create_future()
        self._waiting.append((key, future))
        if not self._scheduled:
            # on the next turn of the loop: the callers of this turn join the batch
            self._scheduled = True
            loop.call_soon(self._start)
        return await future

    def _start(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, []
        by_key: dict[K, list[asyncio.Future[V | None]]] = {}
        for key, future in waiting:
            by_key.setdefault(key, []).append(future)
        keys = list(by_key)
        for i in range(0, len(keys), self.max_batch):
            batch = {key: by_key[key] for key in keys[i : i + self.max_batch]}
            task = asyncio.get_running_loop().create_task(
                self._answer(batch), context=contextvars.Context()
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _answer(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        live = {k: fs for k, fs in batch.items() if any(not f.done() for f in fs)}
        if not live:
            return
        try:
            found = await self._load(list(live))
        except Exception as exc:
            for futures in live.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): nobody waits forever
            for futures in live.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in live.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(key))
