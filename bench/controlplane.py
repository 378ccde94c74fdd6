"""Benchmark 8, the control plane's cost vs connections: what zapbus costs at rest, with fleets
of 1,000, 10,000 and 100,000 connections (``--quick``: 100 and 1,000).

For each fleet: rows bulk-loaded into a schema of its own (``bench/fleet.py``), their sessions
held by stand-in Baileys servers (one process standing in for one server per 5,000
connections, at least two: ``bench/standin.py``), and gateway, session worker (reconciler, pool
manager), projector (watchdog), webhook and notifier started as in production, with their
production intervals (``--quick`` shortens the reconciler's and the watchdog's). Nothing
happens meanwhile: what they spend is the control plane's own cost.

* CPU at rest: each service's CPU seconds per minute over a window (a full minute, so one
  reconciler sweep, four watchdog sweeps and sixty pool ticks fall in it), after a short settle;
* placement: one create placed among the servers (``placement.place``, as the worker calls it,
  from this process while the services run), p50 of many;
* sweeps and the pool tick: timed in this process once the services stopped, with the
  services' own code (``Reconciler.sweep``, ``Watchdog.sweep``, ``ServerPoolManager.step``),
  median of a few; the services' ``zapbus_*_sweep_seconds`` / ``zapbus_pool_tick_seconds``
  histograms over the window, where they export them, are in the notes;
* Postgres: the schema's tables, indexes and TOAST.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import msgspec
import nats
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bench import fleet
from bench.harness import Ctx, Procs, namespace, processes
from bench.stats import Section, num, pct
from proto.commands import CreateSession
from services.projector.watchdog import Watchdog, WatchdogMetrics
from services.session_worker.app import build_servers, placement_policy, reconcile_policy
from services.session_worker.manager import ServerPoolManager, ServerPoolMetrics
from services.session_worker.placement import Placed, place
from services.session_worker.reconciler import ReconcileMetrics, Reconciler
from zapbus import db
from zapbus.config import Settings, load_settings
from zapbus.connection.states import Status
from zapbus.tools.localinfra import free_port

SERVICES = ("gateway", "session_worker", "projector", "webhook", "notifier")
PER_SERVER = 5000  # connections per stand-in server (at least two servers)
WATCHDOG_DEADLINE_S = 3600.0  # nothing of the fleet is stuck while it is measured
# the services' own timings (histograms), where they export them
HISTOGRAMS = {
    "session_worker": ("zapbus_reconcile_sweep_seconds", "zapbus_pool_tick_seconds"),
    "projector": ("zapbus_watchdog_sweep_seconds",),
}


def _server_names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(1, max(2, n // PER_SERVER) + 1)]


async def _scrape(http: aiohttp.ClientSession, url: str) -> dict[str, tuple[float, float]]:
    """Histogram name -> (sum, count) from a service's /metrics."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    found: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        total = count = 0.0
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        found[family.name] = (total, count)
    return found


