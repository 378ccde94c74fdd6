"""The gateway: the frontend's HTTP API, the web page, and the outbox relay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from services.gateway import client_tokens, pages
from services.gateway.app_keys import hub_key, qr_renderer_key, relay_key, stream_slots_key
from services.gateway.auth import KeyCache, auth_middleware, key_cache_key, token_signing_key
from services.gateway.handlers import add_routes
from services.gateway.live import ChangeHub
from services.gateway.openapi import openapi_handler
from services.gateway.qr import QrRenderer
from services.gateway.sse import StreamSlots
from services.gateway.webhooks import add_webhook_routes
from zapbus.config import Settings, require_client_token_secret
from zapbus.httpkit import base_app, optional_checks_key, refuse_nul, registry_key
from zapbus.relay import OutboxMetrics, OutboxRelay
from zapbus.runtime import (
    Runner,
    js_key,
    nats_ctx,
    pool_ctx,
    relay_pool_ctx,
    relay_pool_key,
    runner_ctx,
    settings_key,
)

STATIC = Path(__file__).with_name("static")
_runner_key = web.AppKey("outbox_runner", Runner)


def _build_relay(app: web.Application) -> OutboxRelay:
    relay = OutboxRelay(
        app[relay_pool_key],
        app[js_key],
        OutboxMetrics(app[registry_key]),
        app[settings_key].names,
        poll_seconds=app[settings_key].outbox_poll_seconds,
    )
    app[relay_key] = relay
    return relay


async def qr_renderer_ctx(app: web.Application) -> AsyncIterator[None]:
    renderer = QrRenderer()
    app[qr_renderer_key] = renderer
    yield
    renderer.close()


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = ChangeHub(app[js_key], app[settings_key].names)
    await hub.start()
    app[hub_key] = hub

    async def end_streams(_: web.Application) -> None:
        await hub.close()  # open SSE streams end, so shutdown does not wait for them

    app.on_shutdown.append(end_streams)
    yield
    await hub.close()


@web.middleware
async def no_store(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """API answers carry QR codes and tenant data: never cache them."""
    response = await handler(request)
    if request.path.startswith("/v1/") and not response.prepared:
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def create_app(settings: Settings) -> web.Application:
    require_client_token_secret(settings)  # it signs client tokens: no public key
    app = base_app("gateway", client_max_size=64 * 1024)
    app[settings_key] = settings
    app[token_signing_key] = client_tokens.signing_key(settings)
    app[key_cache_key] = KeyCache(
        settings.api_key_cache_seconds, settings.unknown_api_key_cache_seconds
    )
    app[stream_slots_key] = StreamSlots(
        settings.sse_max_streams_per_tenant, settings.sse_max_streams_per_client_token
    )
    app[optional_checks_key] = {"nats"}  # creates are accepted into the outbox without it
    app.middlewares.append(no_store)
    app.middlewares.append(auth_middleware)
    app.middlewares.append(refuse_nul)  # NUL in path, query or body: 4xx, not a 500
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(relay_pool_ctx)
    app.cleanup_ctx.append(nats_ctx("gateway"))
    app.cleanup_ctx.append(qr_renderer_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(runner_ctx("outbox_relay", _runner_key, _build_relay))
    add_routes(app)
    add_webhook_routes(app)
    app.router.add_get("/openapi.json", openapi_handler)
    pages.add_routes(app)  # "/", "/connect/{token}", and every answer's security headers
    app.router.add_static("/static/", STATIC)
    return app
