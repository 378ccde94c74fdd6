"""Two of every service against the same streams, as processes: the work is shared and every
outcome holds, including per-connection order with two projectors (events partitioned by
connection, one projector per partition at a time, a projector SIGKILLed mid-stream)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from services.baileys_sim.config import SimConfig
from tests.faults import ProcessStack, process_stack
from tests.stack import wait_for

SIM = SimConfig(port=0, create_delay=(0.05, 0.3), qr_first_seconds=120, qr_next_seconds=60)
ENV = {
    "ZAPBUS_EVENT_PARTITIONS": "4",
    "ZAPBUS_OUTBOX_POLL_SECONDS": "0.2",
    "ZAPBUS_BAILEYS_TIMEOUT_SECONDS": "5",
    "ZAPBUS_RETRY_BASE_SECONDS": "0.2",
    "ZAPBUS_RETRY_MAX_SECONDS": "1",
    "ZAPBUS_ACK_WAIT_SECONDS": "5",
    "ZAPBUS_RECONCILE_INTERVAL_SECONDS": "1",
}
CREATES = 40


async def _rows(stack: ProcessStack) -> dict[uuid.UUID, dict[str, Any]]:
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        return {
            r["id"]: dict(r)
            for r in await conn.fetch("SELECT id, status, session_name FROM connections")
        }
    finally:
        await conn.close()


async def _owners(stack: ProcessStack) -> Counter[uuid.UUID]:
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        rows = await conn.fetch("SELECT owner FROM projector_leases WHERE expires_at > now()")
    finally:
        await conn.close()
    return Counter(r["owner"] for r in rows)


async def _all(stack: ProcessStack, *statuses: str) -> dict[uuid.UUID, dict[str, Any]] | None:
    rows = await _rows(stack)
    return (
        rows
        if len(rows) == CREATES and all(r["status"] in statuses for r in rows.values())
        else None
    )


async def _sim(stack: ProcessStack, path: str) -> Any:
    async with stack.http.post(f"{stack.sim_url}{path}") as r:
        assert r.status < 300, f"{path}: {r.status} {await r.text()}"
        return await r.json()


async def test_two_of_every_service_share_the_work_and_keep_order(workdir: Path) -> None:
    async with process_stack(workdir, SIM, ENV, replicas=2) as stack:

        async def shared() -> bool:
            owners = await _owners(stack)
            return len(owners) == 2 and sorted(owners.values()) == [2, 2]

        await wait_for("both projectors to hold two partitions each", shared, timeout=30)

        gateways = [stack.gateway_url, f"http://127.0.0.1:{stack.ports['gateway_2']}"]

        async def create(n: int) -> str:
            async with stack.http.post(
                f"{gateways[n % 2]}/v1/connections",
                json={"name": f"c{n}"},
                headers=stack.auth(),
            ) as r:
                assert r.status == 202, await r.text()
                return str((await r.json())["session_name"])

        names = await asyncio.gather(*(create(n) for n in range(CREATES)))
        await wait_for("every create to reach qr_ready", lambda: _all(stack, "qr_ready"), 60)
        await asyncio.gather(*(_sim(stack, f"/_sim/sessions/{n}/scan") for n in names))
        await wait_for("every connection connected", lambda: _all(stack, "connected"), 60)

        # Reconnect cycles of identical bodies, for every connection at once; one projector
        # is SIGKILLed in the middle (its partitions move once their leases expire).
        async def cycle(name: str) -> None:
            for _ in range(2):
                await _sim(stack, f"/_sim/sessions/{name}/disconnect")
                await _sim(stack, f"/_sim/sessions/{name}/reconnect")

        cycles = asyncio.gather(*(cycle(n) for n in names))
        await asyncio.sleep(0.05)  # let the cycles start: the kill must land mid-stream
        stack.procs["projector_2"].kill()
        await cycles

        done_moves = ["reconnecting", "connected"] * 2
        unfinished: list[tuple[str, list[str]]] = []

        async def cycled() -> dict[uuid.UUID, list[str]] | None:
            conn = await asyncpg.connect(stack.postgres.dsn)
            try:
                history = await conn.fetch(
                    "SELECT connection_id, from_status, to_status FROM connection_events"
                    " WHERE applied ORDER BY seq"
                )
            finally:
                await conn.close()
            moves: dict[uuid.UUID, list[str]] = {}
            last: dict[uuid.UUID, str] = {}
            for h in history:
                cid = h["connection_id"]
                # each applied transition starts where the one before it ended
                assert last.get(cid, h["from_status"]) == h["from_status"], (cid, h)
                last[cid] = h["to_status"]
                moves.setdefault(cid, []).append(h["to_status"])
            # done: the last four applied moves are the two cycles, in order (applied out of
            # order, a connection would end reconnecting and this never holds)
            done = [m for m in moves.values() if m[-4:] == done_moves]
            unfinished[:] = [(str(c), m[-6:]) for c, m in moves.items() if m[-4:] != done_moves]
            return moves if len(done) == CREATES else None

        # the killed projector's partitions move after its lease (10 s) and ack_wait (15 s)
        try:
            moves = await wait_for("two reconnect cycles projected everywhere", cycled, 90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; unfinished (last moves): {unfinished[:5]}") from None
        for cid, seen in moves.items():
            assert seen[-4:] == done_moves, (cid, seen)
        assert await _all(stack, "connected")

        async with stack.http.get(f"{stack.sim_url}/_sim/stats") as r:
            stats = await r.json()
        assert sorted(stats["live"]) == sorted(names)
        assert set(stats["created"].values()) == {1}

        # Every copy did some of the work.
        logs = {p.stem: p.read_text(errors="replace") for p in stack.logs.glob("*.log")}
        for name in ("gateway", "gateway_2"):
            assert "/v1/connections" in logs[name], f"{name} served no create"
        for name in ("webhook", "webhook_2"):
            assert "/webhooks/baileys/" in logs[name], f"{name} received no webhook"
        for name in ("session_worker", "session_worker_2"):
            assert '"command succeeded"' in logs[name] or "command succeeded" in logs[name], (
                f"{name} handled no command"
            )
        for name in ("projector", "projector_2"):
            assert "batch projected" in logs[name], f"{name} projected nothing"
