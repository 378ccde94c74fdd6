"""One interface to every Baileys server zapbus can drive, whatever HTTP and webhook dialect it
speaks. Each dialect is one module in this package holding everything about that server: its
client calls and its webhook parsing (``seed.py``, ``evolution.py``, ``waha.py``, ``fazer.py``).
Supporting a fifth server means adding one file and naming it in ``KINDS``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import ClassVar, Literal

import aiohttp
import msgspec

from zapbus.dialects.reports import Delivery
from zapbus.servers import public_url

log = logging.getLogger("zapbus.dialects")

Login = Literal["qr", "code"]


class ServerSession(msgspec.Struct, frozen=True):
    """A session as the Baileys server reports it; ``state`` in the server's own words."""

    name: str
    state: str | None = None


class SessionList(list[ServerSession]):
    """A server's list of sessions. ``unreadable``: items of its answer that could not be read
    (no name we can find): any of them may be a session zapbus wants, so a list with any is
    not ``complete`` and no session may be judged missing from it."""

    def __init__(self, sessions: Iterable[ServerSession] = (), unreadable: int = 0) -> None:
        super().__init__(sessions)
        self.unreadable = unreadable

    @property
    def complete(self) -> bool:
        return self.unreadable == 0


class CreateSessionRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    webhook_url: str
    login: Login = "qr"
    phone_number: str | None = None  # E.164 with its "+", for code login (and fazer)
    # A secret of this connection generation that the server puts on its webhooks (WAHA's
    # HMAC key, fazer's verify token), checked by ``Dialect.parse_webhook``.
    webhook_secret: str = ""


class CreateSessionResult(msgspec.Struct, frozen=True, kw_only=True):
    already_existed: bool
    pairing_code: str | None = None  # when the server answers the create with it


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """A server's answer to a health check: up or not, and how many sessions it says it holds
    (None when it does not say)."""

    up: bool
    sessions: int | None = None


# A count past this is no server's (and would not fit the int4 columns it is kept in).
MAX_SESSIONS_FIGURE = 2**31 - 1


def sessions_figure(body: object) -> int | None:
    """The session count in a health body: ``sessions`` (or ``data.sessions``) as a number or
    a list; None when absent or not a count (negative, not finite, or past any real server:
    one server's garbage must not stop the pool's bookkeeping)."""
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and "sessions" not in body:
        body = body["data"]
    if not isinstance(body, dict):
        return None
    value = body.get("sessions")
    if isinstance(value, list):
        return len(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_SESSIONS_FIGURE:
        return None
    return int(value)


class Dialect(ABC):
    """A Baileys server's HTTP API (instance side) and its webhooks (class side)."""

    kind: ClassVar[str]
    # Can it link a device by a pairing code typed on the phone (instead of a QR)?
    code_login: ClassVar[bool] = True
    # Can its sessions be read back (list or get)? The reconciler needs it.
    observable: ClassVar[bool] = True
    # Does it key sessions by phone number, one per phone (fazer)? Then a create needs
    # ``phone_number``, and one phone serves one live connection of a tenant (the gateway
    # answers 409 phone-in-use for a second).
    keys_by_phone: ClassVar[bool] = False

    def __init__(
        self, http: aiohttp.ClientSession, base_url: str, api_key: str, timeout_seconds: float
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.short_timeout = aiohttp.ClientTimeout(total=min(10.0, timeout_seconds))
        # Why this server cannot serve zapbus (WAHA Core), once found (``mark_unfit``)
        self.unfit: str | None = None

    async def check_fit(self) -> str | None:
        """Ask the server whether it can serve zapbus: why not (and ``mark_unfit``), or None
        when it can or cannot tell. BaileysError when it does not answer."""
        return None

    def mark_unfit(self, reason: str) -> None:
        """Record why this server cannot serve zapbus; the first time, log it as an error."""
        if self.unfit is None:
            where = public_url(self.base_url)
            log.error("Baileys server %s cannot serve zapbus: %s", where, reason)
        self.unfit = reason

    @abstractmethod
    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        """Create the session (slow: 10-30 s on real servers); 'already exists' is success."""

    @abstractmethod
    async def get_session(self, name: str) -> ServerSession | None:
        """The session called ``name``, with its state when the server says it; None if none."""

    @abstractmethod
    async def list_sessions(self) -> list[ServerSession] | None:
        """Every session the server holds; None when it has no list route. A ``SessionList``
        says whether every item could be read (a plain list: all were)."""

    @abstractmethod
    async def delete_session(self, name: str) -> bool:
        """Delete (and log out) the session; False when there was none."""

    async def delete_session_of(self, name: str, phone_number: str | None) -> bool:
        """``delete_session``, given the connection's phone number too (servers keyed by
        phone number need it; the others ignore it)."""
        return await self.delete_session(name)

    async def request_pairing_code(self, name: str, phone_number: str) -> str:
        """A pairing code for ``phone_number`` (RetryableError until the server can)."""
        raise NotImplementedError(f"{self.kind} cannot link by pairing code")

    async def fetch_qr(self, name: str) -> str | None:
        """The QR the server shows now, where the dialect does not push it; None if none."""
        return None

    @abstractmethod
    async def healthy(self) -> bool:
        """Does the server answer?"""

    async def health(self) -> Health:
        """Up or not, with the server's session count where its health route gives one."""
        return Health(up=await self.healthy())

    async def session_exists(self, name: str) -> bool:
        return await self.get_session(name) is not None

    @classmethod
    @abstractmethod
    def parse_webhook(cls, body: bytes, headers: Mapping[str, str], secret: str) -> Delivery:
        """What one webhook delivery reports. ``secret`` is the connection generation's
        ``webhook_secret``. Raises ``PayloadError`` (400) or ``SignatureError`` (401)."""
