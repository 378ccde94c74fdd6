"""The original design, kept only to be measured: ``POST /v1/connections`` waits for the Baileys
server's ``POST /sessions`` (10-30 s) with an 8 s timeout, and fails when it runs out.

``python -m bench.original`` with ``BENCH_PORT``, ``BENCH_SIM_URL`` and ``BENCH_SIM_KEY`` (and
``BENCH_TIMEOUT``, 8 s unless given: a smoke run shortens it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from zapbus.httpkit import bare_healthz, serve_bare

TIMEOUT = aiohttp.ClientTimeout(total=float(os.environ.get("BENCH_TIMEOUT", "8")))
http_key = web.AppKey("http", aiohttp.ClientSession)


async def create(request: web.Request) -> web.Response:
    await request.read()
    name = f"orig_{uuid.uuid4().hex}"
    body = {"name": name, "webhookUrl": "http://127.0.0.1:9/unused"}
    headers = {"X-API-Key": os.environ["BENCH_SIM_KEY"]}
    try:
        async with request.app[http_key].post(
            os.environ["BENCH_SIM_URL"] + "/sessions", json=body, headers=headers, timeout=TIMEOUT
        ) as resp:
            await resp.read()
            if resp.status >= 300:
                return web.json_response({"error": f"baileys {resp.status}"}, status=502)
    except TimeoutError:
        return web.json_response({"error": "baileys timed out"}, status=504)
    return web.json_response({"name": name, "status": "connecting"}, status=201)


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    # No connection limit: the generous reading of the original design.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        app[http_key] = http
        yield


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(http_ctx)
    app.router.add_post("/v1/connections", create)
    app.router.add_get("/healthz", bare_healthz)
    return app


if __name__ == "__main__":
    serve_bare(create_app())
