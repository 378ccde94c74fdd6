"""The gateway: the frontend's HTTP API, and the outbox relay that feeds SESSION_CMDS."""

from __future__ import annotations

from aiohttp import web

from services.gateway.auth import auth_middleware
from services.gateway.handlers import add_routes
from services.gateway.outbox import OutboxMetrics, OutboxRelay
from services.gateway.outbox_key import relay_key
from zapbus.config import Settings
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import Runner, js_key, nats_ctx, pool_ctx, pool_key, runner_ctx, settings_key

_runner_key = web.AppKey("outbox_runner", Runner)


def _build_relay(app: web.Application) -> OutboxRelay:
    relay = OutboxRelay(
        app[pool_key],
        app[js_key],
        OutboxMetrics(app[registry_key]),
        poll_seconds=app[settings_key].outbox_poll_seconds,
    )
    app[relay_key] = relay
    return relay


def create_app(settings: Settings) -> web.Application:
    app = base_app("gateway", client_max_size=64 * 1024)
    app[settings_key] = settings
    app.middlewares.append(auth_middleware)
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(nats_ctx("gateway"))
    app.cleanup_ctx.append(runner_ctx("outbox_relay", _runner_key, _build_relay))
    add_routes(app)
    return app
