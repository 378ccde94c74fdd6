"""The webhook service: Baileys server webhooks -> SESSION_EVENTS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.webhook.app_keys import dialect_key
from services.webhook.handlers import receive
from services.webhook.metrics import WebhookMetrics, metrics_key
from zapbus.config import Settings, require_own_secrets
from zapbus.dialects import make_dialect
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import nats_ctx, settings_key


async def dialect_ctx(app: web.Application) -> AsyncIterator[None]:
    """The server's dialect, with an HTTP client for the QR some servers do not push."""
    settings = app[settings_key]
    async with aiohttp.ClientSession() as http:
        app[dialect_key] = make_dialect(
            settings.baileys_kind,
            http,
            settings.baileys_url,
            settings.baileys_api_key,
            settings.baileys_timeout_seconds,
        )
        yield


def create_app(settings: Settings) -> web.Application:
    require_own_secrets(settings)  # it checks webhook tokens: the built-in secret is public
    app = base_app("webhook", client_max_size=settings.webhook_max_body_bytes)
    app[settings_key] = settings
    app[metrics_key] = WebhookMetrics(app[registry_key])
    app.cleanup_ctx.append(nats_ctx("webhook"))
    app.cleanup_ctx.append(dialect_ctx)
    app.router.add_post("/webhooks/baileys/{connection_id}/{generation}/{token}", receive)
    return app
