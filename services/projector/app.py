"""The projector service: SESSION_EVENTS -> Postgres, with health, readiness and metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

from services.projector.consumer import Projector
from services.projector.metrics import ProjectorMetrics
from services.projector.partitions import PartitionLease, PartitionOwner
from services.projector.retention import Retention, RetentionMetrics
from services.projector.watchdog import Watchdog, WatchdogMetrics
from zapbus.config import Settings
from zapbus.connection.machine import QrPolicy
from zapbus.consumer import DurableConsumer
from zapbus.dlq import MaxDeliveries
from zapbus.httpkit import base_app, registry_key
from zapbus.relay import OutboxMetrics, OutboxRelay
from zapbus.runtime import (
    Runner,
    js_key,
    nats_ctx,
    nats_key,
    pool_ctx,
    pool_key,
    relay_pool_ctx,
    relay_pool_key,
    runner_ctx,
    settings_key,
)
from zapbus.streamusage import StreamUsage
from zapbus.topology import PROJECTOR_ACK_WAIT_SECONDS, dead_letterer_config, projector_config

projector_key = web.AppKey("projector", Runner)
watchdog_key = web.AppKey("watchdog", Runner)
dead_letterer_key = web.AppKey("dead_letterer", Runner)
stream_usage_key = web.AppKey("stream_usage", Runner)
retention_key = web.AppKey("retention", Runner)
relay_key = web.AppKey("outbox_relay", OutboxRelay)
relay_runner_key = web.AppKey("outbox_relay_runner", Runner)


def projector_loop(
    app: web.Application,
    lease: PartitionLease | None = None,
    metrics: ProjectorMetrics | None = None,
) -> Projector:
    """The projector of one partition (of every event when ``lease`` is None)."""
    settings = app[settings_key]
    partition = lease.partition if lease is not None else 0
    return Projector(
        consumer=DurableConsumer(
            app[js_key], settings.names.events_stream, projector_config(settings, partition)
        ),
        pool=app[pool_key],
        nc=app[nats_key],
        names=settings.names,
        metrics=metrics or ProjectorMetrics(app[registry_key]),
        policy=QrPolicy(
            first_ttl_seconds=settings.qr_first_ttl_seconds,
            next_ttl_seconds=settings.qr_next_ttl_seconds,
            max_refreshes=settings.qr_max_refreshes,
            conflict_loop_count=settings.conflict_loop_count,
            conflict_loop_window_seconds=settings.conflict_loop_window_seconds,
        ),
        batch=settings.projector_batch,
        lease=lease,
        # the changes it queues are relayed at once (without a relay here: at the next poll
        # of another relay)
        on_committed=app[relay_key].kick if relay_key in app else None,
    )


def build_projector(app: web.Application) -> PartitionOwner:
    """One projector loop per partition this process holds (see partitions.py)."""
    metrics = ProjectorMetrics(app[registry_key])  # one set, shared by every partition
    return PartitionOwner(
        app[pool_key],
        app[settings_key].event_partitions,
        lambda lease: projector_loop(app, lease, metrics),
        takeover_delay_seconds=PROJECTOR_ACK_WAIT_SECONDS,
    )


def build_relay(app: web.Application) -> OutboxRelay:
    """The projector relays the change snapshots it queues itself (the gateway's relay would
    too, at its next poll): live updates stay as quick as a direct publish."""
    relay = OutboxRelay(
        app[relay_pool_key],
        app[js_key],
        OutboxMetrics(app[registry_key]),
        app[settings_key].names,
        poll_seconds=app[settings_key].outbox_poll_seconds,
    )
    app[relay_key] = relay
    return relay


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


def build_dead_letterer(app: web.Application) -> MaxDeliveries:
    """Commands that exhausted the worker's max_deliver become dead letters (zapbus/dlq.py)."""
    settings = app[settings_key]
    return MaxDeliveries(
        DurableConsumer(
            app[js_key], settings.names.advisories_stream, dead_letterer_config(settings)
        ),
        app[js_key],
        settings.names,
        Counter(
            "zapbus_worker_dead_letters_total",
            "Commands sent to the dead-letter stream, by kind (here: after max_deliver).",
            ["kind"],
            registry=app[registry_key],
        ),
    )


def build_retention(app: web.Application) -> Retention:
    settings = app[settings_key]
    return Retention(
        app[pool_key], settings.history_retention_days, RetentionMetrics(app[registry_key])
    )


def create_app(settings: Settings) -> web.Application:
    app = base_app("projector")
    app[settings_key] = settings
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(relay_pool_ctx)
    app.cleanup_ctx.append(nats_ctx("projector"))
    app.cleanup_ctx.append(runner_ctx("outbox_relay", relay_runner_key, build_relay))
    app.cleanup_ctx.append(runner_ctx("projector", projector_key, build_projector))
    app.cleanup_ctx.append(runner_ctx("watchdog", watchdog_key, build_watchdog))
    app.cleanup_ctx.append(runner_ctx("dead_letterer", dead_letterer_key, build_dead_letterer))
    app.cleanup_ctx.append(
        runner_ctx(
            "stream_usage",
            stream_usage_key,
            lambda app: StreamUsage(app[js_key], settings.names, app[registry_key]),
        )
    )
    app.cleanup_ctx.append(runner_ctx("retention", retention_key, build_retention))
    return app
