"""Tests of the Baileys HTTP server simulator, on real loopback servers.

A tiny receiver app collects the simulator's webhooks; outcomes are awaited with a
deadline-bounded poll, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.baileys_sim import webhooks as sim_webhooks
from services.baileys_sim.app import REGISTRY_KEY, create_app
from services.baileys_sim.config import SimConfig, load_sim_config, parse_delay
from services.baileys_sim.sessions import SessionRegistry

KEY = {"X-API-Key": "test-key"}
QR_RE = re.compile(r"^2@[A-Za-z0-9+/=]{90,}(,[A-Za-z0-9+/=]{40,}){3}$")
BASE: dict[str, Any] = {
    "api_key": "test-key",
    "create_delay": (0.05, 0.05),
    "qr_first_seconds": 60.0,
    "qr_next_seconds": 60.0,
    "seed": 7,
}

Client = TestClient[web.Request, web.Application]
MakeSim = Callable[..., Awaitable[Client]]


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` every 10 ms; fail the test naming ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Receiver:
    """Collects webhook bodies; can answer 500 to the first ``fail_next`` requests."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_next = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500)
        self.bodies.append(await request.json())
        return web.Response(text="ok")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["session"] == name]

    def has(self, name: str, event: str, **data: Any) -> bool:
        return any(
            b["event"] == event and all(b["data"].get(k) == v for k, v in data.items())
            for b in self.events(name)
        )


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Receiver:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    server = await aiohttp_server(app)
    recv.url = str(server.make_url("/hook"))
    return recv


@pytest.fixture
def make_sim(aiohttp_client: Callable[..., Awaitable[Client]]) -> MakeSim:
    async def factory(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(SimConfig(**{**BASE, **overrides})))

    return factory


def registry(client: Client) -> SessionRegistry:
    return client.app[REGISTRY_KEY]


async def create(client: Client, name: str, url: str, **kw: Any) -> aiohttp.ClientResponse:
    return await client.post("/sessions", json={"name": name, "webhookUrl": url}, headers=KEY, **kw)


