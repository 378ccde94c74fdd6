"""Benchmark: what ``sync_interval: always`` costs the create path.

The embedded nats-server (``make run``, ``make test``) fsyncs every JetStream write. This runs
the create path twice, on two nats-servers from the wheel started for it, identical except for
that setting: one with ``sync_interval: always``, one with the server's default (fsync every
2 minutes). Same Postgres, same gateway build, same load: the gateway's capacity and its latency
at one fixed rate, the floor (row insert + publish-ack), and 1,000 sequential publish-acks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import nats

from bench.cpu import InfraPids
from bench.create import FloorSpec, floor_closed
from bench.harness import Ctx, LoadProcess, load_process, namespace, new_tenant, processes
from bench.load import CreateTarget, closed_loop, open_loop, summarize
from bench.stats import Section, ms, num, ratio
from proto import headers
from proto.commands import CreateSession, command_encoder
from zapbus.batchpub import BatchItem, BatchPublisher
from zapbus.tools.localinfra import NatsServer


async def _publish_acks(nats_url: str, subject: str, n: int) -> dict[str, Any]:
    nc = await nats.connect(nats_url, name="zapbus-bench-sync")
    try:
        js = nc.jetstream()
        latencies = []
        t0 = time.perf_counter()
        for _ in range(n):
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
                timeout=3.0,
                headers={headers.MSG_ID: str(cmd.command_id)},
            )
            latencies.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - t0
    finally:
        await nc.close()
    return {"rate": n / elapsed, "ack": summarize(latencies)}


def publish_acks(nats_url: str, subject: str, n: int) -> dict[str, Any]:
    return asyncio.run(_publish_acks(nats_url, subject, n))


BATCH = 200


async def _batched(nats_url: str, subject: str, n: int) -> dict[str, float]:
    """Messages/s publishing ``n`` create commands in rounds of ``BATCH``: pipelined (every
    ack of a round awaited together) and as atomic batches (one commit per round), both
    through zapbus/batchpub.py as the outbox relay uses it."""
    nc = await nats.connect(nats_url, name="zapbus-bench-sync")
    rates: dict[str, float] = {}
    try:
        js = nc.jetstream()
        for mode, atomic in (("pipelined", False), ("atomic", True)):
            publisher = BatchPublisher(js, atomic=atomic)
            t0 = time.perf_counter()
            for _ in range(0, n, BATCH):
                msgs = []
                for _ in range(BATCH):
                    cmd = CreateSession(
                        command_id=uuid.uuid4(),
                        connection_id=uuid.uuid4(),
                        tenant_id=uuid.uuid4(),
                        generation=1,
                        session_name="zb_bench_g1",
                        requested_at=datetime.now(UTC),
                    )
                    hdrs = {headers.MSG_ID: str(cmd.command_id)}
                    msgs.append(BatchItem(subject, command_encoder.encode(cmd), hdrs))
                results = await publisher.publish(msgs)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise RuntimeError(f"{len(failed)} {mode} publishes failed: {failed[0]!r}")
            rates[mode] = n / (time.perf_counter() - t0)
    finally:
        await nc.close()
    return rates


def batched(nats_url: str, subject: str, n: int) -> dict[str, float]:
    return asyncio.run(_batched(nats_url, subject, n))


async def _measure(ctx: Ctx, lp: LoadProcess, label: str, rate: float | None) -> dict[str, Any]:
    """The create path on this ``ctx``'s NATS; latency at ``rate`` (half the capacity if None)."""
    scale = ctx.scale
    duration = scale.sync_s
    async with namespace(ctx) as settings, processes(ctx, f"sync-{label}") as procs:
        tenant_id, key = await new_tenant(settings)
        gateway = procs.service(settings, "gateway")
        await procs.wait_healthy()
        target = CreateTarget(gateway + "/v1/connections", key)
        subject = settings.names.command_subject("create")
        spec = FloorSpec(
            settings.database_url, settings.db_schema, settings.nats_url, subject, tenant_id
        )
        await lp.run(closed_loop, target, 8, scale.warmup_s)  # warm up
        ctx.say(f"sync ({label}): gateway capacity, {scale.clients} clients, {duration:.0f} s")
        await ctx.quiet()
        cap = await lp.run(closed_loop, target, scale.clients, duration)
        rate = rate or cap["rate"] / 2
        ctx.say(f"  {cap['rate']:.0f}/s; latency at {rate:.0f}/s")
        await ctx.quiet()
        lat = await lp.run(open_loop, target, rate, duration)
        ctx.say(f"  p50 {ms(lat['http']['p50'])} p99 {ms(lat['http']['p99'])} ms; floor")
        await ctx.quiet()
        floor = await lp.run(floor_closed, spec, scale.clients, duration)
        pubs = await lp.run(publish_acks, settings.nats_url, subject, scale.sequential_publishes)
        ctx.say(f"  floor {floor['rate']:.0f}/s; publish-ack p50 {ms(pubs['ack']['p50'])} ms")
        batches = await lp.run(batched, settings.nats_url, subject, 10 * scale.sequential_publishes)
        ctx.say(
            f"  rounds of {BATCH}: pipelined {batches['pipelined']:.0f}/s,"
            f" atomic {batches['atomic']:.0f}/s"
        )
    return {"cap": cap, "lat": lat, "rate": rate, "floor": floor, "pubs": pubs, "batches": batches}


