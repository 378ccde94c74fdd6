"""The session worker service: SESSION_CMDS -> Baileys server, with health and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.session_worker.consumer import CommandConsumer
from services.session_worker.drift import ReconcilePolicy
from services.session_worker.fence import Fence
from services.session_worker.fitness import FitnessCheck, why_unfit
from services.session_worker.flow import Deps
from services.session_worker.handler import CommandHandler
from services.session_worker.holds import Holds
from services.session_worker.manager import ServerPoolManager, ServerPoolMetrics
from services.session_worker.metrics import WorkerMetrics
from services.session_worker.outcome import Settler
from services.session_worker.placement import OnlyServerPlacements, PlacementPolicy
from services.session_worker.publish import FlowPublisher
from services.session_worker.reconciler import ReconcileMetrics, Reconciler
from services.session_worker.retry import RetryPolicy
from services.session_worker.server_pool import ServerPool
from zapbus.batchpub import BatchPublisher, GroupCommit
from zapbus.config import Settings, require_own_secrets
from zapbus.consumer import DurableConsumer
from zapbus.dialects import make_dialect
from zapbus.httpkit import base_app, not_ready_key, registry_key
from zapbus.runtime import Runner, js_key, nats_ctx, pool_ctx, pool_key, runner_ctx, settings_key
from zapbus.topology import worker_config

http_key = web.AppKey("http", aiohttp.ClientSession)
consumer_key = web.AppKey("command_consumer", Runner)
servers_key = web.AppKey("servers", ServerPool)
metrics_key = web.AppKey("worker_metrics", WorkerMetrics)
holds_key = web.AppKey("holds", Runner)
reconciler_key = web.AppKey("reconciler", Runner)
manager_key = web.AppKey("pool_manager", Runner)
fitness_key = web.AppKey("fitness", Runner)


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    limit = aiohttp.TCPConnector(limit=settings.worker_concurrency + 10)
    async with aiohttp.ClientSession(connector=limit) as http:
        app[http_key] = http
        yield


def build_servers(
    settings: Settings, http: aiohttp.ClientSession, metrics: WorkerMetrics | None
) -> ServerPool:
    """One client, breaker and create cap per configured Baileys server."""
    return ServerPool(
        settings.servers,
        lambda spec: make_dialect(
            settings.baileys_kind, http, spec.url, spec.api_key, settings.baileys_timeout_seconds
        ),
        breaker_threshold=settings.breaker_threshold,
        probe_seconds=settings.breaker_probe_seconds,
        max_concurrent_creates=settings.baileys_max_concurrent_creates,
        breaker_gauge=metrics.breaker_open if metrics is not None else None,
    )


def placement_policy(settings: Settings) -> PlacementPolicy:
    return PlacementPolicy(
        max_sessions=settings.baileys_max_sessions,
        rejoin_after_seconds=settings.baileys_rejoin_after_seconds,
        stale_after_seconds=max(30.0, 6 * settings.baileys_health_interval_seconds),
    )


async def servers_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics = WorkerMetrics(app[registry_key])
    app[metrics_key] = metrics
    app[servers_key] = build_servers(app[settings_key], app[http_key], metrics)
    app[not_ready_key]["baileys_servers"] = lambda: why_unfit(app[servers_key])
    yield
    await app[servers_key].close()


def build_consumer(app: web.Application) -> CommandConsumer:
    settings = app[settings_key]
    metrics = app[metrics_key]
    heartbeat = max(0.5, settings.ack_wait_seconds / 3)
    holds = Holds(app[pool_key], every_seconds=heartbeat, hold_seconds=heartbeat * 3)
    app[holds_key] = holds
    # group commit: the events of concurrent commands share an atomic batch (one fsync with
    # sync_interval: always, instead of one per event: ~2,000 in a 1,000-session burst)
    group = GroupCommit(BatchPublisher(app[js_key], stream_of=settings.names.stream_of))
    publisher = FlowPublisher(group, settings.names)
    deps = Deps(
        db=app[pool_key],
        publish=publisher,
        names=settings.names,
        servers=app[servers_key],
        placement=placement_policy(settings),
        fence=Fence(app[pool_key]),
        retry=RetryPolicy(
            max_attempts=settings.create_max_attempts,
            base_seconds=settings.retry_base_seconds,
            max_seconds=settings.retry_max_seconds,
        ),
        metrics=metrics,
        webhook_base_url=settings.webhook_public_url,
        webhook_secret=settings.webhook_secret,
        wait_slice=min(5.0, heartbeat),
        placements=OnlyServerPlacements(app[pool_key]),
    )
    handler = CommandHandler(deps, Settler(publisher, metrics, heartbeat), holds)
    consumer = DurableConsumer(app[js_key], settings.names.commands_stream, worker_config(settings))
    return CommandConsumer(
        consumer,
        handler,
        concurrency=settings.worker_concurrency,
        # the rest of the grace is for handing interrupted commands back
        grace_seconds=settings.shutdown_grace_seconds * 0.6,
    )


def build_fitness(app: web.Application) -> FitnessCheck:
    every = app[settings_key].baileys_health_interval_seconds
    return FitnessCheck(app[servers_key], every_seconds=every)


def build_reconciler(app: web.Application) -> Reconciler:
    settings = app[settings_key]
    return Reconciler(
        pool=app[pool_key],
        js=app[js_key],
        names=settings.names,
        servers=app[servers_key],
        metrics=ReconcileMetrics(app[registry_key]),
        interval_seconds=settings.reconcile_interval_seconds,
        policy=reconcile_policy(settings),
        leader_timeout_seconds=settings.leader_timeout_seconds,
    )


def build_manager(app: web.Application) -> ServerPoolManager:
    settings = app[settings_key]
    servers = app[servers_key]
    return ServerPoolManager(
        pool=app[pool_key],
        names=settings.names,
        servers=servers,
        metrics=ServerPoolMetrics(app[registry_key], list(servers.servers)),
        policy=placement_policy(settings),
        health_interval_seconds=settings.baileys_health_interval_seconds,
        failover_after_seconds=settings.baileys_failover_after_seconds,
        failover_per_second=settings.baileys_failover_per_second,
        leader_timeout_seconds=settings.leader_timeout_seconds,
    )


def reconcile_policy(settings: Settings) -> ReconcilePolicy:
    return ReconcilePolicy(
        grace_seconds=settings.reconcile_grace_seconds,
        max_recreates=settings.reconcile_max_recreates,
        delete_unknown=settings.reconcile_delete_unknown,
    )


def create_app(settings: Settings) -> web.Application:
    require_own_secrets(settings)  # it mints webhook tokens: the built-in secret is public
    app = base_app("session_worker")
    app[settings_key] = settings
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(nats_ctx("session_worker"))
    app.cleanup_ctx.append(http_ctx)
    app.cleanup_ctx.append(servers_ctx)
    app.cleanup_ctx.append(runner_ctx("fitness", fitness_key, build_fitness))
    app.cleanup_ctx.append(runner_ctx("pool_manager", manager_key, build_manager))
    app.cleanup_ctx.append(runner_ctx("command_consumer", consumer_key, build_consumer))
    app.cleanup_ctx.append(runner_ctx("holds", holds_key, lambda app: app[holds_key]))
    app.cleanup_ctx.append(runner_ctx("reconciler", reconciler_key, build_reconciler))
    return app
