"""Bearer API keys: every ``/v1`` request is scoped to the tenant its key belongs to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from zapbus.httpkit import problem
from zapbus.runtime import pool_key
from zapbus.tenants import Tenant, tenant_for_key

tenant_key = web.RequestKey("tenant", Tenant)


def _unauthorized(detail: str) -> web.Response:
    resp = problem(401, "unauthorized", "Unauthorized", detail)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="zapbus"'
    return resp


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
    tenant = await tenant_for_key(request.app[pool_key], key.strip())
    if tenant is None:
        return _unauthorized("unknown API key")
    request[tenant_key] = tenant
    return await handler(request)
