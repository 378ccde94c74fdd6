"""``zapbus run`` (``make run``): everything on one machine, for development and demos.

Finds NATS and Postgres (or starts embedded ones from the pip wheels, data in ``.zapbus/``),
records their URLs in ``.zapbus/state.json`` for the ``zapbus`` CLI, migrates, creates the
``dev`` tenant, starts the five services and the Baileys simulator, prints the URLs, and on
Ctrl-C stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import msgspec

from zapbus import db, topology
from zapbus.config import Settings, load_settings
from zapbus.tenants import ensure_tenant
from zapbus.tokens import new_api_key
from zapbus.tools.localinfra import clear_state, ensure_infra, write_state
from zapbus.tools.procs import ServiceProcess


def _services(settings: Settings, env: dict[str, str], sim_url: str) -> list[ServiceProcess]:
    def url(host: str, port: int) -> str:
        return f"http://{host}:{port}/healthz"

    procs = []
    if sim_url:
        sim = ServiceProcess("baileys_sim", "services.baileys_sim", env, sim_url + "/healthz")
        procs.append(sim)
    procs += [
        ServiceProcess(
            "webhook", "services.webhook", env, url(settings.webhook_host, settings.webhook_port)
        ),
        ServiceProcess(
            "projector",
            "services.projector",
            env,
            url(settings.projector_host, settings.projector_port),
        ),
        ServiceProcess(
            "session_worker",
            "services.session_worker",
            env,
            url(settings.worker_host, settings.worker_port),
        ),
        ServiceProcess(
            "gateway", "services.gateway", env, url(settings.gateway_host, settings.gateway_port)
        ),
        ServiceProcess(
            "notifier",
            "services.notifier",
            env,
            url(settings.notifier_host, settings.notifier_port),
        ),
    ]
    return procs


async def run_dev(data_dir: Path) -> int:
    settings = load_settings()
    explicit_nats = os.environ.get("ZAPBUS_NATS_URL")
    explicit_db = os.environ.get("ZAPBUS_DATABASE_URL")
    infra = await ensure_infra(explicit_nats, explicit_db, data_dir, embedded=settings.embedded)
    procs: list[ServiceProcess] = []
    try:
        await db.migrate(infra.database_url, settings.db_schema)
        await topology.declare_with(msgspec.structs.replace(settings, nats_url=infra.nats_url))
        api_key = settings.dev_api_key or new_api_key()
        pool = await db.create_pool(infra.database_url, settings.db_schema, min_size=1, max_size=1)
        try:
            await ensure_tenant(pool, "dev", api_key)
        finally:
            await pool.close()
        simulate = not ({"ZAPBUS_BAILEYS_URL", "ZAPBUS_BAILEYS_URLS"} & set(os.environ))
        env = {
            "ZAPBUS_NATS_URL": infra.nats_url,
            "ZAPBUS_DATABASE_URL": infra.database_url,
            # a development run: the built-in webhook secret is allowed (services refuse it
            # otherwise); an explicit ZAPBUS_ENV wins
            "ZAPBUS_ENV": os.environ.get("ZAPBUS_ENV", "dev"),
            # webhook receivers on this machine (http://127.0.0.1...) are fine in development
            "ZAPBUS_NOTIFY_ALLOW_PRIVATE": os.environ.get("ZAPBUS_NOTIFY_ALLOW_PRIVATE", "true"),
        }
        sim_port = os.environ.get("ZAPBUS_SIM_PORT", "3100")  # the simulator's own setting
        sim_url = f"http://127.0.0.1:{sim_port}" if simulate else ""
        if simulate:
            env["ZAPBUS_BAILEYS_URL"] = sim_url
            # the simulator speaks the dialect zapbus is set to drive
            env.setdefault("ZAPBUS_SIM_KIND", settings.baileys_kind)
            env.setdefault(
                "ZAPBUS_SIM_CREATE_DELAY", os.environ.get("ZAPBUS_SIM_CREATE_DELAY", "10-30")
            )
        # for the zapbus CLI run in this folder (zapbus reconcile needs the simulator too)
        write_state(data_dir, infra, {"ZAPBUS_BAILEYS_URL": sim_url} if simulate else {})
        procs = _services(settings, env, sim_url)
        for proc in procs:
            proc.start()
            await proc.wait_healthy()
        g = f"http://{settings.gateway_host}:{settings.gateway_port}"
        print(
            "\nzapbus is running\n"
            f"  gateway (API, web page)  {g}\n"
            f"  webhook                  http://{settings.webhook_host}:{settings.webhook_port}\n"
            f"  session worker metrics   http://{settings.worker_host}:{settings.worker_port}/metrics\n"
            f"  projector metrics        http://{settings.projector_host}:{settings.projector_port}/metrics\n"
            + (f"  Baileys simulator        {sim_url}\n" if simulate else "")
            + f"  NATS {infra.nats_url}   Postgres {infra.database_url}\n"
            f"  dev tenant API key       {api_key}\n\n"
            f"  try: curl -s -X POST {g}/v1/connections -H 'Authorization: Bearer {api_key}'"
            ' -d \'{"name": "demo"}\'\n'
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            dead = [p.name for p in procs if not p.running]
            if dead:
                print(f"zapbus: {', '.join(dead)} exited; stopping everything", flush=True)
                return_code = 1
                break
        else:
            return_code = 0
        return return_code
    finally:
        for proc in reversed(procs):
            await asyncio.to_thread(proc.stop)
        clear_state(data_dir)
        await infra.close()
