"""Supervised loops: a crashing runner is logged and restarted; one that keeps crashing makes
``/healthz`` fail, so the orchestrator restarts the process. The periodic loops' shape
(``Stoppable``): a pause ends at a kick or a stop."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proto.names import Names
from services.projector.app import projector_loop
from zapbus import bus
from zapbus.config import Settings, load_settings
from zapbus.httpkit import base_app
from zapbus.runtime import Runner, js_key, nats_key, pool_ctx, runner_ctx, settings_key
from zapbus.supervisor import RestartPolicy, Stoppable

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
FAST = RestartPolicy(first_delay=0.01, max_delay=0.05, max_failures=3, window=60.0)
runner_key = web.AppKey("runner", Runner)


class Boom(RuntimeError):
    pass


class Fatal(BaseException):
    """Escapes ``except Exception``: ends the supervisor's own task."""


class FlakyRunner:
    """Raises on its first ``failures`` runs (``always`` to never stop raising), then runs
    until stopped."""

    def __init__(self, failures: int, error: type[BaseException] = Boom) -> None:
        self.failures = failures
        self.error = error
        self.runs = 0
        self.running = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        await asyncio.sleep(0)
        if self.failures < 0 or self.runs <= self.failures:
            raise self.error(f"run {self.runs} failed")
        self.running.set()
        await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()


@pytest.fixture
def make_client(aiohttp_client: Callable[..., Awaitable[Client]]) -> MakeClient:
    async def make(app: web.Application) -> Client:
        return await aiohttp_client(app)

    return make


def app_with(runner: Runner, settings: Settings | None = None) -> web.Application:
    app = base_app("test")
    app[settings_key] = settings or load_settings({}, shutdown_grace_seconds=2.0)
    app.cleanup_ctx.append(runner_ctx("loop", runner_key, lambda _: runner, FAST))
    return app


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def status_of(client: Client, path: str) -> tuple[int, Any]:
    resp = await client.get(path)
    return resp.status, await resp.json()


def crash_records(caplog: pytest.LogCaptureFixture, error: type[BaseException]) -> list[Any]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.exc_info and isinstance(r.exc_info[1], error)
    ]


async def test_a_runner_that_crashes_twice_is_restarted_and_stays_healthy(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    runner = FlakyRunner(failures=2)
    client = await make_client(app_with(runner))
    await asyncio.wait_for(runner.running.wait(), 10)
    assert runner.runs == 3
    status, body = await status_of(client, "/healthz")
    assert (status, body) == (200, {"status": "ok", "service": "test", "pid": os.getpid()})
    status, body = await status_of(client, "/readyz")
    assert (status, body["checks"]["loop"]) == (200, True)
    crashes = crash_records(caplog, Boom)
    assert [str(r.exc_info[1]) for r in crashes] == ["run 1 failed", "run 2 failed"]
    assert all("loop crashed" in r.getMessage() for r in crashes)


async def test_a_runner_that_always_crashes_makes_healthz_fail(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    runner = FlakyRunner(failures=-1)
    client = await make_client(app_with(runner))

    async def unhealthy() -> bool:
        return (await client.get("/healthz")).status == 503

    await wait_until(unhealthy, "/healthz to answer 503")
    _, body = await status_of(client, "/healthz")
    assert body["status"] == "unhealthy"
    assert "loop crashed 3 times" in body["problems"]["loop"]
    assert runner.runs >= 3
    assert len(crash_records(caplog, Boom)) >= 3


async def test_a_supervisor_that_dies_makes_healthz_fail(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(app_with(FlakyRunner(failures=1, error=Fatal)))

    async def unhealthy() -> bool:
        return (await client.get("/healthz")).status == 503

    await wait_until(unhealthy, "/healthz to answer 503")
    _, body = await status_of(client, "/healthz")
    assert "no longer supervised" in body["problems"]["loop"]
    assert crash_records(caplog, Fatal)


@pytest.fixture
async def bare_nats(settings: Settings) -> AsyncIterator[Callable[[web.Application], Any]]:
    """A cleanup ctx with a NATS connection that declares no stream (unlike ``nats_ctx``)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        nc = await bus.connect(settings.nats_url, "zapbus-test-supervisor")
        app[nats_key] = nc
        app[js_key] = nc.jetstream()
        yield
        await nc.close()

    yield ctx


async def test_the_projector_is_restarted_after_a_nats_api_error(
    settings: Settings,
    bare_nats: Callable[[web.Application], Any],
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its stream is missing at first, so ``open()`` raises; once the stream exists, the
    restarted loop binds its consumer: ``run()`` can run again after it raised."""
    app = base_app("projector")
    app[settings_key] = settings
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(bare_nats)
    policy = RestartPolicy(first_delay=0.05, max_delay=0.2, max_failures=1000)
    # One projector loop (no partition leases), so its own failures reach the supervisor.
    app.cleanup_ctx.append(runner_ctx("projector", runner_key, projector_loop, policy))
    # The settings fixture declared the streams (as `zapbus migrate` does): remove them.
    nc = await bus.connect(settings.nats_url, "test-supervisor")
    await bus.delete_streams(nc.jetstream(), settings.names)
    await nc.close()
    client = await make_client(app)
    js = app[js_key]

    async def crashed() -> bool:
        return any(r.exc_info for r in caplog.records if r.name == "zapbus.supervisor")

    await wait_until(crashed, "a logged crash of the projector")
    names: Names = settings.names
    await bus.ensure_streams(js, names)

    async def bound() -> bool:
        try:
            await js.consumer_info(names.events_stream, names.projector_consumer)
        except Exception:
            return False
        status, body = await status_of(client, "/readyz")
        return status == 200 and body["checks"]["projector"] is True

    await wait_until(bound, "the restarted projector to bind its consumer")
    assert (await client.get("/healthz")).status == 200


async def test_a_pause_ends_at_a_kick_or_a_stop_and_no_kick_is_missed() -> None:
    """A kick ends the running pause; one that came between pauses ends the next at once;
    kicks during ``gather`` join the pass (the next pause waits); a stop ends every pause."""
    loop = Stoppable()
    async with asyncio.timeout(30):  # each pause below asks for an hour
        asyncio.get_running_loop().call_soon(loop.kick)
        assert await loop.pause(3600) is False and loop.kicked
        loop.kick()  # no pause running: the next one ends at once
        assert await loop.pause(3600) is False and loop.kicked
        loop.kick()
        await loop.gather(0)  # the kick joined a pass: the pause waits its time
    assert await loop.pause(0.01) is False and not loop.kicked
    async with asyncio.timeout(30):
        asyncio.get_running_loop().call_soon(loop.stop)
        assert await loop.pause(3600) is True and loop.stopping
        assert await loop.pause(3600) is True  # stopped: no pause waits any more
