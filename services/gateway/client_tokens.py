"""Client tokens: browser-safe, read-only access to one connection until an expiry.

A tenant's API key can create and delete every connection, so it must not reach a browser. A
client token is minted with that key (``POST /v1/connections/{id}/client-token``) and allows
only ``GET /v1/connections/{id}``, its ``/qr`` and its ``/events`` until it expires (at most
24 h). It is checked without a database: ``zbc_`` + base64url(version, tenant id, connection
id, expiry) + ``.`` + base64url(HMAC-SHA256 of that, truncated to 24 bytes), keyed by
``ZAPBUS_CLIENT_TOKEN_SECRET`` (or, when empty, a key derived from ``ZAPBUS_WEBHOOK_SECRET``).
It cannot be revoked one by one: a new secret ends every token at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
import uuid
from datetime import UTC, datetime

import msgspec

from zapbus.config import Settings

PREFIX = "zbc_"
VERSION = 1
MAX_TTL_SECONDS = 24 * 3600
_LAYOUT = struct.Struct(">B16s16sQ")  # version, tenant id, connection id, expiry (unix s)
_MAC_BYTES = 24


class ClientToken(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: uuid.UUID
    connection_id: uuid.UUID
    expires: int  # unix seconds

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, UTC)


class InvalidToken(Exception):
    """Not a token this deployment signed (malformed, forged, or signed with another key)."""


class ExpiredToken(Exception):
    """A genuine token past its expiry."""


def signing_key(settings: Settings) -> bytes:
    """The key client tokens are signed with (domain-separated from any other use)."""
    base = settings.client_token_secret or settings.webhook_secret
    return hmac.new(base.encode(), b"zapbus client token v1", hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest()[:_MAC_BYTES])


def mint(
    key: bytes,
    tenant_id: uuid.UUID,
    connection_id: uuid.UUID,
    ttl_seconds: int,
    now: float | None = None,
) -> tuple[str, ClientToken]:
    """A token for one connection, valid ``ttl_seconds`` from ``now``."""
    expires = int((time.time() if now is None else now) + ttl_seconds)
    payload = _b64(_LAYOUT.pack(VERSION, tenant_id.bytes, connection_id.bytes, expires))
    token = ClientToken(tenant_id=tenant_id, connection_id=connection_id, expires=expires)
    return f"{PREFIX}{payload}.{_mac(key, payload)}", token


def looks_like(credential: str) -> bool:
    """A client token, not an API key (which starts with ``zb_``)."""
    return credential.startswith(PREFIX)


def verify(key: bytes, token: str, now: float | None = None) -> ClientToken:
    """The token's claims; InvalidToken or ExpiredToken otherwise (the signature first)."""
    payload, dot, mac = token.removeprefix(PREFIX).partition(".")
    if not (looks_like(token) and dot and payload.isascii() and mac.isascii()):
        raise InvalidToken
    if not hmac.compare_digest(_mac(key, payload).encode(), mac.encode()):
        raise InvalidToken
    try:
        version, tenant, connection, expires = _LAYOUT.unpack(_unb64(payload))
    except (binascii.Error, struct.error, ValueError):
        raise InvalidToken from None
    if version != VERSION:
        raise InvalidToken
    if expires <= (time.time() if now is None else now):
        raise ExpiredToken
    return ClientToken(
        tenant_id=uuid.UUID(bytes=tenant),
        connection_id=uuid.UUID(bytes=connection),
        expires=expires,
    )
