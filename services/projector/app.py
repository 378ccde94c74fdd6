"""The projector service: SESSION_EVENTS -> Postgres, with health, readiness and metrics."""

from __future__ import annotations

from aiohttp import web
from nats.js import api as js_api

from services.projector.consumer import Projector
from services.projector.metrics import ProjectorMetrics
from services.projector.transitions import QrPolicy
from services.projector.watchdog import Watchdog, WatchdogMetrics
from zapbus.config import Settings
from zapbus.consumer import DurableConsumer
from zapbus.httpkit import base_app, registry_key
from zapbus.runtime import (
    Runner,
    js_key,
    nats_ctx,
    nats_key,
    pool_ctx,
    pool_key,
    runner_ctx,
    settings_key,
)

projector_key = web.AppKey("projector", Runner)
watchdog_key = web.AppKey("watchdog", Runner)


def consumer_config(settings: Settings) -> js_api.ConsumerConfig:
    names = settings.names
    return js_api.ConsumerConfig(
        durable_name=names.projector_consumer,
        filter_subject=names.events_subjects,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_wait=30.0,
        max_deliver=-1,  # a database outage must not drop events: retry until it is back
        max_ack_pending=max(1000, settings.projector_batch * 4),
    )


def build_projector(app: web.Application) -> Projector:
    settings = app[settings_key]
    return Projector(
        consumer=DurableConsumer(
            app[js_key], settings.names.events_stream, consumer_config(settings)
        ),
        pool=app[pool_key],
        nc=app[nats_key],
        names=settings.names,
        metrics=ProjectorMetrics(app[registry_key]),
        policy=QrPolicy(
            first_ttl_seconds=settings.qr_first_ttl_seconds,
            next_ttl_seconds=settings.qr_next_ttl_seconds,
            max_refreshes=settings.qr_max_refreshes,
        ),
        batch=settings.projector_batch,
    )


def build_watchdog(app: web.Application) -> Watchdog:
    settings = app[settings_key]
    return Watchdog(
        app[pool_key],
        settings.names,
        WatchdogMetrics(app[registry_key]),
        deadline_seconds=settings.watchdog_deadline_seconds,
        interval_seconds=settings.watchdog_interval_seconds,
        max_redrives=settings.watchdog_max_redrives,
    )


def create_app(settings: Settings) -> web.Application:
    app = base_app("projector")
    app[settings_key] = settings
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(nats_ctx("projector"))
    app.cleanup_ctx.append(runner_ctx("projector", projector_key, build_projector))
    app.cleanup_ctx.append(runner_ctx("watchdog", watchdog_key, build_watchdog))
    return app
