"""The notifier service: connection changes -> signed webhooks to the tenants' backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.notifier.dispatcher import DeliveryPolicy, Dispatcher
from services.notifier.fanout import Fanout
from services.notifier.metrics import NotifierMetrics
from services.notifier.sender import Sender
from zapbus.config import Settings
from zapbus.consumer import DurableConsumer
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import Runner, js_key, nats_ctx, pool_ctx, pool_key, runner_ctx, settings_key
from zapbus.topology import notifier_config

metrics_key = web.AppKey("notifier_metrics", NotifierMetrics)
sender_key = web.AppKey("sender", Sender)
dispatcher_key = web.AppKey("dispatcher", Runner)
fanout_key = web.AppKey("fanout", Runner)


async def sender_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    sender = Sender(settings.notify_timeout_seconds, settings.notify_allow_private)
    app[sender_key] = sender
    app[metrics_key] = NotifierMetrics(app[registry_key])
    yield
    await sender.close()


def build_dispatcher(app: web.Application) -> Dispatcher:
    s = app[settings_key]
    return Dispatcher(
        app[pool_key],
        app[sender_key],
        DeliveryPolicy(
            retry_base_seconds=s.notify_retry_base_seconds,
            retry_max_seconds=s.notify_retry_max_seconds,
            retry_for_seconds=s.notify_retry_for_seconds,
            disable_after_seconds=s.notify_disable_after_seconds,
            timeout_seconds=s.notify_timeout_seconds,
        ),
        app[metrics_key],
        concurrency=s.notify_concurrency,
    )


def build_fanout(app: web.Application) -> Fanout:
    settings = app[settings_key]
    dispatcher = app[dispatcher_key]
    assert isinstance(dispatcher, Dispatcher)
    return Fanout(
        DurableConsumer(app[js_key], settings.names.changes_stream, notifier_config(settings)),
        app[pool_key],
        app[metrics_key],
        on_queued=dispatcher.kick,
        leader_timeout_seconds=settings.leader_timeout_seconds,
    )


def create_app(settings: Settings) -> web.Application:
    app = base_app("notifier")
    app[settings_key] = settings
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(nats_ctx("notifier"))
    app.cleanup_ctx.append(sender_ctx)
    app.cleanup_ctx.append(runner_ctx("dispatcher", dispatcher_key, build_dispatcher))
    app.cleanup_ctx.append(runner_ctx("fanout", fanout_key, build_fanout))
    return app