async def _timed(fn: Callable[[], Awaitable[Any]], runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _placements(pool: asyncpg.Pool, settings: Settings, k: int) -> list[float]:
    """Seconds of each of ``k`` placements of new connections among the servers."""
    tenant = await pool.fetchval("SELECT id FROM tenants LIMIT 1")
    ids = [uuid.uuid4() for _ in range(k)]
    await pool.executemany(
        "INSERT INTO connections (id, tenant_id, name, session_name, status)"
        " VALUES ($1, $2, 'placed-by-bench', $3, $4)",
        [(i, tenant, f"zb_{i.hex}_g1", Status.PENDING.value) for i in ids],
    )
    policy = placement_policy(settings)
    times = []
    for cid in ids:
        cmd = CreateSession(
            command_id=uuid.uuid4(),
            connection_id=cid,
            tenant_id=tenant,
            generation=1,
            session_name=f"zb_{cid.hex}_g1",
            requested_at=datetime.now(UTC),
        )
        t0 = time.perf_counter()
        placed = await place(pool, cmd, settings.servers, policy)
        times.append(time.perf_counter() - t0)
        assert isinstance(placed, Placed), placed
    return times


async def _in_process(settings: Settings, pool: asyncpg.Pool, runs: int) -> dict[str, Any]:
    """The reconciler's and the watchdog's sweep and the pool manager's tick, timed here with
    the services' code (the services stopped: no lock is held by them)."""
    nc = await nats.connect(settings.nats_url, name="zapbus-bench-controlplane")
    try:
        async with aiohttp.ClientSession() as http:
            servers = build_servers(settings, http, None)
            reconciler = Reconciler(
                pool,
                nc.jetstream(),
                settings.names,
                servers,
                ReconcileMetrics(CollectorRegistry()),
                settings.reconcile_interval_seconds,
                reconcile_policy(settings),
            )

            drift: list[str] = []

            async def sweep() -> None:
                found = await reconciler.sweep(wait_for_lock=5.0)
                assert found is not None, "no reconcile sweep"
                drift.extend(f"{i.kind}:{i.session_name}" for i in found.items)

            reconcile = await _timed(sweep, runs)
            watchdog = Watchdog(
                pool,
                settings.names,
                WatchdogMetrics(CollectorRegistry()),
                WATCHDOG_DEADLINE_S,
                settings.watchdog_interval_seconds,
                settings.watchdog_max_redrives,
            )
            watch = await _timed(watchdog.sweep, runs)
            manager = ServerPoolManager(
                pool,
                settings.names,
                servers,
                ServerPoolMetrics(CollectorRegistry(), list(servers.servers)),
                placement_policy(settings),
                health_interval_seconds=settings.baileys_health_interval_seconds,
                failover_after_seconds=settings.baileys_failover_after_seconds,
                failover_per_second=settings.baileys_failover_per_second,
            )
            try:
                await manager.step()  # leads (and probes every server) first
                tick = await _timed(manager.step, runs + 2)
            finally:
                manager.stop()
                await manager.run()  # stopped: steps down and returns
            await servers.close()
    finally:
        await nc.close()
    return {"reconcile": reconcile, "watchdog": watch, "tick": tick, "drift": drift}


async def _stop_services(procs: Procs) -> None:
    for name in SERVICES:
        await asyncio.to_thread(procs.procs[name].stop, 10)


async def _fleet(ctx: Ctx, n: int) -> dict[str, Any]:
    s = ctx.scale
    servers = _server_names(n)
    quick = s.controlplane_window_s < 10
    intervals = {"reconcile_interval_seconds": 0.5, "watchdog_interval_seconds": 0.5}
    async with (
        namespace(ctx, **(intervals if quick else {})) as base,
        processes(ctx, f"cp{n}") as procs,
    ):
        dsn, schema = base.database_url, base.db_schema
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            t0 = time.perf_counter()
            await fleet.load(conn, n, servers)
            loaded_s = time.perf_counter() - t0
            held = await fleet.sessions(conn)
        finally:
            await conn.close()
        ctx.say(f"controlplane: {n:,} connections on {len(servers)} servers ({loaded_s:.1f} s)")
        port = free_port()
        standin = procs.add(
            "standin",
            "bench.standin",
            {"BENCH_PORT": str(port), "ZAPBUS_LOG_LEVEL": "WARNING"},
            port,
        )
        await procs.procs["standin"].wait_healthy(timeout=60)
        async with aiohttp.ClientSession() as http:
            async with http.post(standin + "/_load", data=msgspec.json.encode(held)) as r:
                assert r.status == 200, await r.text()
        urls = ",".join(f"{name}={standin}/{name}" for name in servers)
        settings = load_settings(
            {},
            nats_url=base.nats_url,
            database_url=dsn,
            namespace=base.namespace,
            db_schema=schema,
            env="dev",
            baileys_urls=urls,
            reconcile_interval_seconds=base.reconcile_interval_seconds,
            watchdog_interval_seconds=base.watchdog_interval_seconds,
        )
        every = {
            "ZAPBUS_RECONCILE_INTERVAL_SECONDS": f"{settings.reconcile_interval_seconds:g}",
            "ZAPBUS_WATCHDOG_INTERVAL_SECONDS": f"{settings.watchdog_interval_seconds:g}",
            "ZAPBUS_WATCHDOG_DEADLINE_SECONDS": f"{WATCHDOG_DEADLINE_S:g}",
        }
        webhook_port = free_port()
        procs.service(base, "webhook", port=webhook_port)
        procs.service(base, "gateway")
        procs.service(base, "projector", port=free_port(), **every)
        procs.service(base, "notifier")
        procs.service(
            base,
            "session_worker",
            port=free_port(),
            ZAPBUS_BAILEYS_URLS=urls,
            ZAPBUS_WEBHOOK_PUBLIC_URL=f"http://127.0.0.1:{webhook_port}",
            **every,
        )
        await procs.wait_healthy()
        await asyncio.sleep(s.controlplane_settle_s)
        cpu = ctx.meter({name: procs.pid(name) for name in SERVICES})
        async with aiohttp.ClientSession() as http:
            before = {name: await _scrape(http, procs.urls[name]) for name in HISTOGRAMS}
            cpu.start()
            await asyncio.sleep(s.controlplane_window_s)
            cpu.stop()
            after = {name: await _scrape(http, procs.urls[name]) for name in HISTOGRAMS}
        per_min = {k: v * 60 / 100 for k, v in cpu.percent.items()}
        served: dict[str, float] = {}
        for service, metrics in HISTOGRAMS.items():
            for metric in metrics:
                if metric in after[service]:
                    total, count = after[service][metric]
                    t0_sum, t0_count = before[service].get(metric, (0.0, 0.0))
                    if count > t0_count:
                        total, count = total - t0_sum, count - t0_count
                    served[metric] = total / count if count else float("nan")
        pool = await db.create_pool(dsn, schema, max_size=4)
        try:
            placements = await _placements(pool, settings, s.controlplane_placements)
            await _stop_services(procs)
            timed = await _in_process(settings, pool, s.controlplane_runs)
            size = await pool.fetchval(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
                " JOIN pg_namespace ns ON ns.oid = c.relnamespace"
                " WHERE ns.nspname = $1 AND c.relkind IN ('r', 'm')",
                schema,
            )
        finally:
            await pool.close()
    result = {
        "n": n,
        "servers": len(servers),
        "cpu": per_min,
        "services_cpu": sum(per_min.get(k, 0.0) for k in SERVICES),
        "placement_p50": pct(placements, 50),
        "served": served,
        "pg_mb": int(size) / 2**20,
        "loaded_s": loaded_s,
        **timed,
    }
    ctx.say(
        f"  at rest: services {result['services_cpu']:.2f} CPU s/min, postgres"
        f" {per_min.get('postgres', 0.0):.2f}; reconcile {timed['reconcile'] * 1000:.1f} ms,"
        f" watchdog {timed['watchdog'] * 1000:.1f} ms, tick {timed['tick'] * 1000:.1f} ms,"
        f" placement p50 {result['placement_p50'] * 1000:.1f} ms"
    )
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 0.1 else f"{seconds * 1000:,.0f}"


async def run(ctx: Ctx) -> Section:
    s = ctx.scale
    results = [await _fleet(ctx, n) for n in s.controlplane_sizes]
    sec = Section(
        "8. Control-plane cost vs connections",
        "Fleets at rest (`bench/controlplane.py`): connection rows bulk-loaded in the mix of "
        "`bench/fleet.py` (about two thirds live, 60 % linked; a third ended; three history rows "
        f"each), one stand-in Baileys server per {PER_SERVER:,} connections (at least two; one "
        "process, `bench/standin.py`, answering lists from memory) holding every live row's "
        "session, and gateway, session worker, projector, webhook and notifier as their own "
        "processes with production intervals (reconciler 60 s, watchdog 15 s, pool tick 1 s, "
        f"health 5 s). CPU: each service over {s.controlplane_window_s:g} s at rest, as CPU "
        "seconds per minute (Postgres: the whole server, every backend). Placement: "
        f"{s.controlplane_placements} creates placed among the servers one after the other "
        "(`placement.place`) while the services run. Sweeps and the pool tick: the services' "
        "code run in the benchmark's process after they stopped, median of "
        f"{s.controlplane_runs}. Postgres: the schema's tables with indexes and TOAST.",
        [
            "connections",
            "servers",
            "CPU s/min: gateway / worker / projector / webhook / notifier",
            "services",
            "postgres",
            "reconciler sweep (ms)",
            "watchdog sweep (ms)",
            "pool tick (ms)",
            "placement p50 (ms)",
            "Postgres (MB)",
        ],
    )
    for r in results:
        c = r["cpu"]
        sec.row(
            num(r["n"]),
            r["servers"],
            " / ".join(f"{c.get(k, 0.0):.2f}" for k in SERVICES),
            f"{r['services_cpu']:.2f}",
            f"{c.get('postgres', 0.0):.2f}",
            _ms(r["reconcile"]),
            _ms(r["watchdog"]),
            _ms(r["tick"]),
            _ms(r["placement_p50"]),
            num(r["pg_mb"]),
        )
    small, big = results[0], results[-1]
    grows = big["n"] / small["n"]
    cpu_ratio = big["services_cpu"] / small["services_cpu"] if small["services_cpu"] else 0.0
    sec.row(
        f"growth {num(big['n'])} / {num(small['n'])}",
        "",
        "",
        f"{cpu_ratio:.1f}x",
        f"{big['cpu'].get('postgres', 0.0) / max(small['cpu'].get('postgres', 0.0), 1e-9):.1f}x",
        f"{big['reconcile'] / small['reconcile']:.1f}x",
        f"{big['watchdog'] / small['watchdog']:.1f}x",
        f"{big['tick'] / small['tick']:.1f}x",
        f"{big['placement_p50'] / small['placement_p50']:.1f}x",
        f"{big['pg_mb'] / small['pg_mb']:.1f}x",
    )
    limit = grows**0.5  # 100x the fleet: under 10x the CPU
    sec.target(
        f"CPU at rest grows less than linearly: {grows:.0f}x the connections cost < {limit:.0f}x",
        f"{cpu_ratio:.1f}x ({small['services_cpu']:.2f} -> {big['services_cpu']:.2f} CPU s/min)",
        cpu_ratio < limit,
    )
    sec.target(
        f"reconciler sweep < 1 s at {num(big['n'])}",
        f"{_ms(big['reconcile'])} ms",
        big["reconcile"] < 1.0,
    )
    sec.target(
        f"watchdog sweep < 1 s at {num(big['n'])}",
        f"{_ms(big['watchdog'])} ms",
        big["watchdog"] < 1.0,
    )
    for r in results:
        served = ", ".join(f"{k} {_ms(v)} ms" for k, v in sorted(r["served"].items()))
        sec.notes.append(
            f"{num(r['n'])} connections: loaded in {r['loaded_s']:.1f} s; CPU at rest "
            f"(s/min): "
            + ", ".join(f"{k} {max(0.0, v):.2f}" for k, v in r["cpu"].items())
            + (f"; the services' own histograms over the window (mean): {served}" if served else "")
            + (f"; drift seen (not at rest!): {r['drift'][:5]}" if r["drift"] else "")
            + "."
        )
    return sec