async def run(ctx: Ctx) -> Section:
    results: dict[str, dict[str, Any]] = {}
    rate: float | None = None
    async with load_process() as lp:
        for label, always in (("always", True), ("default", False)):
            srv = NatsServer(ctx.logs / f"nats-sync-{label}", sync_always=always)
            await srv.astart()
            try:
                assert srv.proc is not None
                pids = InfraPids(srv.proc.pid, ctx.infra.postmaster)
                sub = dataclasses.replace(ctx, nats_url=srv.url, infra=pids)
                results[label] = await _measure(sub, lp, label, rate)
                rate = results[label]["rate"]  # the same rate on both servers
                ctx.quiet_budget_s = sub.quiet_budget_s
            finally:
                await srv.astop()
    return _section(ctx, results["always"], results["default"])


def _section(ctx: Ctx, a: dict[str, Any], d: dict[str, Any]) -> Section:
    duration = ctx.scale.sync_s
    sec = Section(
        "5. What `sync_interval: always` costs the create path",
        "The embedded nats-server (what `make run` and `make test` start) fsyncs every "
        "JetStream write. Two nats-servers from the wheel, started for this benchmark, "
        "identical but for that setting: `always`, and the server's default (fsync every "
        "2 min). On each, with the same Postgres: the gateway (own process) at "
        f"{ctx.scale.clients} closed-loop clients for {duration:.0f} s (capacity), then open "
        f"loop at one fixed rate (half the capacity measured on `always`) for {duration:.0f} s "
        "(latency), the floor of benchmark 1 (row insert + publish-ack, same clients), and "
        f"{ctx.scale.sequential_publishes:,} sequential publish-acks of a create command "
        f"(one client), then {10 * ctx.scale.sequential_publishes:,} in rounds of {BATCH}: "
        "pipelined and as atomic batches (`zapbus/batchpub.py`).",
        ["measure", "sync_interval: always", "default (2 min)", "always / default"],
    )
    sec.row(
        "gateway capacity (creates/s)",
        num(a["cap"]["rate"]),
        num(d["cap"]["rate"]),
        f"{ratio(a['cap']['rate'], d['cap']['rate']):.2f}",
    )
    for q in ("p50", "p99"):
        x, y = a["lat"]["http"][q], d["lat"]["http"][q]
        sec.row(
            f"gateway latency {q} at {a['rate']:.0f}/s (ms)", ms(x), ms(y), f"{ratio(x, y):.2f}"
        )
    sec.row(
        "floor capacity (creates/s)",
        num(a["floor"]["rate"]),
        num(d["floor"]["rate"]),
        f"{ratio(a['floor']['rate'], d['floor']['rate']):.2f}",
    )
    for q in ("p50", "p99"):
        x, y = a["pubs"]["ack"][q], d["pubs"]["ack"][q]
        sec.row(
            f"publish-ack {q}, sequential (ms)",
            f"{x * 1000:.2f}",
            f"{y * 1000:.2f}",
            f"{ratio(x, y):.2f}",
        )
    sec.row(
        "publish-acks/s, sequential",
        num(a["pubs"]["rate"]),
        num(d["pubs"]["rate"]),
        f"{ratio(a['pubs']['rate'], d['pubs']['rate']):.2f}",
    )
    for mode, how in (
        ("pipelined", "pipelined, acks awaited together"),
        ("atomic", "atomic batches (one commit each)"),
    ):
        x, y = a["batches"][mode], d["batches"][mode]
        sec.row(f"publishes/s in rounds of {BATCH}, {how}", num(x), num(y), f"{ratio(x, y):.2f}")
    errors = {
        k: v["lat"]["errors"] or v["cap"]["errors"] for k, v in (("always", a), ("default", d))
    }
    sec.notes.append(
        "Gateway errors: " + ", ".join(f"{k} {v or 'none'}" for k, v in errors.items()) + "."
    )
    return sec
