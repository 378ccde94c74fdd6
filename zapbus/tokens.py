"""Webhook URL tokens and Baileys session names, derived without a database.

The token is an HMAC-SHA256 (server secret) over connection id and generation (and, in a pool,
the server the URL names), so the webhook service can verify a delivery in constant time from
the URL alone, a URL handed out for one generation is useless for another, and the server it
names cannot be changed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from urllib.parse import quote


def webhook_token(
    secret: str, connection_id: uuid.UUID, generation: int, server: str | None = None
) -> str:
    signed = f"{connection_id}:{generation}" + ("" if server is None else f":{server}")
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:24]).decode().rstrip("=")


def verify_webhook_token(
    secret: str, connection_id: uuid.UUID, generation: int, token: str, server: str | None = None
) -> bool:
    """``server``: the URL's ``?server=`` (None when it has none)."""
    expected = webhook_token(secret, connection_id, generation, server)
    return hmac.compare_digest(expected.encode(), token.encode())


def webhook_signing_key(secret: str, connection_id: uuid.UUID, generation: int) -> str:
    """A secret of one connection generation that the server puts on its webhooks, where its
    dialect can (WAHA's HMAC key, fazer's verify token); derived, so never stored."""
    mac = hmac.new(secret.encode(), f"sign:{connection_id}:{generation}".encode(), hashlib.sha256)
    return mac.hexdigest()


def webhook_url(
    base: str, secret: str, connection_id: uuid.UUID, generation: int, server: str | None = None
) -> str:
    """The URL given to the Baileys server for one generation of a connection; in a pool of
    several servers it names the server (``?server=``), so the webhook service asks that one
    for what the server does not push (WAHA's QR)."""
    token = webhook_token(secret, connection_id, generation, server)
    url = f"{base.rstrip('/')}/webhooks/baileys/{connection_id}/{generation}/{token}"
    return url if server is None else f"{url}?server={quote(server, safe='')}"


def session_name(connection_id: uuid.UUID, generation: int) -> str:
    """Baileys session name of one generation: unique, stable, ``[a-z0-9_]`` only."""
    return f"zb_{connection_id.hex}_g{generation}"


def new_api_key() -> str:
    return "zb_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
