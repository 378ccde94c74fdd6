"""A circuit breaker in front of the Baileys server.

After ``threshold`` consecutive "server down" errors it opens; while open, commands wait (they
are not failed and do not spend attempts) and one prober asks ``GET /health`` every
``probe_seconds``; the first healthy answer closes it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

log = logging.getLogger("zapbus.session_worker")


class Breaker:
    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        threshold: int,
        probe_seconds: float,
        gauge: Gauge | None = None,
        label: str = "",
    ) -> None:
        self.probe = probe
        self.label = f" {label!r}" if label else ""
        self.threshold = threshold
        self.probe_seconds = probe_seconds
        self.gauge = gauge
        self._failures = 0
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    def record(self, server_down: bool) -> None:
        """Count the outcome of one call to the server."""
        if not server_down:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self.threshold and not self.is_open:
            log.warning(
                "Baileys server%s looks down after %d errors: breaker open",
                self.label,
                self._failures,
            )
            self._closed.clear()
            if self.gauge is not None:
                self.gauge.set(1)
            self._prober = asyncio.create_task(self._probe_until_healthy())

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _probe_until_healthy(self) -> None:
        while True:
            await asyncio.sleep(self.probe_seconds)
            if await self.probe():
                break
        log.info("Baileys server%s healthy again: breaker closed", self.label)
        self._failures = 0
        self._closed.set()
        if self.gauge is not None:
            self.gauge.set(0)

    async def close(self) -> None:
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
            try:
                await self._prober
            except asyncio.CancelledError:
                pass
