"""What a simulated server dialect provides: routes, auth, and webhook bodies for events."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiohttp import web

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SessionRegistry, SimSession

# What happens to a simulated session, in Baileys' terms; each dialect renders these as the
# webhooks its real server sends (or none).
Happening = Literal[
    "connecting",  # the socket opens (right after create, and after a disconnect)
    "qr",  # a (new) QR is shown: SimEvent.qr
    "restart_required",  # 515 right after a scan: the normal step before "connected"
    "connected",
    "closed",  # 428: the connection dropped; it reconnects
    "logged_out",  # 401
    "qr_refs_ended",  # 408 "QR refs attempts ended": nobody scanned
    "pairing_code",  # a pairing code was issued: SimEvent.code
    "gave_up",  # WhatsApp unreachable: closes before any QR until the server gives up
]


class SimEvent(msgspec.Struct, frozen=True, kw_only=True):
    what: Happening
    qr: str | None = None
    code: str | None = None


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    """One webhook body to send, with extra headers (a signature of the dialect's own)."""

    body: dict[str, Any]
    headers: dict[str, str] = {}


RegistryOf = Callable[[web.Request], "SessionRegistry"]


class SimDialect:
    """Override what differs from the seed dialect."""

    kind = "seed"
    api_key_header = "X-API-Key"

    def routes(self) -> list[web.RouteDef]:
        """The dialect's HTTP API (handlers reach the registry with ``registry_of``)."""
        raise NotImplementedError

    def protects(self, path: str) -> bool:
        """Does ``path`` need the API key?"""
        return path == "/sessions" or path.startswith("/sessions/")

    def render(self, session: SimSession, event: SimEvent) -> list[Webhook]:
        """The webhook bodies the real server sends when ``event`` happens to ``session``."""
        raise NotImplementedError
