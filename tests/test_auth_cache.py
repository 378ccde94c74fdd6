"""API keys: an unknown key is remembered as unknown for a few seconds, so a flood of bad keys
does not query Postgres on every request, and a key created meanwhile works right after."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from services.gateway.auth import KeyCache, auth_middleware, key_cache_key, tenant_key
from tests.stack import CountingPool, wait_for
from zapbus.runtime import pool_key
from zapbus.tenants import create_tenant
from zapbus.tokens import new_api_key

UNKNOWN_TTL = 2.0


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"tenant": request[tenant_key].name})


async def _client(pool: CountingPool, aiohttp_client: Any) -> TestClient[Any, Any]:
    """The gateway's auth middleware and key cache, in front of a route naming the tenant."""
    app = web.Application(middlewares=[auth_middleware])
    app[pool_key] = cast(asyncpg.Pool, pool)
    app[key_cache_key] = KeyCache(ttl_seconds=60.0, unknown_ttl_seconds=UNKNOWN_TTL)
    app.router.add_get("/v1/whoami", whoami)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


async def test_a_flood_of_one_unknown_key_queries_postgres_once(
    pool: asyncpg.Pool, aiohttp_client: Any
) -> None:
    counting = CountingPool(pool)
    client = await _client(counting, aiohttp_client)
    bad = {"Authorization": f"Bearer {new_api_key()}"}
    for _ in range(50):
        async with client.get("/v1/whoami", headers=bad) as r:
            assert r.status == 401
    assert counting.statements == 1


async def test_a_key_created_after_it_was_cached_as_unknown_works_within_the_ttl(
    pool: asyncpg.Pool, aiohttp_client: Any
) -> None:
    counting = CountingPool(pool)
    client = await _client(counting, aiohttp_client)
    key = new_api_key()
    auth = {"Authorization": f"Bearer {key}"}
    async with client.get("/v1/whoami", headers=auth) as r:
        assert r.status == 401  # unknown, and now remembered as such
    await create_tenant(pool, "late", api_key=key)
    created = time.monotonic()
    queries = counting.statements
    async with client.get("/v1/whoami", headers=auth) as r:
        assert r.status == 401  # still remembered as unknown: no query
    assert counting.statements == queries

    async def works() -> bool:
        async with client.get("/v1/whoami", headers=auth) as r:
            return r.status == 200 and (await r.json())["tenant"] == "late"

    await wait_for("the new key to be accepted", works, timeout=UNKNOWN_TTL + 2.0, every=0.05)
    assert time.monotonic() - created <= UNKNOWN_TTL + 1.0
    queries = counting.statements
    async with client.get("/v1/whoami", headers=auth) as r:
        assert r.status == 200
    assert counting.statements == queries  # a known key is cached too


async def test_a_burst_with_a_cold_cache_looks_the_key_up_once(
    pool: asyncpg.Pool, aiohttp_client: Any
) -> None:
    """A thousand creates at once, each with the same key, before any answer is cached: one
    lookup, not one per request (it was 10 % of the gateway's CPU in the burst benchmark)."""
    counting = CountingPool(pool)
    client = await _client(counting, aiohttp_client)
    _, key = await create_tenant(pool, "burst")
    auth = {"Authorization": f"Bearer {key}"}

    async def one() -> int:
        async with client.get("/v1/whoami", headers=auth) as r:
            return r.status

    assert await asyncio.gather(*(one() for _ in range(100))) == [200] * 100
    assert counting.statements == 1
