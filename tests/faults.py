"""A zapbus deployment of real processes on throwaway NATS and Postgres, for fault tests.

The five services run as child processes (so a test can SIGKILL one), on a nats-server and a
PostgreSQL that the test started itself (so it can restart them); the shared servers are never
touched. The Baileys simulator runs in the test's event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from zapbus import db, topology
from zapbus.config import load_settings
from zapbus.localinfra import NatsCluster, NatsServer, PostgresServer, free_port
from zapbus.procs import ServiceProcess
from zapbus.tenants import create_tenant

PORT_VARS = {
    "gateway": "ZAPBUS_GATEWAY_PORT",
    "webhook": "ZAPBUS_WEBHOOK_PORT",
    "session_worker": "ZAPBUS_WORKER_PORT",
    "projector": "ZAPBUS_PROJECTOR_PORT",
    "notifier": "ZAPBUS_NOTIFIER_PORT",
}


@dataclass
class ProcessStack:
    nats: NatsServer | NatsCluster
    postgres: PostgresServer
    procs: dict[str, ServiceProcess]
    ports: dict[str, int]
    api_key: str
    http: aiohttp.ClientSession
    logs: Path
    sim_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def restart(self, name: str, kill: bool = True) -> None:
        proc = self.procs[name]
        proc.kill() if kill else proc.stop()
        proc.start()
        await proc.wait_healthy(timeout=30)

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@contextlib.asynccontextmanager
async def process_stack(
    tmp: Path,
    sim: SimConfig,
    env: dict[str, str] | None = None,
    replicas: int = 1,
    nats: NatsServer | NatsCluster | None = None,
) -> AsyncIterator[ProcessStack]:
    """``replicas`` copies of every service: the webhook copies share one port (SO_REUSEPORT),
    the others get ports of their own (``procs["gateway_2"]``, ``ports["gateway_2"]``...).
    ``nats``: the server or cluster to run on (started and stopped here), else a new server."""
    nats = nats if nats is not None else NatsServer(tmp / "nats")
    postgres = PostgresServer(tmp / "pg")
    await nats.astart()
    await postgres.astart()
    sim_port = free_port()
    sim_runner = web.AppRunner(create_sim(msgspec.structs.replace(sim, port=sim_port)))
    ports = {name: free_port() for name in PORT_VARS}
    logs = tmp / "logs"
    logs.mkdir()
    base = {
        "ZAPBUS_NATS_URL": nats.url,
        "ZAPBUS_DATABASE_URL": postgres.dsn,
        "ZAPBUS_ENV": "dev",
        "ZAPBUS_LOG_FORMAT": "json",
        "ZAPBUS_SHUTDOWN_GRACE_SECONDS": "3",
        "ZAPBUS_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{ports['webhook']}",
        "ZAPBUS_BAILEYS_URL": f"http://127.0.0.1:{sim_port}",
        "ZAPBUS_BAILEYS_API_KEY": sim.api_key,
        **{var: str(ports[name]) for name, var in PORT_VARS.items()},
        **({"ZAPBUS_REUSE_PORT": "true"} if replicas > 1 else {}),
        **(env or {}),
    }
    procs = {
        name: ServiceProcess(
            name,
            f"services.{name}",
            base,
            f"http://127.0.0.1:{ports[name]}/healthz",
            logs / f"{name}.log",
        )
        for name in PORT_VARS
    }
    for n in range(2, replicas + 1):
        for name, var in PORT_VARS.items():
            copy = f"{name}_{n}"
            ports[copy] = ports[name] if name == "webhook" else free_port()
            procs[copy] = ServiceProcess(
                copy,
                f"services.{name}",
                {**base, var: str(ports[copy])},
                f"http://127.0.0.1:{ports[copy]}/healthz",
                logs / f"{copy}.log",
            )
    http = aiohttp.ClientSession()
    try:
        await db.migrate(postgres.dsn)
        await topology.declare_with(load_settings(base))  # as `zapbus migrate` would
        pool = await db.create_pool(postgres.dsn, max_size=1)
        try:
            _, key = await create_tenant(pool, "chaos")
        finally:
            await pool.close()
        await sim_runner.setup()
        await web.TCPSite(sim_runner, "127.0.0.1", sim_port).start()
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            await proc.wait_healthy(timeout=30)
        yield ProcessStack(
            nats=nats,
            postgres=postgres,
            procs=procs,
            ports=ports,
            api_key=key,
            http=http,
            logs=logs,
            sim_url=f"http://127.0.0.1:{sim_port}",
        )
    finally:
        await http.close()
        for proc in procs.values():
            proc.stop(timeout=10)
        await sim_runner.cleanup()
        await nats.astop()
        await postgres.astop()
