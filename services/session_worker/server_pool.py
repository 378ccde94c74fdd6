"""The Baileys servers this worker talks to: one client, breaker and create cap per server.

A generation's calls all go to the server it was placed on (``placement.py``); this module
only holds the per-server machinery, so one slow or dead server never stalls calls to the
others. ``down`` mirrors the pool manager's view (``manager.py``): a server whose health probe
fails is not called, whatever this replica's breaker says yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import Gauge

from services.session_worker.breaker import Breaker
from zapbus.dialects.base import Dialect
from zapbus.servers import ServerSpec


class Server:
    def __init__(
        self,
        spec: ServerSpec,
        dialect: Dialect,
        breaker_threshold: int,
        probe_seconds: float,
        max_concurrent_creates: int,
        breaker_gauge: Gauge | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dialect = dialect
        self.breaker = Breaker(
            dialect.healthy,
            threshold=breaker_threshold,
            probe_seconds=probe_seconds,
            gauge=breaker_gauge.labels(spec.name) if breaker_gauge is not None else None,
            label=spec.name,
        )
        if breaker_gauge is not None:
            breaker_gauge.labels(spec.name).set(0)
        self.create_slots = asyncio.Semaphore(max_concurrent_creates)
        # monotonic time since when the pool manager sees it unreachable (None: reachable)
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        """May calls go to it now? (breaker closed, and the last health probe answered)"""
        return not self.breaker.is_open and self.down_since is None

    def down_for(self) -> float:
        """Seconds it has been seen unreachable (0 when reachable)."""
        if self.down_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self.down_since

    async def wait_available(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for it to be callable; True if it is."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self.available:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            if self.breaker.is_open:
                try:
                    async with asyncio.timeout(min(left, 0.5)):
                        await self.breaker.wait_closed()
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(min(left, 0.2))
        return True


class ServerPool:
    """Every configured server by name."""

    def __init__(
        self,
        specs: tuple[ServerSpec, ...],
        make_dialect: Callable[[ServerSpec], Dialect],
        breaker_threshold: int,
        probe_seconds: float,
        max_concurrent_creates: int,
        breaker_gauge: Gauge | None = None,
    ) -> None:
        self.servers = {
            spec.name: Server(
                spec,
                make_dialect(spec),
                breaker_threshold,
                probe_seconds,
                max_concurrent_creates,
                breaker_gauge,
            )
            for spec in specs
        }

    @property
    def specs(self) -> tuple[ServerSpec, ...]:
        return tuple(s.spec for s in self.servers.values())

    @property
    def only(self) -> Server | None:
        """The server of a pool of one, else None."""
        return next(iter(self.servers.values())) if len(self.servers) == 1 else None

    def get(self, name: str | None) -> Server | None:
        return self.servers.get(name) if name is not None else None

    def holding(self, name: str | None) -> list[Server]:
        """The servers that may hold a session placed on ``name``: that one; when the
        placement is not known (a session made before placements were recorded), the only
        server, or every server (deleting is idempotent)."""
        if name is not None:
            found = self.servers.get(name)
            return [found] if found is not None else []
        return list(self.servers.values())

    @property
    def observable(self) -> bool:
        return all(s.dialect.observable for s in self.servers.values())

    @property
    def kind(self) -> str:
        return next(iter(self.servers.values())).dialect.kind

    async def close(self) -> None:
        for server in self.servers.values():
            await server.breaker.close()
