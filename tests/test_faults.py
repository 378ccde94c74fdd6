"""Nothing accepted is lost: worker SIGKILLs, NATS and Postgres restarts, a gateway killed
right after its 202, NATS down when a request arrives. Throwaway servers only."""

from __future__ import annotations

import asyncio
import collections
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from services.baileys_sim.config import SimConfig
from tests.faults import ProcessStack, process_stack
from tests.stack import wait_for

# A create accepted but not yet qr_ready: the work a fault must hit.
UNFINISHED = ("pending", "creating", "awaiting_qr")
WORKER_ENV = {
    "ZAPBUS_BAILEYS_TIMEOUT_SECONDS": "1",
    "ZAPBUS_CREATE_MAX_ATTEMPTS": "8",
    "ZAPBUS_RETRY_BASE_SECONDS": "0.2",
    "ZAPBUS_RETRY_MAX_SECONDS": "1",
    "ZAPBUS_ACK_WAIT_SECONDS": "3",
    "ZAPBUS_OUTBOX_POLL_SECONDS": "0.2",
    # Past the longest stall a correct system shows here (a QR webhook held up by a NATS
    # restart: 5 s publish timeout plus ~3 s of the simulator's retries; a killed worker's
    # command: ack_wait plus the restart), so the watchdog fails nothing that would finish;
    # still short enough to fail a create that is truly stuck within the test's wait.
    "ZAPBUS_WATCHDOG_DEADLINE_SECONDS": "20",
    "ZAPBUS_WATCHDOG_INTERVAL_SECONDS": "1",
}


async def _accept(
    stack: ProcessStack,
    name: str,
    refused: collections.Counter[str] | None = None,
    deadline: float = 60.0,
) -> str:
    """POST until a 202 (same Idempotency-Key every time), as a careful client does."""
    key = {"Idempotency-Key": f"chaos-{name}", **stack.auth()}
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            async with stack.http.post(
                f"{stack.gateway_url}/v1/connections", json={"name": name}, headers=key
            ) as r:
                if r.status == 202:
                    return str((await r.json())["id"])
                assert r.status in (502, 503), f"{r.status}: {await r.text()}"
                if refused is not None:
                    refused[str(r.status)] += 1
        except (TimeoutError, OSError):  # the gateway is restarting
            if refused is not None:
                refused["connection error"] += 1
        assert loop.time() < end, f"{name} never accepted"
        await asyncio.sleep(0.1)


async def _statuses(stack: ProcessStack) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        rows = await conn.fetch("SELECT id, status, status_reason, session_name FROM connections")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def _unfinished(stack: ProcessStack) -> int:
    """Creates accepted but not yet qr_ready (-1 while Postgres does not answer)."""
    try:
        return sum(r["status"] in UNFINISHED for r in await _statuses(stack))
    except (OSError, asyncpg.PostgresError):
        return -1


