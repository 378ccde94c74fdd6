"""Outbound endpoints: the webhooks zapbus sends to the tenants' backends, and what the
gateway, the notifier and the CLI share of them (inbound webhooks from the Baileys servers are
``services/webhook/``).

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


# IPv6 ranges whose last 32 bits are an IPv4 address that the packet ends up at: IPv4-mapped
# (::ffff:0:0/96), IPv4-translated (::ffff:0:0:0/96), IPv4-compatible (::/96) and the NAT64
# well-known prefix (64:ff9b::/96). The IPv4 address inside is what is judged.
_EMBEDS_IPV4_LAST_32 = tuple(
    ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96")
)
# Refused whatever they hold: local-use NAT64 (RFC 8215; the IPv4 address can sit at several
# places) and the deprecated site-local range (a private network by another name).
_NEVER_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b:1::/48", "fec0::/10"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (NAT64, 6to4, mapped, compatible), if any."""
    if ip.sixtofour is not None:  # 2002::/16
        return ip.sixtofour
    if any(ip in net for net in _EMBEDS_IPV4_LAST_32):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(address: str) -> bool:
    """A global unicast address (not loopback, private, link-local, shared, metadata...).

    An IPv6 address that embeds an IPv4 one (NAT64, 6to4, IPv4-mapped, -translated or
    -compatible) is judged by the IPv4 address it leads to; local-use NAT64 and site-local
    addresses are never public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NEVER_PUBLIC_V6):
            return False
        if (inner := _embedded_ipv4(ip)) is not None:
            return inner.is_global and not inner.is_multicast
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
