"""The notifier SIGKILLed mid-delivery loses nothing: real processes, throwaway servers.

A slow receiver keeps deliveries in flight while the notifier is killed and restarted; in
the end every queued delivery succeeded, the receiver saw each ``webhook-id`` (some twice:
that is what the id is for), and each connection's changes arrived in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from services.baileys_sim.config import SimConfig
from tests.chains import expected_webhook_ids, first_seen
from tests.faults import process_stack
from tests.stack import serve, wait_for
from zapbus import bus
from zapbus.config import load_settings
from zapbus.tools.localinfra import free_port

ORDER = ["pending", "creating", "awaiting_qr", "qr_ready"]


async def test_notifier_sigkilled_mid_delivery_loses_nothing(workdir: Path) -> None:
    sim = SimConfig(port=0, create_delay=(0.05, 0.2), qr_first_seconds=600, qr_next_seconds=600)
    got: list[tuple[str, dict[str, Any]]] = []
    port = free_port()

    async def hook(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        await asyncio.sleep(0.3)  # slow: a kill lands while deliveries are in flight
        got.append((request.headers["webhook-id"], body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = await serve(app, port)
    env = {"ZAPBUS_NOTIFY_ALLOW_PRIVATE": "true", "ZAPBUS_NOTIFY_RETRY_BASE_SECONDS": "0.2"}
    try:
        async with process_stack(workdir, sim, env) as stack:
            async with stack.http.post(
                f"{stack.gateway_url}/v1/webhooks",
                json={"url": f"http://127.0.0.1:{port}/hook", "events": ["connection.status"]},
                headers=stack.auth(),
            ) as r:
                assert r.status == 201, await r.text()
            ids = []
            for i in range(12):
                async with stack.http.post(
                    f"{stack.gateway_url}/v1/connections",
                    json={"name": f"k{i}"},
                    headers=stack.auth(),
                ) as r:
                    assert r.status == 202
                    ids.append((await r.json())["id"])
            for _ in range(3):
                await wait_for("deliveries in flight", _async(lambda: len(got) > 0), timeout=30)
                stack.procs["notifier"].kill()
                await asyncio.sleep(0.5)
                stack.procs["notifier"].start()
                await stack.procs["notifier"].wait_healthy(timeout=30)

            conn = await asyncpg.connect(stack.postgres.dsn)
            try:

                async def all_done() -> Any:
                    rows = await conn.fetch("SELECT webhook_id, state FROM webhook_deliveries")
                    done = len(rows) == len(ids) * len(ORDER) and all(
                        r["state"] == "succeeded" for r in rows
                    )
                    return rows if done else None

                rows = await wait_for("every delivery succeeded", all_done, timeout=60)
            finally:
                await conn.close()
    finally:
        await runner.cleanup()
    assert {r["webhook_id"] for r in rows} == {wid for wid, _ in got}
    for cid in ids:
        first_seen: dict[str, str] = {}
        for wid, body in got:
            if body["data"]["id"] == cid:
                first_seen.setdefault(wid, body["data"]["status"])
        assert list(first_seen.values()) == ORDER, (cid, list(first_seen.values()))


def _async(probe: Any) -> Any:
    async def run() -> Any:
        return probe()

    return run


async def test_order_and_completeness_per_connection_across_repeated_kill_9(
    workdir: Path,
) -> None:
    """Changes keep coming (recreates of several connections) while the notifier is SIGKILLed
    again and again, some kills landing while its fan-out holds a fetched, unacked batch (the
    consumer shows it). Every connection's webhooks then arrive complete and in stream order:
    the held batch is not overtaken by the changes after it."""
    sim = SimConfig(port=0, create_delay=(0.02, 0.1), qr_first_seconds=600, qr_next_seconds=600)
    got: list[tuple[str, dict[str, Any]]] = []
    port = free_port()

    async def hook(request: web.Request) -> web.Response:
        got.append((request.headers["webhook-id"], json.loads(await request.read())))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = await serve(app, port)
    env = {"ZAPBUS_NOTIFY_ALLOW_PRIVATE": "true", "ZAPBUS_NOTIFY_RETRY_BASE_SECONDS": "0.2"}
    try:
        async with process_stack(workdir, sim, env) as stack:
            settings = load_settings(stack.procs["notifier"].env)
            names = settings.names
            nc = await bus.connect(stack.nats.url, "test")
            js = nc.jetstream()
            try:
                async with stack.http.post(
                    f"{stack.gateway_url}/v1/webhooks",
                    json={"url": f"http://127.0.0.1:{port}/hook", "events": ["*"]},
                    headers=stack.auth(),
                ) as r:
                    assert r.status == 201, await r.text()
                    endpoint = await r.json()
                ids = []
                for i in range(8):
                    async with stack.http.post(
                        f"{stack.gateway_url}/v1/connections",
                        json={"name": f"c{i}"},
                        headers=stack.auth(),
                    ) as r:
                        assert r.status == 202
                        ids.append((await r.json())["id"])
                churn = asyncio.create_task(_recreate_forever(stack, ids))
                kills = held = 0
                try:
                    # kill until a few kills caught a batch fetched and not acked (some of
                    # them only its acks had not left: that one was queued already)
                    while held < 6 and kills < 40:
                        await wait_for("webhooks flowing", _async(lambda: len(got) > 0))
                        await asyncio.sleep(random.uniform(0.3, 1.5))
                        stack.procs["notifier"].kill()
                        kills += 1
                        info = await js.consumer_info(names.changes_stream, names.notifier_consumer)
                        held += bool(info.num_ack_pending)
                        stack.procs["notifier"].start()
                        await stack.procs["notifier"].wait_healthy(timeout=30)
                    # changes go on a while after the last restart, past the held batch
                    await asyncio.sleep(3)
                finally:
                    churn.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await churn
                assert held >= 1, f"no kill of {kills} caught an unacked batch"

                async def all_received() -> list[tuple[list[str], list[str]]] | None:
                    pairs = []
                    for cid in ids:
                        seen = first_seen(got, cid)
                        chain = await expected_webhook_ids(js, names, cid, endpoint["id"], ["*"])
                        if not set(chain) <= set(seen):
                            return None
                        pairs.append((seen, chain))
                    return pairs

                pairs = await wait_for("every connection's webhooks", all_received, timeout=90)
            finally:
                await nc.close()
    finally:
        await runner.cleanup()
    for cid, (seen, chain) in zip(ids, pairs, strict=True):
        assert len(chain) > 4, cid
        assert seen == chain, (cid, kills, held)


async def _recreate_forever(stack: Any, ids: list[str]) -> None:
    """Recreate the connections one after another, round and round (each makes several
    changes); a recreate refused for the state it is in (409) is skipped."""
    while True:
        for cid in ids:
            async with stack.http.post(
                f"{stack.gateway_url}/v1/connections/{cid}/recreate", headers=stack.auth()
            ) as r:
                assert r.status in (202, 409), await r.text()
            await asyncio.sleep(0.05)