async def _worker_in_flight(stack: ProcessStack) -> int:
    """The worker's ``zapbus_worker_commands_in_flight`` gauge (-1 if it does not answer)."""
    url = f"http://127.0.0.1:{stack.ports['session_worker']}/metrics"
    try:
        async with stack.http.get(url) as r:
            text = await r.text()
    except OSError:
        return -1
    found = re.search(r"^zapbus_worker_commands_in_flight (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


async def _until_positive(probe: Callable[[], Awaitable[int]], timeout: float = 5.0) -> int:
    """Poll ``probe`` until it is > 0 (or ``timeout`` passes); its last value."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value > 0 or asyncio.get_running_loop().time() > end:
            return value
        await asyncio.sleep(0.01)


async def _histories(stack: ProcessStack, rows: list[dict[str, Any]], most: int = 3) -> str:
    """The history of (at most ``most``) connections that did not reach qr_ready."""
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        out = []
        for row in [r for r in rows if r["status"] != "qr_ready"][:most]:
            events = await conn.fetch(
                "SELECT occurred_at, event_type, from_status, to_status, applied, reason"
                " FROM connection_events WHERE connection_id = $1 ORDER BY seq",
                row["id"],
            )
            out.append(f"{row['id']} {row['session_name']} {row['status']}:")
            out += [f"  {dict(e)}" for e in events]
    finally:
        await conn.close()
    return "\n".join(out)


async def _sim_stats(stack: ProcessStack) -> dict[str, Any]:
    async with stack.http.get(f"{stack.sim_url}/_sim/stats") as r:
        body: dict[str, Any] = await r.json()
        return body


async def test_chaos_every_accepted_create_reaches_qr_ready_one_session_each(workdir: Path) -> None:
    sim = SimConfig(
        port=0,
        create_delay=(0.05, 0.3),
        fail_rate=0.1,
        timeout_rate=0.05,
        hang_seconds=3.0,
        qr_first_seconds=600,
        qr_next_seconds=600,
    )
    async with process_stack(workdir, sim, WORKER_ENV) as stack:
        names = [f"c{i:03d}" for i in range(200)]
        refused: collections.Counter[str] = collections.Counter()

        async def creates() -> list[str]:
            ids: list[str] = []
            for i in range(0, len(names), 10):
                ids += await asyncio.gather(
                    *(_accept(stack, n, refused) for n in names[i : i + 10])
                )
                await asyncio.sleep(0.4)  # ~8 s of arrivals, so every fault hits traffic
            return ids

        async def faults() -> list[tuple[str, int, int | None, float]]:
            """Each fault, once work is in flight: (what, creates unfinished just before,
            commands in the worker just before a SIGKILL or NATS restart, seconds it took)."""
            done: list[tuple[str, int, int | None, float]] = []
            steps = [
                ("worker SIGKILL", lambda: stack.restart("session_worker")),
                ("NATS restart", stack.nats.arestart),
                ("worker SIGKILL", lambda: stack.restart("session_worker")),
                ("Postgres restart (immediate)", lambda: stack.postgres.arestart(mode="immediate")),
                ("worker SIGKILL", lambda: stack.restart("session_worker")),
            ]
            for what, act in steps:
                await asyncio.sleep(1.0)
                unfinished = await _until_positive(lambda: _unfinished(stack))
                in_flight = None
                if not what.startswith("Postgres"):  # cut commands mid-way, not between them
                    in_flight = await _until_positive(lambda: _worker_in_flight(stack))
                start = asyncio.get_running_loop().time()
                await act()
                done.append(
                    (what, unfinished, in_flight, asyncio.get_running_loop().time() - start)
                )
            return done

        ids, hits = await asyncio.gather(creates(), faults())
        assert len(set(ids)) == 200
        inflicted = [
            f"{what} ({unfinished} creates unfinished"
            + (f", {in_flight} commands in the worker" if in_flight is not None else "")
            + f"; back in {took:.1f} s)"
            for what, unfinished, in_flight, took in hits
        ]
        # Every fault hit work in flight: creates accepted but not yet qr_ready, and for a
        # worker SIGKILL or NATS restart commands the worker was in the middle of.
        assert all(u > 0 and (f is None or f > 0) for _, u, f, _ in hits), "; ".join(inflicted)

        async def all_settled() -> list[dict[str, Any]] | None:
            rows = await _statuses(stack)
            return None if any(r["status"] in UNFINISHED for r in rows) else rows

        try:
            rows = await wait_for(
                "every connection past awaiting_qr", all_settled, timeout=120, every=0.5
            )
        except AssertionError:
            counts = collections.Counter(r["status"] for r in await _statuses(stack))
            raise AssertionError(f"not final: {dict(counts)}\n{stack.all_logs()[-5000:]}") from None
        stats = await _sim_stats(stack)
        counts = collections.Counter(r["status"] for r in rows)
        reasons = collections.Counter(
            str(r["status_reason"]).split(":")[0] for r in rows if r["status"] == "failed"
        )
        per_session = collections.Counter(stats["created"].values())
        print(f"\nfaults: {', '.join(inflicted)}")
        print(f"create answers retried by the client: {dict(refused) or 'none'}")
        print(f"connections: {len(rows)} {dict(counts)}; failed reasons: {dict(reasons)}")
        print(
            f"simulator sessions created per name: {dict(per_session)};"
            f" webhooks sent {stats['webhooks_sent']}, given up {stats['webhooks_failed']}"
        )
        logs = stack.all_logs()
        felt = {
            m: logs.count(m)
            for m in (
                "nats disconnected",
                "projection failed",
                "dependency unavailable",
                "outbox relay pass failed",
                "command not finished",
                "fence check skipped",
                "stuck connection re-driven",
                "stuck connection failed",
            )
        }
        print(f"what the services logged about the faults: {felt}")
        assert len(rows) == 200
        # Every accepted create reaches qr_ready: the settings leave a correct system no way
        # to fail one (8 attempts, a watchdog deadline past every outage), whatever the faults.
        if counts != {"qr_ready": 200}:
            raise AssertionError(
                f"not all qr_ready: {dict(counts)}; reasons: {dict(reasons)};"
                f" faults: {inflicted}\n{await _histories(stack, rows)}"
            )
        assert max(stats["created"].values()) <= 1
        assert set(stats["created"]) <= {r["session_name"] for r in rows}


async def test_gateway_killed_right_after_202_loses_nothing(workdir: Path) -> None:
    sim = SimConfig(port=0, create_delay=(0.05, 0.1), qr_first_seconds=600)
    async with process_stack(workdir, sim, WORKER_ENV) as stack:
        ids = []
        for i in range(5):
            async with stack.http.post(
                f"{stack.gateway_url}/v1/connections", json={"name": f"k{i}"}, headers=stack.auth()
            ) as r:
                assert r.status == 202
                ids.append((await r.json())["id"])
            stack.procs["gateway"].kill()  # the instant after the 202
            stack.procs["gateway"].start()
            await stack.procs["gateway"].wait_healthy()

        async def all_ready() -> bool:
            rows = await _statuses(stack)
            return sorted(str(r["id"]) for r in rows if r["status"] == "qr_ready") == sorted(ids)

        try:
            await wait_for("all five connections qr_ready", all_ready, timeout=60, every=0.2)
        except AssertionError:
            rows = await _statuses(stack)
            raise AssertionError(f"{rows}\n{stack.all_logs()[-6000:]}") from None


async def test_nats_down_when_create_arrives_still_202_then_created(workdir: Path) -> None:
    sim = SimConfig(port=0, create_delay=(0.05, 0.1), qr_first_seconds=600)
    async with process_stack(workdir, sim, WORKER_ENV) as stack:
        await stack.nats.astop()

        async def ready_without_nats() -> dict[str, Any] | None:
            async with stack.http.get(f"{stack.gateway_url}/readyz") as r:
                body: dict[str, Any] = await r.json()
                return body if r.status == 200 and body["checks"]["nats"] is False else None

        # The gateway sees NATS gone yet stays ready: it accepts creates into its outbox.
        # (Polled, so a slow database probe on a loaded machine cannot fail the test.)
        await wait_for("the gateway ready while it sees NATS down", ready_without_nats)
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections", json={"name": "offline"}, headers=stack.auth()
        ) as r:
            assert r.status == 202, await r.text()
            connection_id = uuid.UUID((await r.json())["id"])
        rows = await _statuses(stack)
        assert [r["status"] for r in rows] == ["pending"]
        await stack.nats.astart()

        async def ready() -> bool:
            return [r["status"] for r in await _statuses(stack)] == ["qr_ready"]

        await wait_for("the connection to reach qr_ready once NATS is back", ready, timeout=60)
        stats = await _sim_stats(stack)
        assert list(stats["created"].values()) == [1]
        assert rows[0]["id"] == connection_id
