"""Bearer API keys: every ``/v1`` request is scoped to the tenant its key belongs to.

A known key is remembered for ``ZAPBUS_API_KEY_CACHE_SECONDS`` (5 s by default) so that a
request does not pay a database round trip for it; a rotated or revoked key therefore stops
working within that time on every replica. An unknown key is remembered as unknown for
``ZAPBUS_UNKNOWN_API_KEY_CACHE_SECONDS`` (2 s), so a flood of bad keys costs one query per key
and period, not one per request; a key created meanwhile works once that time has passed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from zapbus.httpkit import problem
from zapbus.runtime import pool_key
from zapbus.tenants import Tenant, tenant_for_key
from zapbus.tokens import hash_api_key

tenant_key = web.RequestKey("tenant", Tenant)
_MAX_CACHED = 10_000


class KeyCache:
    """API key digest -> tenant for ``ttl_seconds``; unknown digests for ``unknown_ttl_seconds``
    (kept apart, so a flood of bad keys cannot push the good ones out)."""

    def __init__(self, ttl_seconds: float, unknown_ttl_seconds: float = 0.0) -> None:
        self.ttl = ttl_seconds
        self.unknown_ttl = unknown_ttl_seconds
        self._known: dict[bytes, tuple[Tenant, float]] = {}
        self._unknown: dict[bytes, float] = {}

    def get(self, digest: bytes) -> Tenant | None:
        hit = self._known.get(digest)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def is_unknown(self, digest: bytes) -> bool:
        """True while this digest is remembered as belonging to no tenant."""
        return self._unknown.get(digest, 0.0) >= time.monotonic()

    def put(self, digest: bytes, tenant: Tenant | None) -> None:
        """Remember a lookup's answer (a tenant, or None for an unknown key)."""
        now = time.monotonic()
        if tenant is None:
            if self.unknown_ttl > 0:
                if len(self._unknown) >= _MAX_CACHED:
                    self._unknown.clear()
                self._unknown[digest] = now + self.unknown_ttl
            return
        self._unknown.pop(digest, None)
        if self.ttl <= 0:
            return
        if len(self._known) >= _MAX_CACHED:
            self._known.clear()
        self._known[digest] = (tenant, now + self.ttl)


key_cache_key = web.AppKey("key_cache", KeyCache)


def _unauthorized(detail: str) -> web.Response:
    resp = problem(401, "unauthorized", "Unauthorized", detail)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="zapbus"'
    return resp


async def _tenant(request: web.Request, key: str) -> Tenant | None:
    cache = request.app[key_cache_key]
    digest = hash_api_key(key)
    tenant = cache.get(digest)
    if tenant is not None or cache.is_unknown(digest):
        return tenant
    tenant = await tenant_for_key(request.app[pool_key], key)
    cache.put(digest, tenant)
    return tenant


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return _unauthorized("send 'Authorization: Bearer <api key>'")
    tenant = await _tenant(request, key.strip())
    if tenant is None:
        return _unauthorized("unknown API key")
    request[tenant_key] = tenant
    return await handler(request)
