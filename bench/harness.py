"""What every benchmark needs: a namespace and schema of its own, services as child processes,
a load-generator process, and a little process accounting.

Services run as ``python -m services.<name>`` with their configuration in the environment, as in
production (``zapbus.tools.procs.ServiceProcess``); their logs go to
``<log dir>/<namespace>-<name>.log``. The load generator runs in a separate (spawned) process, so
it never shares an event loop with the code it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import nats

from bench.cpu import CpuMeter, InfraPids, wait_quiet
from proto.names import Names
from zapbus import bus, db, topology
from zapbus.bus import server_urls
from zapbus.config import Settings, load_settings
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import free_port
from zapbus.tools.procs import ServiceProcess

T = TypeVar("T")

SERVICE_PORTS = {
    "gateway": "ZAPBUS_GATEWAY_PORT",
    "webhook": "ZAPBUS_WEBHOOK_PORT",
    "session_worker": "ZAPBUS_WORKER_PORT",
    "projector": "ZAPBUS_PROJECTOR_PORT",
    "notifier": "ZAPBUS_NOTIFIER_PORT",
}


@dataclass(frozen=True)
class Scale:
    """Durations and sizes of one run (``--quick`` shrinks them to a smoke run)."""

    capacity_s: float = 20.0
    latency_s: float = 20.0
    original_s: float = 10.0
    original_timeout_s: float = 8.0  # the original design's wait for the Baileys server
    warmup_s: float = 1.0
    clients: int = 64
    burst_n: int = 1000
    burst_caps: tuple[int, int] = (100, 1000)
    burst_delay_s: float = 2.0
    projector_events: int = 100_000
    webhook_connections: int = 5000
    sync_s: float = 10.0
    sequential_publishes: int = 1000
    scale_s: float = 10.0  # each window of the cluster and scale-out benchmark
    inflight_publishes: int = 5000  # its publish-acks with 200 in flight
    quiet_s: float = 90.0  # how long a run may wait in all for others' load to pass
    # the control plane at rest: fleet sizes, the CPU window, the wait before it, placements
    # timed, runs of each sweep timed
    controlplane_sizes: tuple[int, ...] = (1000, 10_000, 100_000)
    controlplane_window_s: float = 60.0
    controlplane_settle_s: float = 10.0
    controlplane_placements: int = 100
    controlplane_runs: int = 3
    placement_live: tuple[int, ...] = (5000, 50_000)  # live connections of each run
    placement_n: int = 1000  # placements timed, one at a time and from 50 tasks

    @classmethod
    def quick(cls) -> Scale:
        """Every step of every benchmark, each as short as it can be (``make test`` runs it
        to check that none crashes): figures, not measurements."""
        return cls(
            capacity_s=1.0,
            latency_s=1.0,
            original_s=1.0,
            original_timeout_s=1.0,
            warmup_s=0.3,
            clients=16,
            burst_n=40,
            burst_caps=(20, 40),
            burst_delay_s=0.5,
            projector_events=1000,
            webhook_connections=200,
            sync_s=1.0,
            sequential_publishes=100,
            scale_s=1.0,
            inflight_publishes=400,
            quiet_s=0.0,
            controlplane_sizes=(100, 1000),
            controlplane_window_s=1.0,
            controlplane_settle_s=0.5,
            controlplane_placements=5,
            controlplane_runs=1,
            placement_live=(100, 1000),
            placement_n=20,
        )


@dataclass
class Ctx:
    """One bench run: where NATS and Postgres are, where logs go, how big to make things."""

    nats_url: str
    database_url: str
    logs: Path
    scale: Scale
    infra: InfraPids
    profile: bool = False
    quiet_budget_s: float = 90.0  # what is left of ``scale.quiet_s``

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def meter(self, pids: Mapping[str, int]) -> CpuMeter:
        return CpuMeter(pids, self.infra)

    async def quiet(self) -> None:
        """Before a measurement: wait a little for load from outside the benchmark to pass
        (not in a smoke run, whose scale gives no time for it)."""
        if self.scale.quiet_s <= 0:
            return
        t0 = time.monotonic()
        await wait_quiet(self.say, min(20.0, max(1.0, self.quiet_budget_s)))
        self.quiet_budget_s -= time.monotonic() - t0

    @contextlib.asynccontextmanager
    async def profiling(self, procs: Procs, names: list[str], label: str) -> AsyncIterator[None]:
        """With ``--profile``: py-spy the named processes while the block runs."""
        if not self.profile:
            yield
            return
        from bench.profile import PySpy

        spies = [PySpy(procs.pid(n), self.logs / f"{procs.tag}-{label}-{n}") for n in names]
        try:
            yield
        finally:
            for spy in spies:
                self.say(f"  profile: {spy.stop()}")


@contextlib.asynccontextmanager
async def namespace(ctx: Ctx, **overrides: Any) -> AsyncIterator[Settings]:
    """Settings with a fresh namespace and schema (migrated, streams declared); both are
    deleted afterwards."""
    ns = f"b{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        {},
        nats_url=ctx.nats_url,
        database_url=ctx.database_url,
        namespace=ns,
        db_schema=ns,
        log_format="json",
        shutdown_grace_seconds=3.0,
        env="dev",
        **overrides,
    )
    await db.migrate(settings.database_url, settings.db_schema)
    # every node of a cluster (ZAPBUS_NATS_URL lists them), as the services connect
    nc = await nats.connect(server_urls(settings.nats_url), name="zapbus-bench")
    try:
        await topology.declare(nc.jetstream(), settings)  # as `zapbus migrate` does
        yield settings
    finally:
        try:
            await bus.delete_streams(nc.jetstream(), Names(namespace=ns))
        finally:
            await nc.close()
            conn = await asyncpg.connect(settings.database_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{ns}" CASCADE')
            finally:
                await conn.close()


async def new_tenant(settings: Settings) -> tuple[uuid.UUID, str]:
    """A tenant in the namespace's schema: (id, API key)."""
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        tenant, key = await create_tenant(conn, f"bench-{uuid.uuid4().hex[:6]}")
    finally:
        await conn.close()
    return tenant.id, key


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "ZAPBUS_NATS_URL": settings.nats_url,
        "ZAPBUS_DATABASE_URL": settings.database_url,
        "ZAPBUS_NAMESPACE": settings.namespace,
        "ZAPBUS_DB_SCHEMA": settings.db_schema,
        "ZAPBUS_ENV": "dev",
        "ZAPBUS_LOG_FORMAT": "json",
        "ZAPBUS_LOG_LEVEL": "INFO",
        "ZAPBUS_SHUTDOWN_GRACE_SECONDS": "3",
        **extra,
    }


