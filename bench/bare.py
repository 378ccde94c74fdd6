"""The webhook floor: a bare aiohttp endpoint on the webhook route that parses the JSON body and
answers 200, nothing else. ``python -m bench.bare`` with ``BENCH_PORT``.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from zapbus.httpkit import bare_healthz, serve_bare


async def receive(request: web.Request) -> web.Response:
    msgspec.json.decode(await request.read())
    return web.Response(body=b'{"ok":true}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/webhooks/baileys/{connection_id}/{generation}/{token}", receive)
    app.router.add_get("/healthz", bare_healthz)
    return app


if __name__ == "__main__":
    serve_bare(create_app())
