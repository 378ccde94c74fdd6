"""Benchmark 3, webhook ingest end to end: Baileys webhooks POSTed to the webhook service, until
the projector has committed their row in Postgres; against a bare aiohttp endpoint that parses the
JSON and answers 200, driven by the same load generator."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from bench.cpu import CpuMeter
from bench.harness import (
    Ctx,
    LoadProcess,
    Procs,
    load_process,
    namespace,
    new_tenant,
    processes,
)
from bench.load import Listen, RowCount, WebhookTarget, closed_loop, getpid, open_loop
from bench.stats import Section, ms, num, ratio
from zapbus.config import Settings
from zapbus.tokens import session_name, webhook_url
from zapbus.tools.localinfra import free_port

# Each row the projector commits announces the marker it carries (NOTIFY is sent at commit):
# a QR code that was applied, or the reason of a status report (kept in the history row).
_TRIGGERS = """
CREATE FUNCTION bench_notify_qr() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{channel}', NEW.qr); RETURN NULL; END $$;
CREATE TRIGGER bench_qr AFTER UPDATE OF qr ON connections FOR EACH ROW
    WHEN (NEW.qr IS DISTINCT FROM OLD.qr AND NEW.qr IS NOT NULL)
    EXECUTE FUNCTION bench_notify_qr();
CREATE FUNCTION bench_notify_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{channel}', NEW.reason); RETURN NULL; END $$;
CREATE TRIGGER bench_status AFTER INSERT ON connection_events FOR EACH ROW
    WHEN (NEW.event_type = 'status.reported' AND NEW.reason IS NOT NULL)
    EXECUTE FUNCTION bench_notify_status();
