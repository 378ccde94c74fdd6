"""zapbus on a 3-node JetStream cluster: the stream leader is SIGKILLed mid-burst and
restarted, and nothing accepted is lost.

Three nats-servers from the wheel on loopback (routes to all three, a store each), R3 streams,
every service as a process with ZAPBUS_NATS_URL listing the three nodes. 200 creates arrive
while the leader of the events stream dies: publishes stall for the election (several
seconds), creates keep being accepted (the outbox), webhooks and worker events are retried
with the same Nats-Msg-Id, and every connection ends qr_ready with one session on the server
and a history without gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from services.baileys_sim.config import SimConfig
from tests.faults import ProcessStack, process_stack
from tests.stack import wait_for
from zapbus.bus import server_urls
from zapbus.config import load_settings
from zapbus.tools.localinfra import NatsCluster, NatsServer

# Sessions take 0.5-2 s to create: QR webhooks of creates begun before the kill arrive
# during the election.
SIM = SimConfig(port=0, create_delay=(0.5, 2.0), qr_first_seconds=120, qr_next_seconds=60)
ENV = {
    "ZAPBUS_STREAM_REPLICAS": "3",
    "ZAPBUS_OUTBOX_POLL_SECONDS": "0.2",
    "ZAPBUS_BAILEYS_TIMEOUT_SECONDS": "5",
    "ZAPBUS_RETRY_BASE_SECONDS": "0.2",
    "ZAPBUS_RETRY_MAX_SECONDS": "1",
    # a delivery lost with the dead node (in flight to a worker connected through it) comes
    # back after this
    "ZAPBUS_ACK_WAIT_SECONDS": "10",
}
CREATES = 200
KILL_AFTER = 80  # creates accepted before the leader dies
RESTART_AFTER_SECONDS = 3.0


async def _rows(stack: ProcessStack) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        return [dict(r) for r in await conn.fetch("SELECT id, status FROM connections")]
    finally:
        await conn.close()


async def _leader(url: str, stream: str, consumer: str | None = None) -> str | None:
    """The server name of the stream's (or its consumer's) leader, None while there is none."""
    nc = await nats.connect(server_urls(url), connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(timeout=2)
        try:
            info = await (
                js.consumer_info(stream, consumer) if consumer else js.stream_info(stream)
            )
        except Exception:
            return None
        return info.cluster.leader if info.cluster else None
    finally:
        await nc.close()


async def _move_off(url: str, node: str, stream: str, consumer: str | None = None) -> None:
    """Have the stream (or consumer) elect a leader other than ``node`` (step-down)."""
    if await _leader(url, stream, consumer) != node:
        return
    api = (
        f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"
        if consumer
        else f"STREAM.LEADER.STEPDOWN.{stream}"
    )
    nc = await nats.connect(server_urls(url), connect_timeout=2, max_reconnect_attempts=1)
    try:
        await nc.request(f"$JS.API.{api}", b"", timeout=5)
    finally:
        await nc.close()

    async def moved() -> bool:
        leader = await _leader(url, stream, consumer)
        return leader is not None and leader != node

    await wait_for(f"{consumer or stream} to lead elsewhere", moved, timeout=30, every=0.1)


async def test_stream_leader_killed_mid_burst_loses_nothing(workdir: Path) -> None:
    started = time.monotonic()
    cluster = NatsCluster(workdir / "nats")
    async with process_stack(workdir, SIM, ENV, nats=cluster) as stack:
        assert len(server_urls(cluster.url)) == 3  # what ZAPBUS_NATS_URL holds
        names = load_settings({}).names
        events, commands = names.events_stream, names.commands_stream
        leader = await _leader(cluster.url, events)
        assert leader is not None
        victim: NatsServer = cluster.node(leader)
        # The victim leads the events stream only: commands keep flowing while it elects a
        # new leader, so webhooks and worker events are in flight when it dies (and the
        # worker's deliveries are not redelivered by a new consumer leader).
        await _move_off(cluster.url, leader, commands)
        await _move_off(cluster.url, leader, commands, names.worker_consumer)

        accepted: list[str] = []
        killed = asyncio.Event()

        async def create(n: int) -> None:
            key = {"Idempotency-Key": f"cluster-{n}", **stack.auth()}
            async with stack.http.post(
                f"{stack.gateway_url}/v1/connections", json={"name": f"c{n}"}, headers=key
            ) as r:
                assert r.status == 202, f"create {n}: {r.status} {await r.text()}"
                accepted.append(str((await r.json())["session_name"]))

        async def burst() -> None:
            # 10 at a time, ~8 s in all: the kill lands in the middle of it
            for start in range(0, CREATES, 10):
                await asyncio.gather(*(create(n) for n in range(start, start + 10)))
                if len(accepted) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                await asyncio.sleep(0.4)

        timings: dict[str, float] = {}

        async def kill_and_restart() -> None:
            await killed.wait()
            t0 = time.monotonic()
            await victim.astop(kill=True)  # SIGKILL
            timings["killed_at_create"] = len(accepted)

            async def new_leader() -> str | None:
                leader = await _leader(cluster.url, events)
                return leader if leader and leader != victim.name else None

            await wait_for("a new events leader", new_leader, timeout=30, every=0.1)
            timings["election_s"] = time.monotonic() - t0
            await asyncio.sleep(max(0.0, RESTART_AFTER_SECONDS - (time.monotonic() - t0)))
            await victim.astart()
            timings["restarted_after_s"] = time.monotonic() - t0

        await asyncio.gather(burst(), kill_and_restart())
        assert len(accepted) == CREATES
        timings["burst_done_s"] = time.monotonic() - started

        async def all_qr_ready() -> list[dict[str, Any]] | None:
            rows = await _rows(stack)
            done = [r for r in rows if r["status"] == "qr_ready"]
            return rows if len(rows) == CREATES and len(done) == CREATES else None

        try:
            await wait_for("200 of 200 qr_ready", all_qr_ready, timeout=60, every=0.5)
        except AssertionError:
            rows = await _rows(stack)
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            raise AssertionError(f"statuses {counts}; timings {timings}") from None
        timings["all_qr_ready_s"] = time.monotonic() - started

        # one session per connection on the server, every one live
        async with stack.http.get(f"{stack.sim_url}/_sim/stats") as r:
            stats = await r.json()
        assert sorted(stats["live"]) == sorted(accepted)
        assert set(stats["created"].values()) == {1}, {
            k: v for k, v in stats["created"].items() if v != 1
        }

        # no history gaps: every applied move starts where the one before it ended
        conn = await asyncpg.connect(stack.postgres.dsn)
        try:
            history = await conn.fetch(
                "SELECT connection_id, from_status, to_status FROM connection_events"
                " WHERE applied ORDER BY seq"
            )
            outbox = await conn.fetchval("SELECT count(*) FROM outbox")
        finally:
            await conn.close()
        last: dict[uuid.UUID, str] = {}
        for h in history:
            cid = h["connection_id"]
            assert last.get(cid, h["from_status"]) == h["from_status"], (cid, h)
            last[cid] = h["to_status"]
        assert len(last) == CREATES and set(last.values()) == {"qr_ready"}
        assert outbox == 0

        async def caught_up() -> bool:
            nc = await nats.connect(server_urls(cluster.url), connect_timeout=2)
            try:
                info = await nc.jetstream(timeout=2).stream_info(events)
            finally:
                await nc.close()
            peers = {r.name: r for r in (info.cluster.replicas or [])} if info.cluster else {}
            peer = peers.get(victim.name)
            return peer is not None and bool(peer.current) and not peer.offline

        await wait_for("the restarted node to catch up", caught_up, timeout=30, every=0.2)

        # The kill hit traffic: calls failed for the election and were retried (zapbus.jsretry
        # logs each), the relay kept commands in the outbox meanwhile.
        logs = {p.stem: p.read_text(errors="replace") for p in stack.logs.glob("*.log")}
        retried = {name: text.count("retrying") for name, text in logs.items()}
        relay_failures = logs["gateway"].count("outbox relay pass failed")
        assert sum(retried.values()) + relay_failures > 0, "the leader's death went unnoticed"
        waits = {  # the longest call retried through the election, per service
            name: max(map(float, re.findall(r"succeeded after \d+ tries \(([\d.]+) s\)", text)))
            for name, text in logs.items()
            if "succeeded after" in text
        }
        # The election was absorbed where it struck, each publish retried with the same id:
        # inside each webhook request (none given up; a 503 only for a webhook that arrived
        # right at the kill of an election longer than the 9 s the request waits: without the
        # retry every webhook of the election gets one, ~200 here), inside each worker command
        # (none failed and was left for redelivery), and no loop crashed.
        unstored = logs["webhook"].count("event not stored")
        assert unstored <= 5, f"{unstored} webhooks answered 503 during the election"
        assert stats["webhooks_failed"] == 0
        unfinished = [ln for ln in logs["session_worker"].splitlines() if "left for redel" in ln]
        assert not unfinished, (len(unfinished), unfinished[0])
        errors = [
            ln for text in logs.values() for ln in text.splitlines() if '"level":"error"' in ln
        ]
        assert not errors, (len(errors), errors[:3])
        print(
            f"cluster: {timings}, retried {retried}, relay passes failed {relay_failures},"
            f" longest retried calls {waits} s,"
            f" webhook 503s {unstored},"
            f" left for redelivery {logs['session_worker'].count('left for redelivery')},"
            f" sim webhooks failed {stats['webhooks_failed']},"
            f" total {time.monotonic() - started:.1f} s"
        )


def _processes_under(folder: Path) -> list[int]:
    """Live processes whose command line names something in ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if str(folder).encode() in (entry / "cmdline").read_bytes() and state not in "ZX":
                    found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
async def test_a_cluster_start_cancelled_midway_leaves_no_node_running(workdir: Path) -> None:
    """Ctrl-C while a cluster starts (its ``astart`` cancelled, as ``python -m bench`` does):
    by the time the cancellation is passed on, every node the start thread spawned, before or
    after it, is stopped, even for a caller that has nothing to stop yet."""
    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(4)
    loop.set_default_executor(threads)  # so that the start thread can be waited for below
    cluster = NatsCluster(workdir / "nats")
    try:
        task = asyncio.create_task(cluster.astart())
        await asyncio.sleep(0)  # the start thread is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        threads.shutdown(wait=True)  # whatever it was starting has started (or not)
        assert not _processes_under(cluster.workdir)
    finally:
        loop.set_default_executor(ThreadPoolExecutor())
        for pid in _processes_under(cluster.workdir):  # leave nothing behind, whatever failed
            os.kill(pid, signal.SIGKILL)
