"""Resources every zapbus service opens, as aiohttp ``cleanup_ctx`` generators.

Each opens one resource, stores it under a typed ``web.AppKey``, registers a readiness check,
yields, then closes it. aiohttp runs the teardown in reverse order on SIGTERM, so a consumer
stops (and finishes or hands back its in-flight work) before the NATS connection drains and
before the Postgres pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import Gauge

from zapbus import bus, db
from zapbus.config import Settings
from zapbus.httpkit import ready_checks_key, registry_key, unhealthy_key
from zapbus.supervisor import RestartPolicy, Supervisor
from zapbus.supervisor import Runner as Runner

log = logging.getLogger("zapbus.runtime")

settings_key = web.AppKey("settings", Settings)
nats_key = web.AppKey("nats", NATS)
js_key = web.AppKey("js", JetStreamContext)
pool_key = web.AppKey("pool", asyncpg.Pool)
relay_pool_key = web.AppKey("relay_pool", asyncpg.Pool)

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def nats_ctx(service: str) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[settings_key]
        nc = await bus.connect(settings.nats_url, name=f"zapbus-{service}")
        await bus.check_server_version(nc)  # nats-server >= 2.10, else exit code 2
        js = nc.jetstream()
        try:
            await bus.require_streams(js, settings.names)  # declared by `zapbus migrate`
        except bus.MissingStreams:
            await nc.close()
            raise
        app[nats_key] = nc
        app[js_key] = js
        app[ready_checks_key]["nats"] = lambda: nc.is_connected
        gauge = Gauge(
            "zapbus_nats_connected",
            "1 while the service's NATS connection is up, else 0.",
            registry=app[registry_key],
        )
        gauge.set_function(lambda: 1.0 if nc.is_connected else 0.0)
        yield
        try:
            await asyncio.wait_for(nc.drain(), timeout=settings.shutdown_grace_seconds)
        except Exception as exc:
            log.warning("nats drain did not finish cleanly: %s", exc)
            await nc.close()

    return ctx


async def _db_ready(pool: asyncpg.Pool) -> bool:
    try:
        async with asyncio.timeout(1.0):
            return bool(await pool.fetchval("SELECT 1") == 1)
    except Exception:
        return False


async def _close_pool(pool: asyncpg.Pool, grace_seconds: float) -> None:
    """Close gracefully within the grace period, else cut the connections."""
    try:
        await asyncio.wait_for(pool.close(), timeout=grace_seconds)
    except TimeoutError:
        pool.terminate()


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Postgres pool, with ZAPBUS_DB_COMMAND_TIMEOUT_SECONDS on every statement and
    ZAPBUS_DB_ACQUIRE_TIMEOUT_SECONDS on every wait for a connection (db.open_pool): with
    Postgres hung, a request answers 503 and a worker's fence check fails open within them
    instead of hanging."""
    settings = app[settings_key]
    pool = await db.open_pool(settings)
    app[pool_key] = pool
    app[ready_checks_key]["postgres"] = lambda: _db_ready(pool)
    yield
    await _close_pool(pool, settings.shutdown_grace_seconds)


async def relay_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The outbox relay's own connection, apart from the pool of requests and batches. Taking
    its connection from that pool, the relay queued behind whatever held it: in a burst of
    1,000 creates every connection served a request, so the commands sat committed in the
    outbox until most of the burst was answered (0.4-1 s: the worker then had nothing to do,
    then everything at once). One connection: a pass is one transaction at a time."""
    settings = app[settings_key]
    pool = await db.open_pool(settings, min_size=1, max_size=1)
    app[relay_pool_key] = pool
    yield
    await _close_pool(pool, settings.shutdown_grace_seconds)


def runner_ctx(
    name: str,
    key: web.AppKey[Runner],
    build: Callable[[web.Application], Runner],
    policy: RestartPolicy | None = None,
) -> CleanupCtx:
    """Run ``build(app).run()`` as a supervised task (restarted when it crashes, the service
    unhealthy when it keeps crashing); on shutdown ``stop()`` it and wait out the grace."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = build(app)
        app[key] = runner
        supervisor = Supervisor(name, runner, policy or RestartPolicy(), app[unhealthy_key])
        task = asyncio.create_task(supervisor.run(), name=f"zapbus-{name}")
        supervisor.watch(task)
        app[ready_checks_key][name] = lambda: not task.done() and not supervisor.backing_off
        yield
        supervisor.stop()
        if task.done():
            return  # it ended before the shutdown, and ``watch`` logged why
        grace = app[settings_key].shutdown_grace_seconds
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=grace)
        except TimeoutError:
            log.warning("%s did not stop within %.1f s; cancelling", name, grace)
            task.cancel()
            # A task cancelled inside wait_for may end with TimeoutError instead of
            # CancelledError (Python 3.11); either way it is over.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task
        except Exception:
            log.exception("%s ended with an error", name)

    return ctx