"""


async def seed_connections(
    settings: Settings, tenant_id: uuid.UUID, n: int, status: str
) -> list[uuid.UUID]:
    """``n`` connections of generation 1 in ``status``, inserted directly."""
    ids = [uuid.uuid4() for _ in range(n)]
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        await conn.copy_records_to_table(
            "connections",
            records=[(i, tenant_id, "bench", 1, session_name(i, 1), status) for i in ids],
            columns=["id", "tenant_id", "name", "generation", "session_name", "status"],
            schema_name=settings.db_schema,
        )
        await conn.execute("ANALYZE connections")  # like a table that has been in use
    finally:
        await conn.close()
    return ids


async def _install_triggers(settings: Settings, channel: str) -> None:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        await conn.execute(_TRIGGERS.format(channel=channel))
    finally:
        await conn.close()


async def _triggers(settings: Settings, enable: bool) -> None:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    verb = "ENABLE" if enable else "DISABLE"
    try:
        await conn.execute(
            f"ALTER TABLE connections {verb} TRIGGER bench_qr;"
            f" ALTER TABLE connection_events {verb} TRIGGER bench_status"
        )
    finally:
        await conn.close()


def _targets(settings: Settings, ids: list[uuid.UUID], base: str, tag: str) -> WebhookTarget:
    urls = tuple(webhook_url(base, settings.webhook_secret, i, 1) for i in ids)
    return WebhookTarget(urls, tuple(session_name(i, 1) for i in ids), tag)


async def _measure(
    ctx: Ctx,
    lp: LoadProcess,
    procs: Procs,
    settings: Settings,
    ids: list[uuid.UUID],
    channel: str,
    webhook: str,
    bare: str,
    cpu: CpuMeter,
) -> dict[str, Any]:
    s = ctx.scale
    listen = Listen(settings.database_url, channel)
    await lp.run(closed_loop, _targets(settings, ids, webhook, "w"), 8, s.warmup_s, listen)
    await lp.run(closed_loop, _targets(settings, ids, bare, "w"), 8, s.warmup_s)
    ctx.say(f"webhook: capacity, {s.clients} clients, {s.capacity_s:.0f} s")
    rows = RowCount(
        settings.database_url,
        f'SELECT coalesce(max(seq), 0) FROM "{settings.db_schema}".connection_events',
    )
    await _triggers(settings, enable=False)  # capacity: count rows, no NOTIFY per row
    await ctx.quiet()
    cpu.start()
    async with ctx.profiling(procs, ["webhook", "projector"], "capacity"):
        cap = await lp.run(
            closed_loop, _targets(settings, ids, webhook, "c"), s.clients, s.capacity_s, None, rows
        )
    cpu.stop()
    await _triggers(settings, enable=True)
    cap_cpu = cpu.summary()
    ctx.say(f"  {cap['commit_rate']:.0f} committed/s, HTTP {cap['rate']:.0f}/s ({cap_cpu})")
    await ctx.quiet()
    cpu.start()
    bare_cap = await lp.run(
        closed_loop, _targets(settings, ids, bare, "b"), s.clients, s.capacity_s
    )
    cpu.stop()
    bare_cpu = cpu.summary()
    ctx.say(f"  bare endpoint {bare_cap['rate']:.0f}/s ({bare_cpu})")
    rate = cap["commit_rate"] / 2
    ctx.say(f"webhook: latency, open loop {rate:.0f}/s, {s.latency_s:.0f} s")
    await ctx.quiet()
    cpu.start()
    async with ctx.profiling(procs, ["webhook", "projector"], "latency"):
        lat = await lp.run(
            open_loop, _targets(settings, ids, webhook, "l"), rate, s.latency_s, listen
        )
    cpu.stop()
    lat_cpu = cpu.summary()
    ctx.say(f"  POST->row p50 {ms(lat['e2e']['p50'])} p99 {ms(lat['e2e']['p99'])} ms ({lat_cpu})")
    await ctx.quiet()
    cpu.start()
    bare_lat = await lp.run(open_loop, _targets(settings, ids, bare, "m"), rate, s.latency_s)
    cpu.stop()
    bare_lat_cpu = cpu.summary()
    return {
        "cap": cap,
        "bare_cap": bare_cap,
        "lat": lat,
        "bare_lat": bare_lat,
        "rate": rate,
        "cap_cpu": cap_cpu,
        "bare_cpu": bare_cpu,
        "lat_cpu": lat_cpu,
        "bare_lat_cpu": bare_lat_cpu,
    }


async def run(ctx: Ctx) -> Section:
    s = ctx.scale
    async with (
        load_process() as lp,
        namespace(ctx, qr_max_refreshes=10**9) as settings,
        processes(ctx, "webhook") as procs,
    ):
        tenant_id, _ = await new_tenant(settings)
        ids = await seed_connections(settings, tenant_id, s.webhook_connections, "awaiting_qr")
        channel = f"{settings.namespace}_committed"
        await _install_triggers(settings, channel)
        webhook = procs.service(settings, "webhook")
        procs.service(settings, "projector", ZAPBUS_QR_MAX_REFRESHES=str(10**9))
        port = free_port()
        bare = procs.add("bare", "bench.bare", {"BENCH_PORT": str(port)}, port)
        await procs.wait_healthy()
        cpu = ctx.meter({n: procs.pid(n) for n in procs.procs} | {"load": await lp.run(getpid)})
        r = await _measure(ctx, lp, procs, settings, ids, channel, webhook, bare, cpu)
    return _section(ctx, r)


def _section(ctx: Ctx, r: dict[str, Any]) -> Section:
    s = ctx.scale
    cap, bare_cap, lat, bare_lat, rate = r["cap"], r["bare_cap"], r["lat"], r["bare_lat"], r["rate"]
    sec = Section(
        "3. Webhook ingest, end to end",
        f"`qr.update` and `session.status` webhooks (3:1, ~330-byte bodies, each with a unique "
        f"QR or reason) POSTed to valid webhook URLs of {s.webhook_connections} connections "
        f"inserted in Postgres (status awaiting_qr), round robin. Webhook service and projector "
        f"run as their own processes (projector with `ZAPBUS_QR_MAX_REFRESHES` raised so every QR "
        f'applies). "Committed" = the load generator got the NOTIFY that a trigger sends for '
        f"the row (connections.qr changed, or the status report's history row); those triggers "
        f"are off during the capacity run, which counts history rows instead (max(seq), read "
        f"at the start and end of the window). Capacity: {s.clients} closed-loop clients for "
        f"{s.capacity_s:.0f} s; events/s = history rows committed within the window / window. "
        f"Latency: open loop at half that rate ({rate:.0f}/s) for {s.latency_s:.0f} s, from "
        f"each webhook's scheduled send time to its row's NOTIFY. Floor: `bench/bare.py` "
        f"(aiohttp, parse JSON, answer 200; own process), same load generator, same clients "
        f"and rate.",
        ["measure", "webhook -> Postgres", "bare endpoint", "webhook / bare"],
    )
    sec.row(
        f"capacity, {s.clients} clients: events/s committed",
        num(cap["commit_rate"]),
        num(bare_cap["rate"]),
        f"{ratio(cap['commit_rate'], bare_cap['rate']):.2f}",
    )
    sec.row(
        "capacity: HTTP answers/s",
        num(cap["rate"]),
        num(bare_cap["rate"]),
        f"{ratio(cap['rate'], bare_cap['rate']):.2f}",
    )
    for q in ("p50", "p90", "p99", "max"):
        sec.row(
            f"{q} at {rate:.0f}/s: POST -> row committed (bare: HTTP answer) (ms)",
            ms(lat["e2e"][q]),
            ms(bare_lat["http"][q]),
            f"{ratio(lat['e2e'][q], bare_lat['http'][q]):.1f}",
        )
    for q in ("p50", "p99"):
        sec.row(
            f"{q} at {rate:.0f}/s: HTTP answer (ms)",
            ms(lat["http"][q]),
            ms(bare_lat["http"][q]),
            f"{ratio(lat['http'][q], bare_lat['http'][q]):.1f}",
        )
    cap_ratio = ratio(cap["commit_rate"], bare_cap["rate"])
    sec.target(
        "capacity >= 50 % of the bare endpoint's", f"{100 * cap_ratio:.0f} %", cap_ratio >= 0.5
    )
    sec.target(
        "p99 POST -> row < 100 ms at half rate",
        f"{ms(lat['e2e']['p99'])} ms",
        lat["e2e"]["p99"] < 0.1,
    )
    sec.notes += [
        f"CPU (100 % = one core; other = processes outside this benchmark): webhook capacity: "
        f"{r['cap_cpu']}; bare capacity: {r['bare_cpu']}; webhook latency: {r['lat_cpu']}; "
        f"bare latency: {r['bare_lat_cpu']}.",
        f"Capacity run: {cap['committed']} committed, {cap['missing']} never seen, backlog "
        f"drained {cap['drain_s']:.2f} s after the window; errors {cap['errors'] or 'none'}. "
        f"Latency run: {lat['committed']} committed, {lat['missing']} never seen, errors "
        f"{lat['errors'] or 'none'}, load-generator send lag p99 {ms(lat['send_lag']['p99'])} ms.",
    ]
    return sec
