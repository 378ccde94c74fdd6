"""End to end through the real services: create -> Baileys simulator -> webhook -> Postgres."""

from __future__ import annotations

import time

from tests.stack import Stack


async def test_create_reaches_qr_ready_then_connected_after_scan(stack: Stack) -> None:
    t0 = time.perf_counter()
    created = await stack.create("sales")
    accepted_ms = (time.perf_counter() - t0) * 1000
    assert created["status"] == "pending"
    assert created["generation"] == 1
    assert created["session_name"].startswith("zb_")
    print(f"\n202 answered in {accepted_ms:.1f} ms")

    ready = await stack.wait_status(created["id"], "qr_ready")
    assert ready["qr"].startswith("2@")
    assert ready["qr_seq"] == 1
    assert ready["qr_expires_at"] is not None

    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/scan")
    connected = await stack.wait_status(created["id"], "connected")
    assert connected["qr"] is None

    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{created['id']}/history", headers=stack.auth()
    ) as r:
        history = (await r.json())["items"]
    applied = [h["to_status"] for h in history if h["applied"]]
    assert applied == ["pending", "creating", "awaiting_qr", "qr_ready", "pairing", "connected"]
    pairing = next(h for h in history if h["to_status"] == "pairing" and h["applied"])
    assert pairing["code"] == 515
    stats = await stack.sim("GET", "/_sim/stats")
    assert stats["created"][created["session_name"]] == 1