async def test_api_key_required(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim()
    for headers in ({}, {"X-API-Key": "wrong"}):
        resp = await client.post(
            "/sessions", json={"name": "a", "webhookUrl": receiver.url}, headers=headers
        )
        assert resp.status == 401
        assert await resp.json() == {"success": False, "error": "invalid api key"}
    assert (await client.get("/sessions/a")).status == 401
    health = await client.get("/health")
    assert await health.json() == {"status": "ok", "sessions": 0}


async def test_create_get_delete(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim()
    resp = await create(client, "s1", receiver.url)
    assert resp.status == 201
    assert await resp.json() == {"success": True, "data": {"name": "s1", "status": "connecting"}}
    assert registry(client).created_count["s1"] == 1
    await wait_for(lambda: receiver.has("s1", "qr.update"), "first qr.update of s1")
    first = receiver.events("s1")[0]
    assert first == {"event": "session.status", "session": "s1", "data": {"status": "connecting"}}

    dup = await create(client, "s1", receiver.url)
    assert dup.status == 409
    assert await dup.json() == {"success": False, "error": "session already exists"}

    got = await (await client.get("/sessions/s1", headers=KEY)).json()
    assert got == {"success": True, "data": {"name": "s1", "status": "qr", "qrCount": 1}}
    assert (await (await client.get("/health")).json())["sessions"] == 1

    assert (await client.delete("/sessions/s1", headers=KEY)).status == 200
    missing = await client.get("/sessions/s1", headers=KEY)
    assert missing.status == 404
    assert await missing.json() == {"success": False, "error": "session not found"}
    assert (await client.delete("/sessions/s1", headers=KEY)).status == 404
    stats = await (await client.get("/_sim/stats")).json()
    assert stats["created"] == {"s1": 1} and stats["live"] == []


@pytest.mark.parametrize("name", ["", "a b", "x" * 101, "ção", 5])
async def test_invalid_name(make_sim: MakeSim, receiver: Receiver, name: object) -> None:
    client = await make_sim()
    resp = await client.post(
        "/sessions", json={"name": name, "webhookUrl": receiver.url}, headers=KEY
    )
    assert resp.status == 400
    assert await resp.json() == {"success": False, "error": "invalid session name"}


async def test_concurrent_double_create(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim(create_delay=(0.2, 0.2))
    first, second = await asyncio.gather(
        create(client, "twin", receiver.url), create(client, "twin", receiver.url)
    )
    assert sorted([first.status, second.status]) == [201, 409]
    assert registry(client).created_count["twin"] == 1


async def test_qr_rotation_then_408(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim(qr_first_seconds=0.1, qr_next_seconds=0.05, qr_max=3)
    assert (await create(client, "rot", receiver.url)).status == 201
    await wait_for(lambda: receiver.has("rot", "session.status", statusReason=408), "408 close")
    events = receiver.events("rot")
    assert [e["event"] for e in events] == ["session.status"] + ["qr.update"] * 3 + [
        "session.status"
    ]
    qrs = [e["data"]["qr"] for e in events if e["event"] == "qr.update"]
    assert len(set(qrs)) == 3 and all(QR_RE.match(qr) for qr in qrs)
    assert events[-1]["data"] == {
        "status": "close",
        "statusReason": 408,
        "reason": "QR refs attempts ended",
    }
    assert (await client.get("/sessions/rot", headers=KEY)).status == 404
    assert (await create(client, "rot", receiver.url)).status == 201  # name is free again
    assert registry(client).created_count["rot"] == 2


async def test_scan_then_connected(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim()
    assert (await client.post("/_sim/sessions/nope/scan")).status == 404
    assert (await create(client, "sc", receiver.url)).status == 201
    assert (await client.post("/_sim/sessions/sc/scan")).status == 200
    await wait_for(lambda: receiver.has("sc", "session.status", status="connected"), "connected")
    assert [e["data"] for e in receiver.events("sc")[2:]] == [
        {"status": "close", "statusReason": 515, "reason": "restartRequired"},
        {"status": "connected"},
    ]
    got = await (await client.get("/sessions/sc", headers=KEY)).json()
    assert got["data"]["status"] == "connected"
    assert (await client.post("/_sim/sessions/sc/scan")).status == 409


async def test_logout(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim()
    assert (await create(client, "lo", receiver.url)).status == 201
    assert (await client.post("/_sim/sessions/lo/logout")).status == 200
    await wait_for(lambda: receiver.has("lo", "session.status", statusReason=401), "401 close")
    assert receiver.events("lo")[-1]["data"]["reason"] == "loggedOut"
    assert (await client.get("/sessions/lo", headers=KEY)).status == 404
    # an ended session can still be replayed: the terminal close now arrives first
    original = receiver.events("lo")
    assert (await client.post("/_sim/sessions/lo/replay", json={"mode": "reverse"})).status == 200
    await wait_for(lambda: len(receiver.events("lo")) == 2 * len(original), "reversed replay")
    assert receiver.events("lo")[len(original) :] == original[::-1]


async def test_fail_rate_then_patch(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim(fail_rate=1.0)
    resp = await create(client, "f", receiver.url)
    assert resp.status == 500
    assert await resp.json() == {"success": False, "error": "internal error"}
    assert registry(client).created_count["f"] == 0
    assert (await (await client.get("/_sim/stats")).json())["created"] == {}
    patched = await client.patch("/_sim/config", json={"fail_rate": 0.0, "create_delay": [0, 0]})
    assert patched.status == 200
    assert (await client.patch("/_sim/config", json={"fail_rate": 2})).status == 400
    assert (await create(client, "f", receiver.url)).status == 201
    assert registry(client).created_count["f"] == 1


async def test_timeout_rate_creates_anyway(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim(timeout_rate=1.0, hang_seconds=5.0)
    with pytest.raises(TimeoutError):
        await create(client, "slow", receiver.url, timeout=aiohttp.ClientTimeout(total=0.3))
    got = await client.get("/sessions/slow", headers=KEY)
    assert got.status == 200
    assert registry(client).created_count["slow"] == 1


async def test_replay_duplicate_and_reverse(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim()
    assert (await create(client, "rp", receiver.url)).status == 201
    assert (await client.post("/_sim/sessions/rp/scan")).status == 200
    await wait_for(lambda: receiver.has("rp", "session.status", status="connected"), "connected")
    original = receiver.events("rp")
    assert len(original) == 4
    resp = await client.post("/_sim/sessions/rp/replay", json={"mode": "duplicate"})
    assert await resp.json() == {"success": True, "data": {"resent": 4}}
    await wait_for(lambda: len(receiver.events("rp")) == 8, "4 duplicated webhooks")
    assert receiver.events("rp")[4:] == original
    assert (await client.post("/_sim/sessions/rp/replay", json={"mode": "reverse"})).status == 200
    await wait_for(lambda: len(receiver.events("rp")) == 12, "4 reversed webhooks")
    assert receiver.events("rp")[8:] == original[::-1]
    assert (await client.post("/_sim/sessions/rp/replay", json={"mode": "x"})).status == 400
    assert (await client.post("/_sim/sessions/zz/replay", json={"mode": "reverse"})).status == 404


async def test_duplicate_rate(make_sim: MakeSim, receiver: Receiver) -> None:
    client = await make_sim(webhook_duplicate_rate=1.0)
    assert (await create(client, "d", receiver.url)).status == 201
    await wait_for(lambda: len(receiver.events("d")) == 4, "connecting and qr, each twice")
    events = receiver.events("d")
    assert events[0] == events[1] and events[2] == events[3]


async def test_webhook_retries(
    make_sim: MakeSim, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim_webhooks, "WEBHOOK_BACKOFF_SECONDS", 0.001)
    client = await make_sim()
    receiver.fail_next = 3
    assert (await create(client, "r", receiver.url)).status == 201
    await wait_for(lambda: receiver.has("r", "qr.update"), "qr.update after retries")
    assert receiver.events("r")[0]["data"] == {"status": "connecting"}
    bad_url = receiver.url.replace("/hook", "/missing")  # always 404
    assert (await create(client, "r2", bad_url)).status == 201
    await wait_for(lambda: registry(client).webhooks.failed == 2, "2 webhooks given up")
    metrics = await (await client.get("/metrics")).text()
    assert "zapbus_sim_sessions_created_total 2.0" in metrics
    assert "zapbus_sim_webhooks_failed_total 2.0" in metrics


def test_load_sim_config() -> None:
    assert load_sim_config({}) == SimConfig()
    cfg = load_sim_config(
        {
            "ZAPBUS_SIM_CREATE_DELAY": "1-3",
            "ZAPBUS_SIM_PORT": "0",
            "ZAPBUS_SIM_QR_MAX": "2",
            "ZAPBUS_BAILEYS_API_KEY": "k",
            "ZAPBUS_SIM_FAIL_RATE": "0.5",
        }
    )
    assert (cfg.create_delay, cfg.port, cfg.qr_max, cfg.api_key, cfg.fail_rate) == (
        (1.0, 3.0),
        0,
        2,
        "k",
        0.5,
    )
    assert parse_delay("2") == (2.0, 2.0)
    for var, value in [
        ("ZAPBUS_SIM_CREATE_DELAY", "3-1"),
        ("ZAPBUS_SIM_FAIL_RATE", "1.5"),
        ("ZAPBUS_SIM_PORT", "http"),
        ("ZAPBUS_SIM_QR_MAX", "0"),
        ("ZAPBUS_SIM_QR_FIRST_SECONDS", "nan"),
    ]:
        with pytest.raises(ValueError, match=var):
            load_sim_config({var: value})
