"""Servers that cannot serve zapbus: found at start, logged once, reported by ``/readyz``.

A Baileys server may answer every call and still be of no use: WAHA Core accepts only the
session named ``default`` and signs no webhook, so every create zapbus sends it is refused.
At start the worker asks each server once (``Dialect.check_fit``: WAHA's ``GET
/api/server/version``), again every ``every_seconds`` until it answers; a create refused with
Core's words marks the server the same way later (``zapbus/dialects/waha.py``). The first
finding is logged as an error naming what is required; ``/readyz`` stays 503 with the reason.
"""

from __future__ import annotations

import logging

from services.session_worker.server_pool import ServerPool
from zapbus.dialects.errors import BaileysError
from zapbus.supervisor import Stoppable

log = logging.getLogger("zapbus.session_worker")


class FitnessCheck(Stoppable):
    def __init__(self, servers: ServerPool, every_seconds: float) -> None:
        super().__init__()
        self.servers = servers
        self.every = every_seconds

    async def run(self) -> None:
        unasked = dict(self.servers.servers)
        while unasked:
            for name, server in list(unasked.items()):
                try:
                    await server.dialect.check_fit()  # marks (and logs) an unfit server
                except BaileysError as exc:
                    log.debug("cannot ask %r what it is yet: %s", name, exc.reason)
                    continue
                del unasked[name]
            if unasked and await self.pause(self.every):
                return
        while not await self.pause(3600.0):
            pass  # every server answered; idle until stopped


def why_unfit(servers: ServerPool) -> str | None:
    """Why the worker cannot do its work: each unfit server with its reason; None if none."""
    unfit = [f"{n}: {s.dialect.unfit}" for n, s in servers.servers.items() if s.dialect.unfit]
    return "; ".join(unfit) or None
