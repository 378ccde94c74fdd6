"""Benchmark 1, accepting a create: ``POST /v1/connections`` on the gateway, against its floor
(one Postgres insert transaction + one JetStream publish-ack, asyncpg and nats-py, no HTTP), and
against the original design (an HTTP handler that waits for the Baileys server, 8 s timeout)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats

from bench.harness import Ctx, LoadProcess, load_process, namespace, new_tenant, processes
from bench.load import CreateTarget, closed_loop, getpid, open_loop, summarize
from bench.stats import Section, ms, num, ratio
from proto import headers
from proto.commands import CreateSession, command_encoder
from zapbus import db
from zapbus.tokens import session_name
from zapbus.tools.localinfra import free_port

GATEWAY_POOL_SIZE = 10  # zapbus.db.create_pool's default, which the gateway uses


@dataclass(frozen=True)
class FloorSpec:
    dsn: str
    schema: str
    nats_url: str
    subject: str
    tenant_id: uuid.UUID


class _Floor:
    def __init__(self, spec: FloorSpec) -> None:
        self.spec = spec

    async def __aenter__(self) -> _Floor:
        self.pool = await db.create_pool(
            self.spec.dsn, self.spec.schema, min_size=GATEWAY_POOL_SIZE, max_size=GATEWAY_POOL_SIZE
        )
        self.nc = await nats.connect(self.spec.nats_url, name="zapbus-bench-floor")
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        await self.pool.close()

    async def once(self) -> None:
        """What accepting a create cannot do without: insert the row, publish the command."""
        connection_id, command_id = uuid.uuid4(), uuid.uuid4()
        name = session_name(connection_id, 1)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO connections (id, tenant_id, name, generation, session_name, status,"
                " command_id) VALUES ($1, $2, 'bench', 1, $3, 'pending', $4)",
                connection_id,
                self.spec.tenant_id,
                name,
                command_id,
            )
        cmd = CreateSession(
            command_id=command_id,
            connection_id=connection_id,
            tenant_id=self.spec.tenant_id,
            generation=1,
            session_name=name,
            requested_at=datetime.now(UTC),
        )
        await self.js.publish(
            self.spec.subject,
            command_encoder.encode(cmd),
            timeout=3.0,
            headers={headers.MSG_ID: str(command_id)},
        )


async def _floor_closed(spec: FloorSpec, clients: int, duration: float) -> dict[str, Any]:
    async with _Floor(spec) as floor:
        latencies: list[float] = []
        t0 = time.perf_counter()
        end = t0 + duration

        async def client() -> None:
            while time.perf_counter() < end:
                start = time.perf_counter()
                await floor.once()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {
        "ok": len(latencies),
        "elapsed": elapsed,
        "rate": len(latencies) / elapsed,
        "http": summarize(latencies),
    }


async def _floor_open(spec: FloorSpec, rate: float, duration: float) -> dict[str, Any]:
    async with _Floor(spec) as floor:
        latencies: list[float] = []

        async def one(due: float) -> None:
            await floor.once()
            latencies.append(time.perf_counter() - due)

        n = max(1, int(rate * duration))
        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return {"ok": len(latencies), "http": summarize(latencies)}


def floor_closed(spec: FloorSpec, clients: int, duration: float) -> dict[str, Any]:
    return asyncio.run(_floor_closed(spec, clients, duration))


def floor_open(spec: FloorSpec, rate: float, duration: float) -> dict[str, Any]:
    return asyncio.run(_floor_open(spec, rate, duration))


async def _original(ctx: Ctx, lp: LoadProcess, rate: float) -> dict[str, Any]:
    async with processes(ctx, "original") as procs:
        sim_url = procs.simulator("bench-key", ZAPBUS_SIM_CREATE_DELAY="10-30")
        port = free_port()
        url = procs.add(
            "original",
            "bench.original",
            {
                "BENCH_PORT": str(port),
                "BENCH_SIM_URL": sim_url,
                "BENCH_SIM_KEY": "bench-key",
                "BENCH_TIMEOUT": str(ctx.scale.original_timeout_s),
            },
            port,
        )
        await procs.wait_healthy()
        target = CreateTarget(url + "/v1/connections", "unused")
        return await lp.run(open_loop, target, rate, ctx.scale.original_s, None, 60.0)


async def run(ctx: Ctx) -> Section:
    scale = ctx.scale
    async with load_process() as lp, namespace(ctx) as settings, processes(ctx, "create") as procs:
        tenant_id, key = await new_tenant(settings)
        gateway = procs.service(settings, "gateway")
        await procs.wait_healthy()
        target = CreateTarget(gateway + "/v1/connections", key)
        spec = FloorSpec(
            settings.database_url,
            settings.db_schema,
            settings.nats_url,
            settings.names.command_subject("create"),
            tenant_id,
        )
        cpu = ctx.meter({"gateway": procs.pid("gateway"), "load": await lp.run(getpid)})
        await lp.run(closed_loop, target, 8, scale.warmup_s)  # warm up connections, caches
        ctx.say(f"create: gateway capacity, {scale.clients} clients, {scale.capacity_s:.0f} s")
        await ctx.quiet()
        cpu.start()
        async with ctx.profiling(procs, ["gateway"], "capacity"):
            cap = await lp.run(closed_loop, target, scale.clients, scale.capacity_s)
        cpu.stop()
        cap_cpu = cpu.summary()
        ctx.say(f"  {cap['rate']:.0f} creates/s ({cap_cpu}); floor capacity")
        await ctx.quiet()
        cpu.start()
        floor_cap = await lp.run(floor_closed, spec, scale.clients, scale.capacity_s)
        cpu.stop()
        floor_cpu = cpu.summary()
        ctx.say(f"  floor {floor_cap['rate']:.0f}/s ({floor_cpu})")
        rate = cap["rate"] / 2
        ctx.say(f"create: gateway latency, open loop {rate:.0f}/s, {scale.latency_s:.0f} s")
        await ctx.quiet()
        cpu.start()
        lat = await lp.run(open_loop, target, rate, scale.latency_s)
        cpu.stop()
        lat_cpu = cpu.summary()
        ctx.say(f"  p50 {ms(lat['http']['p50'])} p99 {ms(lat['http']['p99'])} ms; floor latency")
        await ctx.quiet()
        cpu.start()
        floor_lat = await lp.run(floor_open, spec, rate, scale.latency_s)
        cpu.stop()
        floor_lat_cpu = cpu.summary()
        outbox_left = await _outbox_backlog(settings.database_url, settings.db_schema)
        ctx.say(f"create: original design, open loop {rate:.0f}/s, {scale.original_s:.0f} s")
        orig = await _original(ctx, lp, rate)
    cpu_notes = {
        "gateway capacity": cap_cpu,
        "floor capacity": floor_cpu,
        "gateway latency": lat_cpu,
        "floor latency": floor_lat_cpu,
    }
    return _section(ctx, cap, floor_cap, lat, floor_lat, orig, rate, cpu_notes, outbox_left)


async def _outbox_backlog(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox"))
    finally:
        await conn.close()


def _section(
    ctx: Ctx,
    cap: dict[str, Any],
    floor_cap: dict[str, Any],
    lat: dict[str, Any],
    floor_lat: dict[str, Any],
    orig: dict[str, Any],
    rate: float,
    cpu_notes: dict[str, str],
    outbox_left: int,
) -> Section:
    s = ctx.scale
    sec = Section(
        "1. Accepting a create",
        f"Gateway (`python -m services.gateway`, its own process, pool of {GATEWAY_POOL_SIZE}) "
        f"driven over HTTP by the load generator (another process). Capacity: {s.clients} "
        f"closed-loop clients for {s.capacity_s:.0f} s. Latency: open loop at half that capacity "
        f"({rate:.0f}/s) for {s.latency_s:.0f} s, from each request's scheduled send time. "
        f"Floor: in the load-generator process, one asyncpg transaction inserting the same "
        f"connection row plus one JetStream publish-ack of the create command (pool of "
        f"{GATEWAY_POOL_SIZE}), at the same concurrency and the same rate. Original design: an "
        f"aiohttp handler (bench/original.py, own process) that waits for the simulator's "
        f"`POST /sessions` (delay 10-30 s, own process) with a {s.original_timeout_s:g} s "
        f"timeout, open loop at the "
        f"same rate for {s.original_s:.0f} s.",
        ["measure", "gateway", "floor", "gateway / floor"],
    )
    sec.row(
        f"capacity, {s.clients} clients (creates/s)",
        num(cap["rate"]),
        num(floor_cap["rate"]),
        f"{ratio(cap['rate'], floor_cap['rate']):.2f}",
    )
    for q in ("p50", "p90", "p99", "max"):
        g, f = lat["http"][q], floor_lat["http"][q]
        sec.row(f"latency {q} at {rate:.0f}/s (ms)", ms(g), ms(f), f"{ratio(g, f):.1f}")
    failed = sum(orig["errors"].values())
    sec.row(
        f"original design at {rate:.0f}/s: p50 / p99 / max (ms)",
        f"{ms(orig['all_http']['p50'])} / {ms(orig['all_http']['p99'])} / "
        f"{ms(orig['all_http']['max'])}",
        "",
        "",
    )
    sec.row(
        "original design: requests failed",
        f"{failed} of {orig['sent']} ({100 * failed / max(1, orig['sent']):.0f} %): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(orig["errors"].items())),
        "",
        "",
    )
    cap_ratio = ratio(cap["rate"], floor_cap["rate"])
    p50_ratio = ratio(lat["http"]["p50"], floor_lat["http"]["p50"])
    sec.target("capacity >= 50 % of the floor's", f"{100 * cap_ratio:.0f} %", cap_ratio >= 0.5)
    sec.target(
        "p99 < 25 ms at half capacity", f"{ms(lat['http']['p99'])} ms", lat["http"]["p99"] < 0.025
    )
    sec.target("p50 within 3x of the floor's p50", f"{p50_ratio:.1f}x", p50_ratio <= 3.0)
    sec.notes += [
        "CPU (100 % = one core; other = processes outside this benchmark): "
        + "; ".join(f"{k}: {v}" for k, v in cpu_notes.items())
        + ".",
        f"Gateway errors: capacity {cap['errors'] or 'none'}, latency {lat['errors'] or 'none'}; "
        f"load-generator send lag p99 {ms(lat['send_lag']['p99'])} ms; "
        f"outbox rows not yet relayed at the end: {outbox_left}.",
    ]
    return sec
