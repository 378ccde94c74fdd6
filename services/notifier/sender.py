"""One HTTP attempt of a webhook delivery, signed the Standard Webhooks way.

Redirects are not followed, a response body is read up to ``MAX_RESPONSE_BYTES``, and unless
private addresses are allowed every connection is checked against the addresses it resolves
to (so DNS cannot be re-pointed at an internal host after the URL was accepted).
"""

from __future__ import annotations

import email.utils
import ipaddress
import socket
import time
from datetime import UTC, datetime

import aiohttp
import msgspec
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from standardwebhooks import Webhook

from zapbus.endpoints import UnsafeAddress, UnsafeUrl, check_address, parse_url

MAX_RESPONSE_BYTES = 4096
RETRYABLE_STATUS = frozenset({408, 429})


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """What one attempt gave: an HTTP status, or an error before any answer."""

    status_code: int | None
    error: str | None
    duration_ms: float
    retryable: bool
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class PublicOnlyResolver(ThreadedResolver):
    """Resolves names, refusing any that lead to a non-public address."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await super().resolve(host, port, family)
        for info in infos:
            check_address(host, str(info["host"]))
        return infos


def signature(secrets: list[str], msg_id: str, timestamp: datetime, body: bytes) -> str:
    """``v1,<sig>`` per secret, space-separated (the old secret too, during a rotation)."""
    text = body.decode()
    return " ".join(Webhook(s).sign(msg_id, timestamp, text) for s in secrets)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Sender:
    """Holds the HTTP client; ``send`` makes one attempt and never raises."""

    def __init__(self, timeout_seconds: float, allow_private: bool) -> None:
        self.allow_private = allow_private
        connector = aiohttp.TCPConnector(
            resolver=None if allow_private else PublicOnlyResolver(),
            limit=0,
            use_dns_cache=False,
        )
        self.http = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.http.close()

    async def send(self, url: str, secrets: list[str], msg_id: str, body: bytes) -> Attempt:
        start = time.perf_counter()

        def took() -> float:
            return round((time.perf_counter() - start) * 1000, 1)

        try:
            host = parse_url(url, self.allow_private).raw_host or ""
            if not self.allow_private and not _is_name(host):
                check_address(host, host)  # an address literal never reaches the resolver
        except (UnsafeUrl, UnsafeAddress) as exc:
            return Attempt(
                status_code=None, error=f"refused: {exc}", duration_ms=took(), retryable=False
            )
        now = datetime.now(UTC).replace(microsecond=0)
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature(secrets, msg_id, now, body),
            "content-type": "application/json",
            "user-agent": "zapbus-webhooks/1",
        }
        try:
            async with self.http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.content.read(MAX_RESPONSE_BYTES)  # read a little, never all
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            return Attempt(status_code=None, error="timeout", duration_ms=took(), retryable=True)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, UnsafeAddress):
                return Attempt(
                    status_code=None,
                    error=f"refused: {exc.os_error}",
                    duration_ms=took(),
                    retryable=False,
                )
            return Attempt(
                status_code=None,
                error=f"connection error: {exc}"[:300],
                duration_ms=took(),
                retryable=True,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Attempt(
                status_code=None,
                error=f"connection error: {exc!r}"[:300],
                duration_ms=took(),
                retryable=True,
            )
        return Attempt(
            status_code=status,
            error=f"redirect not followed ({status})" if 300 <= status < 400 else None,
            duration_ms=took(),
            retryable=status >= 500 or status in RETRYABLE_STATUS,
            retry_after=retry_after if status in (429, 503) else None,
        )


def _is_name(host: str) -> bool:
    """A host name (resolved, and checked, by the resolver) rather than an address."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True
    return False