class Procs:
    """Child processes of one benchmark, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, ctx: Ctx, tag: str) -> None:
        self.ctx = ctx
        self.tag = tag
        self.procs: dict[str, ServiceProcess] = {}
        self.urls: dict[str, str] = {}

    def add(
        self, name: str, module: str, env: Mapping[str, str], port: int, health: str = "/healthz"
    ) -> str:
        """Start ``python -m module``; return its base URL (wait with ``wait_healthy``)."""
        url = f"http://127.0.0.1:{port}"
        proc = ServiceProcess(
            name, module, env, url + health, self.ctx.logs / f"{self.tag}-{name}.log"
        )
        proc.start()
        self.procs[name] = proc
        self.urls[name] = url
        return url

    def service(self, settings: Settings, name: str, port: int = 0, **extra: str) -> str:
        """Start a zapbus service: ``gateway``, ``webhook``, ``session_worker``, ``projector``."""
        port = port or free_port()
        env = service_env(settings, **{SERVICE_PORTS[name]: str(port)}, **extra)
        return self.add(name, f"services.{name}", env, port)

    def simulator(self, api_key: str, **extra: str) -> str:
        """The Baileys simulator (a stand-in for an external server: its logs at WARNING)."""
        port = free_port()
        env = {
            "ZAPBUS_SIM_PORT": str(port),
            "ZAPBUS_BAILEYS_API_KEY": api_key,
            "ZAPBUS_LOG_LEVEL": "WARNING",
            **extra,
        }
        return self.add("baileys_sim", "services.baileys_sim", env, port)

    async def wait_healthy(self) -> None:
        for proc in self.procs.values():
            await proc.wait_healthy(timeout=60)

    def pid(self, name: str) -> int:
        proc = self.procs[name].proc
        assert proc is not None
        return proc.pid

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop(timeout=10)


@contextlib.asynccontextmanager
async def processes(ctx: Ctx, tag: str) -> AsyncIterator[Procs]:
    procs = Procs(ctx, tag)
    try:
        yield procs
    finally:
        await asyncio.to_thread(procs.stop_all)


class LoadProcess:
    """One spawned process that runs load-generator functions (``fn(*args)`` -> picklable)."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.pid: int | None = None

    async def start(self) -> None:
        """Spawn the process (and learn its pid). It inherits SIGINT ignored: Ctrl-C reaches
        the whole foreground process group, and the bench process, which stops the run in
        order, ends this one."""
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            started = self._pool.submit(os.getpid)  # spawns the process
        finally:
            signal.signal(signal.SIGINT, handler)
        self.pid = await asyncio.wrap_future(started)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self, kill: bool = False) -> None:
        """Wait for the process to finish its work and end; with ``kill`` (the run is being
        cancelled) end it now."""
        if kill and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.asynccontextmanager
async def load_process() -> AsyncIterator[LoadProcess]:
    """A load-generator process; killed at once if the block ends with an exception (Ctrl-C
    cancels the run while it generates load)."""
    lp = LoadProcess()
    done = False
    try:
        await lp.start()
        yield lp
        done = True
    finally:
        await asyncio.to_thread(lp.close, not done)
