"""Bearer API keys: every ``/v1`` request is scoped to the tenant its key belongs to.

A known key is remembered for ``ZAPBUS_API_KEY_CACHE_SECONDS`` (5 s by default) so that a
request does not pay a database round trip for it; a rotated or revoked key therefore stops
working within that time on every replica. An unknown key is remembered as unknown for
``ZAPBUS_UNKNOWN_API_KEY_CACHE_SECONDS`` (2 s), so a flood of bad keys costs one query per key
and period, not one per request; a key created meanwhile works once that time has passed.
Requests with the same key that miss the cache together (a burst on a cold or just expired
cache) share one lookup (``SingleFlight``).

A client token (``services/gateway/client_tokens.py``) stands for its tenant on the three
read-only routes of its one connection: as ``Authorization: Bearer`` or, for ``<img src>`` and
``EventSource``, as ``?token=`` (which takes nothing else). Another route: 403; another
connection: 404; expired or forged: 401. Nothing here logs it (the access log has the route
template, never the path or query).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from services.gateway import client_tokens
from services.gateway.client_tokens import ClientToken
from zapbus.coalesce import SingleFlight
from zapbus.httpkit import problem
from zapbus.runtime import pool_key
from zapbus.tenants import Tenant, tenant_for_key
from zapbus.tokens import hash_api_key

tenant_key = web.RequestKey("tenant", Tenant)
# set when the request came with a client token rather than an API key
client_token_key = web.RequestKey("client_token", ClientToken)
# the key client tokens are signed with (client_tokens.signing_key)
token_signing_key = web.AppKey("client_token_signing_key", bytes)
# what a client token may do: (method, route template)
CLIENT_TOKEN_ROUTES = frozenset(
    (method, route)
    for method in ("GET", "HEAD")
    for route in (
        "/v1/connections/{id}",
        "/v1/connections/{id}/qr",
        "/v1/connections/{id}/events",
    )
)
_MAX_CACHED = 10_000


class KeyCache:
    """API key digest -> tenant for ``ttl_seconds``; unknown digests for ``unknown_ttl_seconds``
    (kept apart, so a flood of bad keys cannot push the good ones out)."""

    def __init__(self, ttl_seconds: float, unknown_ttl_seconds: float = 0.0) -> None:
        self.ttl = ttl_seconds
        self.unknown_ttl = unknown_ttl_seconds
        self._known: dict[bytes, tuple[Tenant, float]] = {}
        self._unknown: dict[bytes, float] = {}
        self.lookups: SingleFlight[bytes, Tenant | None] = SingleFlight()

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
    return await cache.lookups.do(digest, lambda: _look_up(request.app[pool_key], cache, key))


async def _look_up(pool: asyncpg.Pool, cache: KeyCache, key: str) -> Tenant | None:
    tenant = await tenant_for_key(pool, key)
    cache.put(hash_api_key(key), tenant)
    return tenant


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header and "token" in request.query:
        token = request.query["token"]
        if not client_tokens.looks_like(token):
            return _unauthorized("?token= takes a client token only; send an API key as header")
        return await _with_client_token(request, handler, token)
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return _unauthorized("send 'Authorization: Bearer <api key>'")
    if client_tokens.looks_like(key.strip()):
        return await _with_client_token(request, handler, key.strip())
    tenant = await _tenant(request, key.strip())
    if tenant is None:
        return _unauthorized("unknown API key")
    request[tenant_key] = tenant
    return await handler(request)


async def _with_client_token(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    token: str,
) -> web.StreamResponse:
    try:
        claims = client_tokens.verify(request.app[token_signing_key], token)
    except client_tokens.ExpiredToken:
        return _unauthorized("the client token has expired; ask for a new one")
    except client_tokens.InvalidToken:
        return _unauthorized("not a valid client token")
    resource = request.match_info.route.resource
    if resource is None:  # no such route (404) or method (405): the router says so
        return await handler(request)
    if (request.method, resource.canonical) not in CLIENT_TOKEN_ROUTES:
        return problem(
            403,
            "client-token-scope",
            "Forbidden",
            "a client token only reads its connection: GET /v1/connections/{id}, /qr, /events",
        )
    try:
        same = uuid.UUID(request.match_info["id"]) == claims.connection_id
    except (KeyError, ValueError):
        same = False
    if not same:  # the same answer as a connection of another tenant
        return problem(404, "connection-not-found", "Connection not found")
    request[tenant_key] = Tenant(id=claims.tenant_id, name="")
    request[client_token_key] = claims
    return await handler(request)
