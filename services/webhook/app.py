"""The webhook service: Baileys server webhooks -> SESSION_EVENTS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.webhook.app_keys import dialect_key, publisher_key, server_dialects_key
from services.webhook.handlers import PUBLISH_TRY_SECONDS, receive
from services.webhook.metrics import WebhookMetrics, metrics_key
from zapbus.batchpub import BatchPublisher, GroupCommit
from zapbus.config import Settings, require_own_secrets
from zapbus.dialects import make_dialect
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import js_key, nats_ctx, settings_key


async def dialect_ctx(app: web.Application) -> AsyncIterator[None]:
    """The servers' dialect (one per server of the pool), with an HTTP client for the QR some
    servers do not push: it is fetched from the server the session is on."""
    settings = app[settings_key]
    async with aiohttp.ClientSession() as http:
        dialects = {
            spec.name: make_dialect(
                settings.baileys_kind,
                http,
                spec.url,
                spec.api_key,
                settings.baileys_timeout_seconds,
            )
            for spec in settings.servers
        }
        app[server_dialects_key] = dialects
        app[dialect_key] = next(iter(dialects.values()))
        yield


async def publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Group commit: the HTTP answer still waits for its event's JetStream ack, but the events
    of concurrent requests share one atomic batch (one fsync with ``sync_interval: always``)."""
    app[publisher_key] = GroupCommit(BatchPublisher(app[js_key], timeout=PUBLISH_TRY_SECONDS))
    yield


def create_app(settings: Settings) -> web.Application:
    require_own_secrets(settings)  # it checks webhook tokens: the built-in secret is public
    app = base_app("webhook", client_max_size=settings.webhook_max_body_bytes)
    app[settings_key] = settings
    app[metrics_key] = WebhookMetrics(app[registry_key])
    app.cleanup_ctx.append(nats_ctx("webhook"))
    app.cleanup_ctx.append(publisher_ctx)
    app.cleanup_ctx.append(dialect_ctx)
    app.router.add_post("/webhooks/baileys/{connection_id}/{generation}/{token}", receive)
    return app
