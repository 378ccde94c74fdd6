"""A zapbus deployment of real processes on throwaway NATS and Postgres, for fault tests.

The five services run as child processes (so a test can SIGKILL one), on a nats-server and a
PostgreSQL that the test started itself (so it can restart them); the shared servers are never
touched. The Baileys simulator runs in the test's event loop; with ``sims=3`` three of them
form a pool (``ZAPBUS_BAILEYS_URLS``, names ``s1``, ``s2``, ``s3``), each keeping its sessions
in a state file so that one stopped and started again comes back holding them.
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
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import NatsCluster, NatsServer, PostgresServer, free_port
from zapbus.tools.procs import ServiceProcess

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
    # the pool: name -> URL, and the runner of each simulator that is up
    sim_urls: dict[str, str] = field(default_factory=dict)
    sim_runners: dict[str, web.AppRunner] = field(default_factory=dict)
    sim_configs: dict[str, SimConfig] = field(default_factory=dict)

    async def stop_sim(self, name: str) -> None:
        """The server dies (its sessions stay in its state file)."""
        runner = self.sim_runners.pop(name, None)
        if runner is not None:
            await runner.cleanup()

    async def start_sim(self, name: str) -> None:
        if name in self.sim_runners:
            return
        config = self.sim_configs[name]
        runner = web.AppRunner(create_sim(config))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", config.port).start()
        self.sim_runners[name] = runner

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def restart(self, name: str, kill: bool = True) -> None:
        proc = self.procs[name]
        proc.kill() if kill else proc.stop()
        proc.start()
        await proc.wait_healthy(timeout=60)

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def print_log_tails(logs: Path, lines: int = 10, width: int = 400) -> None:
    """Each service's last warnings and errors and its last lines, printed (pytest shows
    them with the failure; the folder is removed after the test)."""
    print(f"service logs of the failed stack ({logs}):")
    for path in sorted(logs.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        loud = [ln for ln in text if '"level":"warning"' in ln or '"level":"error"' in ln]
        print(f"--- {path.name}: {len(text)} lines, {len(loud)} warnings/errors; the last:")
        for ln in [*loud[-lines:], "(then the last lines)", *text[-lines // 2 :]]:
            print(ln[:width])


@contextlib.asynccontextmanager
async def process_stack(
    tmp: Path,
    sim: SimConfig,
    env: dict[str, str] | None = None,
    replicas: int = 1,
    nats: NatsServer | NatsCluster | None = None,
    sims: int = 1,
) -> AsyncIterator[ProcessStack]:
    """``replicas`` copies of every service: the webhook copies share one port (SO_REUSEPORT),
    the others get ports of their own (``procs["gateway_2"]``, ``ports["gateway_2"]``...).
    ``nats``: the server or cluster to run on (started and stopped here), else a new server."""
    nats = nats if nats is not None else NatsServer(tmp / "nats")
    postgres = PostgresServer(tmp / "pg")
    await nats.astart()
    await postgres.astart()
    sim_names = [f"s{n}" for n in range(1, sims + 1)]
    sim_configs = {
        name: msgspec.structs.replace(
            sim,
            port=free_port(),
            seed=None if sim.seed is None else sim.seed + n,
            state_file=str(tmp / f"{name}.json") if sims > 1 else "",
        )
        for n, name in enumerate(sim_names)
    }
    sim_urls = {name: f"http://127.0.0.1:{c.port}" for name, c in sim_configs.items()}
    sim_port = sim_configs[sim_names[0]].port
    servers = (
        {"ZAPBUS_BAILEYS_URLS": ",".join(f"{n}={u}" for n, u in sim_urls.items())}
        if sims > 1
        else {"ZAPBUS_BAILEYS_URL": f"http://127.0.0.1:{sim_port}"}
    )
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
        **servers,
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
    stack: ProcessStack | None = None
    try:
        await db.migrate(postgres.dsn)
        await topology.declare_with(load_settings(base))  # as `zapbus migrate` would
        pool = await db.create_pool(postgres.dsn, max_size=1)
        try:
            _, key = await create_tenant(pool, "chaos")
        finally:
            await pool.close()
        stack = ProcessStack(
            nats=nats,
            postgres=postgres,
            procs=procs,
            ports=ports,
            api_key=key,
            http=http,
            logs=logs,
            sim_url=f"http://127.0.0.1:{sim_port}",
            sim_urls=sim_urls,
            sim_configs=sim_configs,
        )
        for name in sim_names:
            await stack.start_sim(name)
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            await proc.wait_healthy(timeout=60)
        try:
            yield stack
        except BaseException:
            print_log_tails(logs)  # the logs go with the folder: a failure in CI shows them
            raise
    finally:
        await http.close()
        for proc in procs.values():
            proc.stop(timeout=10)
        if stack is not None:
            for name in list(stack.sim_runners):
                await stack.stop_sim(name)
        await nats.astop()
        await postgres.astop()
