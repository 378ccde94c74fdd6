"""The webhook service: Baileys server webhooks -> SESSION_EVENTS."""

from __future__ import annotations

from aiohttp import web

from services.webhook.handlers import receive
from services.webhook.metrics import WebhookMetrics, metrics_key
from zapbus.config import Settings, require_own_secrets
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import nats_ctx, settings_key


def create_app(settings: Settings) -> web.Application:
    require_own_secrets(settings)  # it checks webhook tokens: the built-in secret is public
    app = base_app("webhook", client_max_size=settings.webhook_max_body_bytes)
    app[settings_key] = settings
    app[metrics_key] = WebhookMetrics(app[registry_key])
    app.cleanup_ctx.append(nats_ctx("webhook"))
    app.router.add_post("/webhooks/baileys/{connection_id}/{generation}/{token}", receive)
    return app
