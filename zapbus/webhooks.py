"""Webhooks to the tenant's backend: what the gateway, the notifier and the CLI share.

Event types, the signing secrets (``whsec_`` + base64), which changes make which events, the
SSRF rules for endpoint URLs (refused when they resolve to loopback, private, link-local or
metadata addresses unless ``ZAPBUS_NOTIFY_ALLOW_PRIVATE``), and the replay of given-up
deliveries.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import socket
import uuid

import asyncpg
import yarl

from proto.changes import ConnectionChanged

STATUS, QR, PAIRING_CODE, DELETED = (
    "connection.status",
    "connection.qr",
    "connection.pairing_code",
    "connection.deleted",
)
EVENT_TYPES = (STATUS, QR, PAIRING_CODE, DELETED)
ALL = "*"
TEST = "webhook.test"
# the order key of deliveries that concern no connection (test events)
NO_CONNECTION = uuid.UUID(int=0)
MAX_URL_LENGTH = 2000


class UnsafeUrl(ValueError):
    """An endpoint URL zapbus will not call; the message says why."""


class UnsafeAddress(OSError):
    """A host resolved to an address zapbus will not call (checked at each connection)."""


def new_secret() -> str:
    """A signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def event_types(change: ConnectionChanged) -> list[str]:
    """The webhook events one change makes (a QR shown with a state change makes two)."""
    types: list[str] = []
    if change.previous_status != change.status:
        types.append(STATUS)
    if change.status == "deleted" and change.previous_status != "deleted":
        types.append(DELETED)
    if change.cause == "qr.updated" and change.status == "qr_ready" and change.qr:
        types.append(QR)
    if change.cause == "pairing_code.updated" and change.pairing_code:
        types.append(PAIRING_CODE)
    return types


def wants(subscribed: list[str], event_type: str) -> bool:
    return ALL in subscribed or event_type in subscribed


def is_public(address: str) -> bool:
    """A global unicast address (not loopback, private, link-local, shared, metadata...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_address(host: str, address: str) -> None:
    if not is_public(address):
        raise UnsafeAddress(
            f"{host} resolves to {address}, not a public address"
            " (ZAPBUS_NOTIFY_ALLOW_PRIVATE=true allows it)"
        )


def parse_url(url: str, allow_private: bool) -> yarl.URL:
    """The URL if its form is acceptable (https, unless private addresses are allowed)."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"url longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError):
        raise UnsafeUrl("not a URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes or not parsed.host or not parsed.is_absolute():
        raise UnsafeUrl(
            "an absolute https:// URL is required"
            + ("" if allow_private else " (http:// only with ZAPBUS_NOTIFY_ALLOW_PRIVATE=true)")
        )
    if parsed.fragment:
        raise UnsafeUrl("a URL without #fragment")
    return parsed


async def check_url(url: str, allow_private: bool) -> str:
    """Refuse (UnsafeUrl) a URL zapbus must not call; the check is repeated at delivery time
    against the addresses actually connected to (DNS rebinding)."""
    parsed = parse_url(url, allow_private)
    if allow_private:
        return url
    host = parsed.raw_host or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parsed.port or 443, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError):
        raise UnsafeUrl(f"{host} does not resolve") from None
    for info in infos:
        try:
            check_address(host, str(info[4][0]))
        except UnsafeAddress as exc:
            raise UnsafeUrl(str(exc)) from None
    return url


async def replay(pool: asyncpg.Pool, webhook_id: str, tenant_id: uuid.UUID | None = None) -> str:
    """Queue a given-up delivery again (same webhook-id), re-enabling its endpoint if it was
    disabled. Returns "replayed", "not-found" or "not-given-up"."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT d.id, d.state, d.endpoint_id FROM webhook_deliveries d"
            " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            " WHERE d.webhook_id = $1 AND ($2::uuid IS NULL OR e.tenant_id = $2) FOR UPDATE",
            webhook_id,
            tenant_id,
        )
        if row is None:
            return "not-found"
        if row["state"] != "given_up":
            return "not-given-up"
        await conn.execute(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now(),"
            " retry_from = now(), claimed_until = NULL, finished_at = NULL WHERE id = $1",
            row["id"],
        )
        await conn.execute(
            "UPDATE webhook_endpoints SET enabled = true, disabled_reason = NULL,"
            " disabled_at = NULL, failing_since = NULL WHERE id = $1 AND NOT enabled",
            row["endpoint_id"],
        )
    return "replayed"


async def given_up(pool: asyncpg.Pool, limit: int = 100) -> list[asyncpg.Record]:
    """Given-up deliveries, newest first (for ``zapbus webhooks failed``)."""
    return list(
        await pool.fetch(
            "SELECT d.webhook_id, d.event_type, d.connection_id, d.attempts, d.last_error,"
            " d.finished_at, e.url, t.name AS tenant FROM webhook_deliveries d"
            " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            " JOIN tenants t ON t.id = e.tenant_id"
            " WHERE d.state = 'given_up' ORDER BY d.id DESC LIMIT $1",
            limit,
        )
    )
