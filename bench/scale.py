"""Benchmark 7, outgrowing one machine's defaults, each as a ratio measured in the same run:

* **a 3-node cluster vs one node**: the create path (the gateway's capacity and its latency at
  one fixed rate, publish-acks one at a time and 200 in flight) on one nats-server with R1
  streams, then on three nats-servers routed into a cluster with R3 streams; all four servers
  are started for this benchmark from the wheel, with the same settings (``sync_interval:
  always``), so only the cluster differs;
* **two of each service vs one**: on the run's NATS, the gateway's create capacity and webhook
  ingest end to end (webhook service -> projector -> Postgres) with one copy of each, then with
  a second gateway, webhook service (same port, ``ZAPBUS_REUSE_PORT``) and projector started
  beside the first, then with one of each again (events in two partitions throughout, one
  projector per partition with two).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats

from bench.cpu import CpuMeter, InfraPids
from bench.harness import (
    SERVICE_PORTS,
    Ctx,
    LoadProcess,
    Procs,
    load_process,
    namespace,
    new_tenant,
    processes,
    service_env,
)
from bench.load import (
    CreateTarget,
    RowCount,
    WebhookTarget,
    closed_loop,
    getpid,
    open_loop,
    summarize,
)
from bench.stats import Section, ms, num, ratio
from bench.webhook import seed_connections
from proto import headers
from proto.commands import CreateSession, command_encoder
from zapbus.bus import server_urls
from zapbus.config import Settings
from zapbus.tokens import session_name, webhook_url
from zapbus.tools.localinfra import NatsCluster, NatsServer, free_port

IN_FLIGHT = 200  # publish-acks awaited at once (the relay and the webhook service batch so)
PARTITIONS = 2  # events partitions in the scale-out runs: one per projector with two


@dataclass(frozen=True)
class Gateways:
    """``POST /v1/connections`` spread round robin over several gateways."""

    urls: tuple[str, ...]
    api_key: str

    def request(self, i: int) -> tuple[str, bytes, dict[str, str], str | None]:
        url = self.urls[i % len(self.urls)]
        return CreateTarget(url, self.api_key).request(i)


async def _publish_acks(url: str, subject: str, n: int, in_flight: int) -> dict[str, Any]:
    """``n`` create commands published by ``in_flight`` tasks, each awaiting its ack."""
    nc = await nats.connect(server_urls(url), name="zapbus-bench-scale")
    try:
        js = nc.jetstream()
        latencies: list[float] = []
        todo = iter(range(n))

        async def publisher() -> None:
            for _ in todo:  # shared: n in all
                cmd = CreateSession(
                    command_id=uuid.uuid4(),
                    connection_id=uuid.uuid4(),
                    tenant_id=uuid.uuid4(),
                    generation=1,
                    session_name="zb_bench_g1",
                    requested_at=datetime.now(UTC),
                )
                start = time.perf_counter()
                await js.publish(
                    subject,
                    command_encoder.encode(cmd),
                    timeout=10.0,
                    headers={headers.MSG_ID: str(cmd.command_id)},
                )
                latencies.append(time.perf_counter() - start)

        t0 = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
    finally:
        await nc.close()
    return {"rate": n / elapsed, "ack": summarize(latencies)}


def publish_acks(url: str, subject: str, n: int, in_flight: int) -> dict[str, Any]:
    return asyncio.run(_publish_acks(url, subject, n, in_flight))


async def _count(settings: Settings, query: str) -> int:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


# ---- a 3-node cluster vs one node ------------------------------------------------------------


@dataclass
class _Side:
    """One NATS of the comparison, with its namespace and gateway."""

    label: str
    settings: Settings
    target: CreateTarget
    cpu: CpuMeter
    out: dict[str, Any] = field(default_factory=dict)


async def _side(
    ctx: Ctx, stack: contextlib.AsyncExitStack, label: str, url: str, replicas: int, pids: Any
) -> _Side:
    """A namespace (streams with ``replicas``) and a gateway on the NATS at ``url``, stopped
    and removed when ``stack`` closes."""
    sub = dataclasses.replace(ctx, nats_url=url, infra=InfraPids(None, ctx.infra.postmaster))
    settings = await stack.enter_async_context(namespace(sub, stream_replicas=replicas))
    procs = await stack.enter_async_context(processes(sub, f"scale-{label.replace(' ', '-')}"))
    _, key = await new_tenant(settings)
    gateway = procs.service(settings, "gateway", ZAPBUS_STREAM_REPLICAS=str(replicas))
    await procs.wait_healthy()
    target = CreateTarget(gateway + "/v1/connections", key)
    return _Side(label, settings, target, sub.meter({"gateway": procs.pid("gateway")} | pids))


async def _drained(side: _Side, timeout: float) -> float:
    """Seconds until the gateway's relay has published every command of its outbox (NaN if
    it has not within ``timeout``)."""
    t0 = time.monotonic()
    while await _count(side.settings, "SELECT count(*) FROM outbox"):
        if time.monotonic() - t0 > timeout:
            return math.nan
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def _one_vs_cluster(ctx: Ctx, lp: LoadProcess) -> dict[str, dict[str, Any]]:
    """The create path on one node and on the cluster, both up at once, measured in turn
    (capacity on each, then latency on each...) so that load from outside falls on both."""
    s = ctx.scale
    one = NatsServer(ctx.logs / "nats-scale-one")
    cluster = NatsCluster(ctx.logs / "nats-scale-cluster")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(one.astop)
        await one.astart()
        ctx.say("scale: starting a 3-node cluster")
        stack.push_async_callback(cluster.astop)
        await cluster.astart()
        load = {"load": await lp.run(getpid)}
        assert one.proc is not None
        nodes = {f"nats-{i}": n.proc.pid for i, n in enumerate(cluster.nodes, 1) if n.proc}
        sides = [
            await _side(ctx, stack, "one node", one.url, 1, load | {"nats": one.proc.pid}),
            await _side(ctx, stack, "3-node cluster", cluster.url, 3, load | nodes),
        ]
        for side in sides:
            await lp.run(closed_loop, side.target, 8, s.warmup_s)  # connections, caches
            await _drained(side, 60.0)
        for side in sides:
            ctx.say(
                f"scale ({side.label}): gateway capacity, {s.clients} clients, {s.scale_s:.0f} s"
            )
            await ctx.quiet()
            side.cpu.start()
            side.out["cap"] = await lp.run(closed_loop, side.target, s.clients, s.scale_s)
            side.cpu.stop()
            side.out["cap_cpu"] = side.cpu.summary()
            side.out["outbox"] = await _count(side.settings, "SELECT count(*) FROM outbox")
            side.out["drain_s"] = await _drained(side, 120.0)
            ctx.say(
                f"  {side.out['cap']['rate']:.0f}/s ({side.out['cap_cpu']}); outbox"
                f" {side.out['outbox']} drained in {side.out['drain_s']:.1f} s"
            )
        rate = min(side.out["cap"]["rate"] for side in sides) / 2  # the same rate on both
        for side in sides:
            ctx.say(f"scale ({side.label}): gateway latency at {rate:.0f}/s, {s.scale_s:.0f} s")
            await ctx.quiet()
            lat = await lp.run(open_loop, side.target, rate, s.scale_s)
            side.out.update(lat=lat, rate=rate, lat_drain_s=await _drained(side, 120.0))
            ctx.say(f"  p50 {ms(lat['http']['p50'])} p99 {ms(lat['http']['p99'])} ms")
        for side in sides:
            subject = side.settings.names.command_subject("create")
            url = side.settings.nats_url
            await ctx.quiet()
            seq = await lp.run(publish_acks, url, subject, s.sequential_publishes, 1)
            side.cpu.start()
            par = await lp.run(publish_acks, url, subject, s.inflight_publishes, IN_FLIGHT)
            side.cpu.stop()
            side.out.update(seq=seq, par=par, par_cpu=side.cpu.summary())
            ctx.say(
                f"scale ({side.label}): publish-acks {seq['rate']:.0f}/s one at a time,"
                f" {par['rate']:.0f}/s {IN_FLIGHT} in flight"
            )
        return {"one": sides[0].out, "cluster": sides[1].out}


# ---- two of each service vs one ----------------------------------------------------------


def _copy(
    procs: Procs, settings: Settings, name: str, n: int, port: int, env: dict[str, str]
) -> str:
    """Start copy ``n`` of service ``name`` (``webhook``, ``webhook_2``...); its base URL."""
    tag = name if n == 1 else f"{name}_{n}"
    extra = service_env(settings, **{SERVICE_PORTS[name]: str(port)}, **env)
    return procs.add(tag, f"services.{name}", extra, port)


async def _partitions_shared(settings: Settings, projectors: int, timeout: float = 60.0) -> None:
    """Wait until ``projectors`` projectors each hold an equal share of the partitions."""
    query = (
        "SELECT count(*) FROM (SELECT owner FROM projector_leases WHERE expires_at > now()"
        f" GROUP BY owner HAVING count(*) = {PARTITIONS // projectors}) AS holders"
    )
    deadline = time.monotonic() + timeout
    while await _count(settings, query) != projectors:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{projectors} projectors did not share the partitions")
        await asyncio.sleep(0.1)


def _webhooks(settings: Settings, ids: list[uuid.UUID], base: str, tag: str) -> WebhookTarget:
    urls = tuple(webhook_url(base, settings.webhook_secret, i, 1) for i in ids)
    return WebhookTarget(urls, tuple(session_name(i, 1) for i in ids), tag)


async def _copies(ctx: Ctx, lp: LoadProcess) -> list[dict[str, Any]]:
    """One of each, two of each, one of each again (the second copies stopped): load from
    outside that comes and goes shows as a difference between the first and the last."""
    s = ctx.scale
    out: list[dict[str, Any]] = []
    async with (
        namespace(ctx, event_partitions=PARTITIONS, qr_max_refreshes=10**9) as settings,
        processes(ctx, "scale-copies") as procs,
    ):
        tenant_id, key = await new_tenant(settings)
        ids = await seed_connections(settings, tenant_id, s.webhook_connections, "awaiting_qr")
        env = {
            "ZAPBUS_EVENT_PARTITIONS": str(PARTITIONS),
            "ZAPBUS_QR_MAX_REFRESHES": str(10**9),  # every QR applies
            "ZAPBUS_REUSE_PORT": "true",  # the webhook copies share one port
        }
        webhook_port = free_port()
        gateways: list[str] = []
        rows = RowCount(
            settings.database_url,
            f'SELECT coalesce(max(seq), 0) FROM "{settings.db_schema}".connection_events',
        )
        load_pid = await lp.run(getpid)
        webhook = ""
        for step, n in enumerate((1, 2, 1)):
            if step < 2:  # start copy n of each
                gateways.append(_copy(procs, settings, "gateway", n, free_port(), env))
                webhook = _copy(procs, settings, "webhook", n, webhook_port, env)
                _copy(procs, settings, "projector", n, free_port(), env)
            else:  # stop the second copies (the projector hands its partition back)
                for name in ("gateway_2", "webhook_2", "projector_2"):
                    await asyncio.to_thread(procs.procs.pop(name).stop)
                gateways.pop()
            await procs.wait_healthy()
            await _partitions_shared(settings, n)
            creates = Gateways(tuple(g + "/v1/connections" for g in gateways), key)
            cpu = ctx.meter({name: procs.pid(name) for name in procs.procs} | {"load": load_pid})
            await lp.run(closed_loop, creates, 8, s.warmup_s)
            await lp.run(closed_loop, _webhooks(settings, ids, webhook, f"w{step}-"), 8, s.warmup_s)
            ctx.say(f"scale ({n} of each): create capacity, {s.clients} clients, {s.scale_s:.0f} s")
            await ctx.quiet()
            cpu.start()
            cap = await lp.run(closed_loop, creates, s.clients, s.scale_s)
            cpu.stop()
            cap_cpu = cpu.summary()
            ctx.say(f"  {cap['rate']:.0f}/s ({cap_cpu}); webhook ingest capacity")
            await ctx.quiet()
            target = _webhooks(settings, ids, webhook, f"c{step}-")
            cpu.start()
            ingest = await lp.run(closed_loop, target, s.clients, s.scale_s, None, rows)
            cpu.stop()
            ingest_cpu = cpu.summary()
            ctx.say(f"  {ingest['commit_rate']:.0f} committed/s ({ingest_cpu})")
            out.append({"cap": cap, "cap_cpu": cap_cpu, "ingest": ingest, "ingest_cpu": ingest_cpu})
    return out


async def run(ctx: Ctx) -> Section:
    async with load_process() as lp:
        cluster = await _one_vs_cluster(ctx, lp)
        copies = await _copies(ctx, lp)
    return _section(ctx, cluster["one"], cluster["cluster"], copies)


def _section(
    ctx: Ctx,
    one: dict[str, Any],
    three: dict[str, Any],
    copies: list[dict[str, Any]],
) -> Section:
    s = ctx.scale
    rate = one["rate"]
    sec = Section(
        "7. A 3-node cluster, and two of each service",
        "Each pair measured in the same run. Cluster: nats-servers from the wheel started for "
        "this benchmark, all with `sync_interval: always`: one alone (R1 streams), and three "
        "on loopback routed into a cluster (R3 streams, `ZAPBUS_NATS_URL` listing the three), "
        "all up at once, each with a gateway of its own (own process, same Postgres), measured "
        "in turn (capacity on one, capacity on the other, latency on one...): the gateway at "
        f"{s.clients} closed-loop clients for {s.scale_s:.0f} s (capacity; then the time its "
        "outbox relay takes to publish the commands still waiting, with no load), open loop at "
        "one fixed rate (half the lower of the two capacities) for "
        f"{s.scale_s:.0f} s (latency; the gateway answers after its commit, before the relay "
        f"publishes), {s.sequential_publishes:,} publish-acks of a create command one at a "
        f"time, and {s.inflight_publishes:,} with {IN_FLIGHT} in flight (the load generator). "
        "Two of each: on the run's NATS, one gateway, webhook service and projector, then a "
        "second of each started beside them, then those stopped again (one of each = the mean "
        "of the runs before and after; the webhook services share one port, "
        f"`ZAPBUS_REUSE_PORT`; events in {PARTITIONS} partitions both times, one per projector "
        f"with two): create capacity ({s.clients} clients, round robin over the gateways) and "
        f"webhook ingest capacity as in section 3 ({s.clients} clients, "
        f"{s.webhook_connections:,} connections, history rows committed in the window).",
        ["measure", "one node / one of each", "cluster / two of each", "ratio"],
    )

    def row(label: str, a: float, b: float, fmt: str = "num") -> None:
        cells: dict[str, Callable[[float], str]] = {
            "num": num,
            "ms": ms,
            "ms2": lambda v: f"{v * 1000:.2f}",
        }
        cell = cells[fmt]
        sec.row(label, cell(a), cell(b), f"{ratio(b, a):.2f}")

    row("cluster: gateway capacity (creates/s)", one["cap"]["rate"], three["cap"]["rate"])
    row("cluster: commands in the outbox after the capacity window", one["outbox"], three["outbox"])
    row(
        "cluster: outbox relay, commands published/s while catching up",
        ratio(one["outbox"], one["drain_s"]) if one["outbox"] else math.nan,
        ratio(three["outbox"], three["drain_s"]) if three["outbox"] else math.nan,
    )
    for q in ("p50", "p99"):
        row(
            f"cluster: gateway latency {q} at {rate:.0f}/s (ms)",
            one["lat"]["http"][q],
            three["lat"]["http"][q],
            "ms",
        )
    for q in ("p50", "p99"):
        row(
            f"cluster: publish-ack {q}, one at a time (ms)",
            one["seq"]["ack"][q],
            three["seq"]["ack"][q],
            "ms2",
        )
    row("cluster: publish-acks/s, one at a time", one["seq"]["rate"], three["seq"]["rate"])
    row(
        f"cluster: publish-ack p99, {IN_FLIGHT} in flight (ms)",
        one["par"]["ack"]["p99"],
        three["par"]["ack"]["p99"],
        "ms",
    )
    row(f"cluster: publish-acks/s, {IN_FLIGHT} in flight", one["par"]["rate"], three["par"]["rate"])
    before, two, after = copies

    def copies_row(label: str, run: str, key: str) -> None:
        # one of each: the mean of the runs before and after two of each
        row(label, (before[run][key] + after[run][key]) / 2, two[run][key])

    copies_row("two of each: create capacity (creates/s)", "cap", "rate")
    copies_row("two of each: webhook ingest, events/s committed", "ingest", "commit_rate")
    copies_row("two of each: webhook HTTP answers/s", "ingest", "rate")
    errors = {
        "one node": one["cap"]["errors"] or one["lat"]["errors"],
        "cluster": three["cap"]["errors"] or three["lat"]["errors"],
        "one of each": {
            k: v
            for r in (before, after)
            for p in ("cap", "ingest")
            for k, v in r[p]["errors"].items()
        },
        "two of each": two["cap"]["errors"] or two["ingest"]["errors"],
    }
    sec.notes += [
        "CPU (100 % = one core; other = processes outside this benchmark): gateway capacity "
        f"on one node: {one['cap_cpu']}; on the cluster: {three['cap_cpu']}; {IN_FLIGHT} "
        f"publish-acks in flight on one node: {one['par_cpu']}; on the cluster: "
        f"{three['par_cpu']}; create capacity, one of each (first): {before['cap_cpu']}; two "
        f"of each: {two['cap_cpu']}; webhook ingest, one of each (first): "
        f"{before['ingest_cpu']}; two of each: {two['ingest_cpu']}.",
        "One of each, before and after two of each: create capacity "
        f"{num(before['cap']['rate'])} and {num(after['cap']['rate'])} creates/s, webhook "
        f"ingest {num(before['ingest']['commit_rate'])} and "
        f"{num(after['ingest']['commit_rate'])} events/s committed.",
        f"Outbox drained {one['drain_s']:.1f} s (one node) and {three['drain_s']:.1f} s "
        f"(cluster) after the capacity window, {one['lat_drain_s']:.1f} s and "
        f"{three['lat_drain_s']:.1f} s after the latency window. Webhook ingest backlog drained "
        f"{before['ingest']['drain_s']:.2f} s (one of each, first) and "
        f"{two['ingest']['drain_s']:.2f} s "
        "(two of each) after the window. Errors: "
        + ", ".join(f"{k} {v or 'none'}" for k, v in errors.items())
        + ".",
    ]
    return sec
