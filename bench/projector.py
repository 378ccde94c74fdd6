"""Benchmark 4, projector catch-up: N events waiting in SESSION_EVENTS, then the projector is
started; events/s until its consumer has nothing pending or unacknowledged. Floor: nats-py
``fetch(batch)`` + ``ack()`` of the same messages on a fresh consumer, no database work."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bench.cpu import CpuMeter
from bench.harness import Ctx, load_process, namespace, new_tenant, processes
from bench.load import getpid
from bench.stats import Section, num, ratio
from bench.webhook import seed_connections
from proto import headers
from proto.events import EVENT_SUBJECT_KIND, Event, QrUpdated, StatusReported, event_encoder
from services.baileys_sim.sessions import make_qr
from zapbus.config import Settings
from zapbus.topology import projector_config

FLOOR_CONSUMER = "bench_floor"
EVENTS_PER_CONNECTION = 5  # status connecting, 3 QR codes, status close 515 (pairing)


def _events(ids: list[uuid.UUID]) -> list[Event]:
    """The events of every connection, interleaved (event k of every connection, then k+1)."""
    import random

    rng = random.Random(7)
    base = datetime.now(UTC)
    out: list[Event] = []
    for k in range(EVENTS_PER_CONNECTION):
        at = base + timedelta(seconds=k)
        for cid in ids:
            common: dict[str, Any] = {
                "event_id": uuid.uuid4(),
                "connection_id": cid,
                "generation": 1,
                "occurred_at": at,
            }
            if k == 0:
                out.append(StatusReported(**common, status="connecting"))
            elif k < EVENTS_PER_CONNECTION - 1:
                out.append(QrUpdated(**common, qr=make_qr(rng)))
            else:
                out.append(
                    StatusReported(**common, status="close", code=515, reason="restartRequired")
                )
    return out


async def _publish(js: JetStreamContext, settings: Settings, events: list[Event]) -> None:
    names = settings.names
    for start in range(0, len(events), 1000):
        await asyncio.gather(
            *(
                js.publish(
                    names.event_subject(EVENT_SUBJECT_KIND[type(ev)], ev.connection_id),
                    event_encoder.encode(ev),
                    timeout=10,
                    headers={
                        headers.MSG_ID: str(ev.event_id),
                        headers.CONNECTION_ID: str(ev.connection_id),
                    },
                )
                for ev in events[start : start + 1000]
            )
        )


async def _fetch_ack(settings: Settings, total: int) -> float:
    nc = await nats.connect(settings.nats_url, name="zapbus-bench-floor")
    js = nc.jetstream()
    cfg = projector_config(settings)
    cfg.durable_name = FLOOR_CONSUMER
    stream = settings.names.events_stream
    await js.add_consumer(stream, cfg)
    psub = await js.pull_subscribe_bind(FLOOR_CONSUMER, stream=stream)
    batch = settings.projector_batch
    t0 = time.perf_counter()
    done = 0
    while done < total:
        try:
            msgs = await psub.fetch(batch, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        done += len(msgs)
    await nc.flush()
    took = time.perf_counter() - t0
    await psub.unsubscribe()
    await nc.close()
    return took


def fetch_ack_floor(settings: Settings, total: int) -> float:
    return asyncio.run(_fetch_ack(settings, total))


async def _until_caught_up(
    js: JetStreamContext, stream: str, durable: str, total: int, timeout_s: float, cpu: CpuMeter
) -> tuple[float, float]:
    """(when the consumer first existed, when it had nothing pending nor unacked), monotonic;
    ``cpu`` measures between the two."""
    started = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            await asyncio.sleep(0.01)
            continue
        now = time.monotonic()
        if started is None:
            started = now
            cpu.start()
        if (
            info.delivered.stream_seq >= total
            and info.num_pending == 0
            and info.num_ack_pending == 0
        ):
            cpu.stop()
            return started, now
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{durable} did not catch up with {total} events in {timeout_s} s")


async def run(ctx: Ctx) -> Section:
    s = ctx.scale
    total = s.projector_events
    n_conn = total // EVENTS_PER_CONNECTION
    async with (
        load_process() as lp,
        namespace(ctx) as settings,
        processes(ctx, "projector") as procs,
    ):
        tenant_id, _ = await new_tenant(settings)
        ids = await seed_connections(settings, tenant_id, n_conn, "awaiting_qr")
        nc = await nats.connect(settings.nats_url, name="zapbus-bench")
        js = nc.jetstream()
        stream = settings.names.events_stream
        try:
            ctx.say(f"projector: publishing {total} events for {n_conn} connections")
            t = time.monotonic()
            await _publish(js, settings, _events(ids))
            ctx.say(f"  published in {time.monotonic() - t:.1f} s; floor: fetch+ack")
            cpu = ctx.meter({"load": await lp.run(getpid)})
            await ctx.quiet()
            floor_future = asyncio.ensure_future(lp.run(fetch_ack_floor, settings, total))
            f0, f1 = await _until_caught_up(js, stream, FLOOR_CONSUMER, total, 600, cpu)
            floor_inner = await floor_future
            floor_cpu = cpu.summary()
            await js.delete_consumer(stream, FLOOR_CONSUMER)
            floor_s = f1 - f0
            ctx.say(f"  floor {total / floor_s:.0f}/s ({floor_cpu}); starting the projector")
            await ctx.quiet()
            procs.service(settings, "projector")
            cpu = ctx.meter({"projector": procs.pid("projector")})
            async with ctx.profiling(procs, ["projector"], "catchup"):
                p0, p1 = await _until_caught_up(
                    js, stream, settings.names.projector_consumer, total, 600, cpu
                )
            proj_s = p1 - p0
            proj_cpu = cpu.summary()
            ctx.say(f"  projector {total / proj_s:.0f}/s ({proj_cpu})")
        finally:
            await nc.close()
        counts = await _counts(settings)
    sec = Section(
        "4. Projector catch-up",
        f"{total:,} events (per connection: status connecting, 3 QR codes, status close 515; "
        f"interleaved across {n_conn:,} connections inserted in Postgres in awaiting_qr) "
        f"published to SESSION_EVENTS before anything consumes them. Then the projector is "
        f"started (`python -m services.projector`, batch {settings.projector_batch}); time "
        f"from its durable consumer appearing until the consumer has no message pending or "
        f"unacknowledged (consumer_info polled every 20 ms). Floor: in the load-generator "
        f"process, `fetch({settings.projector_batch})` + `ack()` of the same messages on a "
        f"fresh consumer with the projector's config, no decoding, no database; timed the "
        f"same way.",
        ["measure", "projector", "fetch + ack floor", "projector / floor"],
    )
    sec.row(
        "events/s until caught up",
        num(total / proj_s),
        num(total / floor_s),
        f"{ratio(floor_s, proj_s):.2f}",
    )
    sec.row("time to catch up (s)", f"{proj_s:.2f}", f"{floor_s:.2f}", "")
    r = ratio(floor_s, proj_s)
    sec.target("at least 60 % of the fetch+ack floor", f"{100 * r:.0f} %", r >= 0.6)
    sec.notes += [
        f"Rows after catch-up: {counts['history']:,} history rows (expected {total:,}), "
        f"{counts['pairing']:,} of {n_conn:,} connections in pairing; the floor's own clock "
        f"said {floor_inner:.2f} s.",
        "The seeded connections table is analyzed before the run; connection_events starts "
        "empty, so the projector's history lookups meet a table without statistics, as after "
        "a fresh deployment (see Profiles 2a below).",
        f"CPU during the floor: {floor_cpu}.",
        f"CPU during the projector's catch-up: {proj_cpu}.",
    ]
    return sec


async def _counts(settings: Settings) -> dict[str, int]:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema}
    )
    try:
        history = await conn.fetchval("SELECT count(*) FROM connection_events")
        pairing = await conn.fetchval("SELECT count(*) FROM connections WHERE status = 'pairing'")
    finally:
        await conn.close()
    return {"history": int(history), "pairing": int(pairing)}
