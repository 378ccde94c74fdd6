"""Benchmark 2, a burst of sessions: N creates sent at once through the whole flow (gateway ->
worker -> simulator with a fixed 2 s create delay -> webhook -> projector), timed until every
connection has its QR in Postgres, against the ideal ``ceil(N / cap) * delay``."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
import asyncpg

from bench.cpu import proc_status
from bench.harness import Ctx, load_process, namespace, new_tenant, processes
from bench.load import CreateTarget, _post, getpid
from bench.stats import Section, num, pct
from zapbus.config import Settings
from zapbus.tools.localinfra import free_port


async def _burst(
    gateway_url: str, api_key: str, n: int, dsn: str, schema: str, timeout_s: float
) -> dict[str, Any]:
    target = CreateTarget(gateway_url + "/v1/connections", api_key)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    accepted: list[float] = []
    errors: list[str] = []
    timeline: list[tuple[float, int, int]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        t0 = time.perf_counter()
        t0_wall = time.time()

        async def one(i: int) -> None:
            url, body, headers, _ = target.request(i)
            status = await _post(http, url, body, headers)
            if status == 202:
                accepted.append(time.perf_counter() - t0)
            else:
                errors.append(str(status))

        posts = asyncio.gather(*(one(i) for i in range(n)))
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE qr IS NOT NULL) AS qr,"
                " count(*) FILTER (WHERE status NOT IN ('pending', 'creating')) AS created"
                " FROM connections"
            )
            now = time.perf_counter() - t0
            timeline.append((now, int(row["created"]), int(row["qr"])))
            if posts.done() and row["qr"] >= len(accepted):
                break
            if now > timeout_s:
                break
            await asyncio.sleep(0.05)
        await posts
    await conn.close()

    def first(col: int, count: int) -> float:
        return next((t for t, *c in timeline if c[col - 1] >= count), math.nan)

    return {
        "t0_wall": t0_wall,
        "accepted": len(accepted),
        "errors": errors,
        "all_accepted_s": max(accepted) if accepted else math.nan,
        "first_qr_s": first(2, 1),
        "half_qr_s": first(2, max(1, n // 2)),
        "all_created_s": first(1, n),
        "all_qr_s": first(2, n),
        "qr": timeline[-1][2],
    }


def burst_load(
    gateway_url: str, api_key: str, n: int, dsn: str, schema: str, timeout_s: float
) -> dict[str, Any]:
    return asyncio.run(_burst(gateway_url, api_key, n, dsn, schema, timeout_s))


STAGES = {
    "create.requested": "committed by the gateway",
    "create.started": "picked up by the worker",
    "create.succeeded": "created on the simulator",
    "qr.updated": "QR webhook received",
}


async def _stages(settings: Settings, t0_wall: float) -> dict[str, tuple[float, float]]:
    """When each stage was reached (p50 and last connection, seconds after the first send),
    from the history rows (occurred_at is stamped by the service that saw it happen; recorded_at
    by the projector's transaction)."""
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        rows = await conn.fetch(
            "SELECT connection_id, event_type, min(occurred_at) AS at, min(recorded_at) AS rec"
            " FROM connection_events GROUP BY connection_id, event_type"
        )
    finally:
        await conn.close()
    times: dict[str, list[float]] = {}
    for r in rows:
        times.setdefault(r["event_type"], []).append(r["at"].timestamp() - t0_wall)
        if r["event_type"] == "qr.updated":
            times.setdefault("qr.projected", []).append(r["rec"].timestamp() - t0_wall)
    return {k: (pct(v, 50), max(v)) for k, v in times.items()}


# The worker holds twice as many commands as the server's create cap, as the defaults do
# (ZAPBUS_WORKER_CONCURRENCY 100, ZAPBUS_BAILEYS_MAX_CONCURRENT_CREATES 50): the next create is
# fenced and placed while a slot is busy and starts the moment one frees. Held equal to the cap,
# each round of 100 also waited for an ack, a fetch, the fence and placement (1.13-1.17x).
HELD_PER_SLOT = 2


async def _one(ctx: Ctx, cap: int) -> dict[str, Any]:
    s = ctx.scale
    ideal = math.ceil(s.burst_n / cap) * s.burst_delay_s
    held = HELD_PER_SLOT * cap
    async with (
        load_process() as lp,
        # declared as `zapbus migrate` would with the worker's settings: the worker consumer's
        # max_ack_pending is the worker's concurrency (declared with the default 100, a cap of
        # 1,000 ran as 100)
        namespace(ctx, worker_concurrency=held, baileys_max_concurrent_creates=cap) as settings,
        processes(ctx, f"burst{cap}") as procs,
    ):
        _, key = await new_tenant(settings)
        sim = procs.simulator(
            settings.baileys_api_key, ZAPBUS_SIM_CREATE_DELAY=str(s.burst_delay_s)
        )
        webhook_port = free_port()
        procs.service(settings, "webhook", port=webhook_port)
        procs.service(settings, "projector")
        procs.service(
            settings,
            "session_worker",
            ZAPBUS_BAILEYS_URL=sim,
            ZAPBUS_WEBHOOK_PUBLIC_URL=f"http://127.0.0.1:{webhook_port}",
            ZAPBUS_WORKER_CONCURRENCY=str(held),
            ZAPBUS_BAILEYS_MAX_CONCURRENT_CREATES=str(cap),
        )
        gateway = procs.service(settings, "gateway")
        await procs.wait_healthy()
        worker = procs.pid("session_worker")
        idle_rss = proc_status(worker, "VmRSS")
        cpu = ctx.meter({**{n: procs.pid(n) for n in procs.procs}, "load": await lp.run(getpid)})
        ctx.say(f"burst: {s.burst_n} creates at once, cap {cap}, ideal {ideal:g} s")
        await ctx.quiet()
        cpu.start()
        profiled = ["session_worker", "gateway", "webhook", "projector"]
        async with ctx.profiling(procs, profiled, "burst"):
            out = await lp.run(
                burst_load,
                gateway,
                key,
                s.burst_n,
                settings.database_url,
                settings.db_schema,
                ideal * 3 + 30,
            )
        cpu.stop()
        out.update(
            stages=await _stages(settings, out["t0_wall"]),
            cap=cap,
            ideal=ideal,
            peak_rss=proc_status(worker, "VmHWM"),
            idle_rss=idle_rss,
            cpu=cpu.summary(),
        )
        ctx.say(
            f"  all QR in {out['all_qr_s']:.1f} s; worker peak RSS "
            f"{out['peak_rss'] / 2**20:.0f} MB ({out['cpu']})"
        )
        return out


async def run(ctx: Ctx) -> Section:
    s = ctx.scale
    results = [await _one(ctx, cap) for cap in s.burst_caps]
    sec = Section(
        "2. A burst of sessions",
        f"{s.burst_n} `POST /v1/connections` sent at once by the load generator (its own "
        f"process) to the gateway; the whole flow runs as separate processes: gateway, session "
        f"worker (`ZAPBUS_BAILEYS_MAX_CONCURRENT_CREATES` = the cap, `ZAPBUS_WORKER_CONCURRENCY` "
        f"= {HELD_PER_SLOT} x the cap as in the defaults, 100 and 50), simulator "
        f"(`ZAPBUS_SIM_CREATE_DELAY={s.burst_delay_s:g}`), webhook, projector. "
        f"Time from the first send until every connection has its QR in Postgres (polled every "
        f"50 ms). Ideal = ceil({s.burst_n} / cap) x {s.burst_delay_s:g} s. Worker peak RSS = "
        f"VmHWM of the worker process.",
        [
            "cap",
            "all accepted (s)",
            "first QR (s)",
            "all created (s)",
            "all QR (s)",
            "ideal (s)",
            "all QR / ideal",
            "worker RSS idle / peak (MB)",
        ],
    )
    for r in results:
        sec.row(
            r["cap"],
            f"{r['all_accepted_s']:.2f}",
            f"{r['first_qr_s']:.2f}",
            f"{r['all_created_s']:.2f}",
            f"{r['all_qr_s']:.2f}",
            f"{r['ideal']:g}",
            f"{r['all_qr_s'] / r['ideal']:.2f}",
            f"{num(r['idle_rss'] / 2**20)} / {num(r['peak_rss'] / 2**20)}",
        )
        stages = "; ".join(
            f"{STAGES.get(k, 'QR projected (transaction start)')} "
            f"{r['stages'][k][0]:.2f} / {r['stages'][k][1]:.2f} s"
            for k in [*STAGES, "qr.projected"]
            if k in r["stages"]
        )
        sec.notes.append(
            f"cap {r['cap']}, when each stage was reached (p50 / last connection, from the "
            f"history rows' timestamps): {stages}."
        )
        sec.notes.append(
            f"cap {r['cap']}: {r['accepted']} accepted, {r['qr']} with a QR at the end"
            + (f", errors {r['errors'][:5]}" if r["errors"] else "")
            + f"; CPU during the burst: {r['cpu']}."
        )
    low, high = results
    sec.target(
        f"cap {low['cap']}: within 10 % of the ideal",
        f"{low['all_qr_s']:.1f} s vs {low['ideal']:g} s "
        f"({100 * (low['all_qr_s'] / low['ideal'] - 1):+.0f} %)",
        low["all_qr_s"] <= low["ideal"] * 1.1,
    )
    sec.target(
        f"cap {high['cap']}: within 2x of {s.burst_delay_s:g} s",
        f"{high['all_qr_s']:.1f} s ({high['all_qr_s'] / s.burst_delay_s:.1f}x)",
        high["all_qr_s"] <= 2 * s.burst_delay_s,
    )
    sec.target(
        f"cap {high['cap']}: worker peak RSS < 150 MB",
        f"{high['peak_rss'] / 2**20:.0f} MB",
        high["peak_rss"] < 150 * 2**20,
    )
    return sec
