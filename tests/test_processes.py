"""Every service as its own process, as production runs it: health, readiness, metrics, SIGTERM."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from zapbus.config import Settings
from zapbus.tools.localinfra import free_port
from zapbus.tools.procs import ServiceProcess

SERVICES = {
    "gateway": "GATEWAY_PORT",
    "webhook": "WEBHOOK_PORT",
    "session_worker": "WORKER_PORT",
    "projector": "PROJECTOR_PORT",
}


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        "ZAPBUS_NATS_URL": settings.nats_url,
        "ZAPBUS_DATABASE_URL": settings.database_url,
        "ZAPBUS_NAMESPACE": settings.namespace,
        "ZAPBUS_DB_SCHEMA": settings.db_schema,
        "ZAPBUS_ENV": "dev",
        "ZAPBUS_LOG_FORMAT": "json",
        "ZAPBUS_SHUTDOWN_GRACE_SECONDS": "3",
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_service_process_is_ready_exports_metrics_and_stops_cleanly_on_sigterm(
    settings: Settings, service: str, tmp_path: Path
) -> None:
    port = free_port()
    env = service_env(settings, **{f"ZAPBUS_{SERVICES[service]}": str(port)})
    proc = ServiceProcess(
        service,
        f"services.{service}",
        env,
        f"http://127.0.0.1:{port}/healthz",
        tmp_path / f"{service}.log",
    )
    proc.start()
    try:
        await proc.wait_healthy(timeout=60)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["checks"]["nats"] is True
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
                assert r.status == 200
                assert "zapbus_nats_connected 1.0" in text
    finally:
        started = time.monotonic()
        code = proc.stop(timeout=15)
        took = time.monotonic() - started
    log = (tmp_path / f"{service}.log").read_text()
    assert code == 0, f"{service} exited with {code}:\n{log[-3000:]}"
    # The grace period is 3 s; a stop that needs the 15 s SIGKILL fallback is a hang.
    assert took < 12, f"{service} took {took:.1f}s to stop:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


async def test_a_health_answer_from_another_process_on_the_port_is_not_taken_for_ours(
    settings: Settings, tmp_path: Path
) -> None:
    """The port holds something else answering /healthz 200 (an earlier run still up): the
    service we start cannot bind and exits, and waiting for it says so instead of reporting
    it healthy on the other's answer."""
    port = free_port()

    async def impostor(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "gateway", "pid": 1})

    app = web.Application()
    app.router.add_get("/healthz", impostor)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proc = ServiceProcess(
        "gateway",
        "services.gateway",
        service_env(settings, ZAPBUS_GATEWAY_PORT=str(port)),
        f"http://127.0.0.1:{port}/healthz",
        tmp_path / "gateway.log",
    )
    proc.start()
    try:
        with pytest.raises(RuntimeError, match="gateway exited"):
            await proc.wait_healthy(timeout=60)
    finally:
        proc.stop(timeout=15)
        await runner.cleanup()


async def test_the_second_process_on_a_shared_port_is_seen_healthy(
    settings: Settings, tmp_path: Path
) -> None:
    """With ZAPBUS_REUSE_PORT two webhook services listen on one port. The second one's health
    check must reach it: probing over one kept-alive connection, which the first process
    answered before the second had bound, never did (test_scale_out timed out so)."""
    port = free_port()
    env = service_env(settings, ZAPBUS_WEBHOOK_PORT=str(port), ZAPBUS_REUSE_PORT="true")
    url = f"http://127.0.0.1:{port}/healthz"
    procs = [
        ServiceProcess(f"webhook_{n}", "services.webhook", env, url, tmp_path / f"w{n}.log")
        for n in (1, 2)
    ]
    try:
        procs[0].start()
        await procs[0].wait_healthy(timeout=60)
        procs[1].start()  # probed at once: the first process holds the port meanwhile
        await procs[1].wait_healthy(timeout=60)
    finally:
        for proc in procs:
            proc.stop()
