"""A pool of three Baileys servers (simulator processes): placement, the full pool, failover,
the lost server's return, and drain --move, each checked against the simulators' own record.

The zapbus services run in this process (``start_stack``) with ``ZAPBUS_BAILEYS_URLS`` naming
the three simulators; each simulator keeps its sessions in a state file, so a SIGKILLed one
comes back holding them, as a Baileys server with persistent auth state does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.session_worker.drift import parse_session_name
from services.session_worker.placement import PlacementPolicy, ServerView, choose, pool_views
from tests.stack import FAST_SIM, Stack, changes_when, start_stack, versions_grow, wait_for
from zapbus import db
from zapbus.config import ConfigError, Settings, load_settings
from zapbus.tools import cli, servercli
from zapbus.tools.localinfra import free_port
from zapbus.tools.procs import ServiceProcess

NAMES = ("a", "b", "c")
LIVE = ("qr_ready",)
POOL: dict[str, Any] = {
    "baileys_health_interval_seconds": 0.3,
    "baileys_failover_after_seconds": 2.0,
    "baileys_failover_per_second": 50.0,
    "baileys_rejoin_after_seconds": 3.0,
    "reconcile_interval_seconds": 0.5,
    "reconcile_grace_seconds": 0.5,
}


@dataclass
class Sims:
    procs: dict[str, ServiceProcess]
    urls: dict[str, str]

    def spec(self) -> str:
        return ",".join(f"{n}={u}" for n, u in self.urls.items())

    async def live(self, http: aiohttp.ClientSession, name: str) -> dict[str, str]:
        async with http.get(f"{self.urls[name]}/_sim/stats") as r:
            states: dict[str, str] = (await r.json())["states"]
            return states

    async def all_live(self, http: aiohttp.ClientSession) -> dict[str, dict[str, str]]:
        return {n: await self.live(http, n) for n in self.urls if self.procs[n].running}


@pytest.fixture
async def sims(workdir: Path) -> AsyncIterator[Sims]:
    async with _sims(workdir, "seed") as started:
        yield started


@pytest.fixture
async def waha_sims(workdir: Path) -> AsyncIterator[Sims]:
    async with _sims(workdir, "waha") as started:
        yield started


@contextlib.asynccontextmanager
async def _sims(workdir: Path, kind: str) -> AsyncIterator[Sims]:
    procs, urls = {}, {}
    for name in NAMES:
        port = free_port()
        env = {
            "ZAPBUS_SIM_KIND": kind,
            "ZAPBUS_SIM_PORT": str(port),
            "ZAPBUS_SIM_CREATE_DELAY": "0.02-0.1",
            "ZAPBUS_SIM_QR_FIRST_SECONDS": "120",
            "ZAPBUS_BAILEYS_API_KEY": FAST_SIM.api_key,
            "ZAPBUS_SIM_STATE_FILE": str(workdir / f"sim-{name}.json"),
            "ZAPBUS_LOG_LEVEL": "WARNING",
        }
        urls[name] = f"http://127.0.0.1:{port}"
        procs[name] = ServiceProcess(
            f"sim-{name}",
            "services.baileys_sim",
            env,
            f"{urls[name]}/healthz",
            workdir / f"sim-{name}.log",
        )
        procs[name].start()
    try:
        for proc in procs.values():
            await proc.wait_healthy()
        yield Sims(procs, urls)
    finally:
        for proc in procs.values():
            proc.stop(timeout=5)


def _cli_env(monkeypatch: pytest.MonkeyPatch, stack: Stack, sims: Sims) -> None:
    """The environment a `zapbus` command needs to see this stack's pool."""
    monkeypatch.setenv("ZAPBUS_DATABASE_URL", stack.settings.database_url)
    monkeypatch.setenv("ZAPBUS_DB_SCHEMA", stack.settings.db_schema)
    monkeypatch.setenv("ZAPBUS_BAILEYS_URLS", sims.spec())


async def _all(stack: Stack, ids: list[str]) -> list[dict[str, Any]]:
    return [(await stack.get(i))[1] for i in ids]


async def _wait_all(stack: Stack, ids: list[str], *statuses: str, timeout: float = 30) -> Any:
    async def probe() -> list[dict[str, Any]] | None:
        rows = await _all(stack, ids)
        return rows if all(r["status"] in statuses for r in rows) else None

    return await wait_for(f"{len(ids)} connections in {statuses}", probe, timeout)


def _one_live_each(live: dict[str, dict[str, str]], rows: list[dict[str, Any]]) -> str | None:
    """None if every connection has exactly one live session in the pool, of its current
    generation, on the server its row names; else what is wrong."""
    where: dict[str, list[tuple[str, int]]] = {}
    for server, sessions in live.items():
        for session in sessions:
            parsed = parse_session_name(session)
            if parsed is not None:
                where.setdefault(str(parsed[0]), []).append((server, parsed[1]))
    for row in rows:
        found = where.get(row["id"], [])
        if found != [(row["server"], row["generation"])]:
            return f"{row['id']} (g{row['generation']} on {row['server']}): live {found}"
    return None


def test_choose_prefers_most_free_and_skips_drained_down_and_probation() -> None:
    views = [
        ServerView("a", placed=3),
        ServerView("b", placed=1, sessions=4, foreign=3),  # other apps share b: theirs count
        ServerView("c", placed=2),
    ]
    assert choose(views, 0) == ("c", "")
    assert choose(views, 5)[0] == "c"
    views = [ServerView("a", drained=True), ServerView("b", up=False), ServerView("c", placed=9)]
    assert choose(views, 0) == ("c", "")
    assert choose(views, 9) == (
        None,
        "every other Baileys server is at its cap of 9 sessions (1 down, 1 drained)",
    )
    assert choose([ServerView("a", placed=9)], 9) == (
        None,
        "every Baileys server is at its cap of 9 sessions",
    )
    rejoining = [ServerView("a", probation=True), ServerView("b", placed=5)]
    assert choose(rejoining, 0) == ("b", "")  # back from an outage: only when nothing else
    assert choose(rejoining, 5) == ("a", "")
    assert choose([ServerView("a", up=False)], 0) == (
        None,
        "no Baileys server is reachable (1 down)",
    )
    full = [ServerView("a", up=False), ServerView("b", placed=2)]
    assert choose(full, 2) == (
        None,
        "every other Baileys server is at its cap of 2 sessions (1 down)",
    )
    assert choose([ServerView("a", drained=True)], 0) == (None, "every Baileys server is drained")
    # b failed this create (left out of the views): the others are full, not b
    assert choose([ServerView("a", placed=2), ServerView("c", placed=2)], 2, ("b",)) == (
        None,
        "every other Baileys server is at its cap of 2 sessions; b failed this create",
    )
    assert choose([], 2, ("a", "b")) == (None, "no other Baileys server; a, b failed this create")


def test_servers_from_settings() -> None:
    s = load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://10.0.0.1:3000, http://h:3001/api"})
    assert [(x.name, x.url) for x in s.servers] == [
        ("a", "http://10.0.0.1:3000"),
        ("h:3001", "http://h:3001/api"),
    ]
    single = load_settings({"ZAPBUS_BAILEYS_URL": "https://b.example"})
    assert [x.name for x in single.servers] == ["b.example:443"]
    with pytest.raises(ConfigError, match="has a query or fragment"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://h:1/x?key=S"})
    with pytest.raises(ConfigError, match="API_KEYS: server name 'a' appears twice"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://h:1", "ZAPBUS_BAILEYS_API_KEYS": "a=k,a=j"})
    # an empty single URL (compose's ${VAR:-}) is not set
    assert load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://h:1", "ZAPBUS_BAILEYS_URL": ""}).servers
    with pytest.raises(ConfigError, match="both set"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://x:1", "ZAPBUS_BAILEYS_URL": "http://y:1"})
    with pytest.raises(ConfigError, match="appears twice"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://x:1,a=http://y:1"})
    with pytest.raises(ConfigError, match="the same server"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://x:1,b=http://X:1/"})
    with pytest.raises(ConfigError, match="ZAPBUS_BAILEYS_URLS: bad port"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://x:99999"})
    with pytest.raises(ConfigError, match="no name before it"):
        load_settings({"ZAPBUS_BAILEYS_URLS": "=http://x:1"})
    with pytest.raises(ConfigError, match="ZAPBUS_BAILEYS_FAILOVER_AFTER_SECONDS"):
        load_settings({"ZAPBUS_BAILEYS_FAILOVER_AFTER_SECONDS": "-5"})
    ipv6 = load_settings({"ZAPBUS_BAILEYS_URLS": "http://[::1]:3201"})
    assert [x.name for x in ipv6.servers] == ["[::1]:3201"]
    keyed = load_settings(
        {
            "ZAPBUS_BAILEYS_URLS": "a=http://x:1,b=http://y:1",
            "ZAPBUS_BAILEYS_API_KEY": "shared",
            "ZAPBUS_BAILEYS_API_KEYS": "b=own",
        }
    )
    assert [x.api_key for x in keyed.servers] == ["shared", "own"]
    assert "own" not in repr(keyed.servers)
    assert keyed.servers[0].public_url == "http://x:1"
    assert (
        load_settings({"ZAPBUS_BAILEYS_URLS": "u=http://me:pw@h:9/p/"}).servers[0].public_url
        == "http://h:9/p"
    )


async def test_creates_spread_over_the_pool(settings: Settings, sims: Sims) -> None:
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(30)]
        rows = await _wait_all(stack, ids, *LIVE)
        spread = Counter(r["server"] for r in rows)
        assert set(spread) == set(NAMES) and all(9 <= n <= 11 for n in spread.values()), spread
        assert _one_live_each(await sims.all_live(stack.http), rows) is None
        history = await stack.http.get(
            f"{stack.gateway_url}/v1/connections/{ids[0]}/history", headers=stack.auth()
        )
        placed = [
            h for h in (await history.json())["items"] if h["event_type"] == "placement.assigned"
        ]
        assert [h["server"] for h in placed] == [rows[0]["server"]]


async def test_placement_counts_the_sessions_other_apps_hold(
    settings: Settings, sims: Sims
) -> None:
    """Server a holds 12 sessions of another app (its /health says so): zapbus's 30 creates
    even out the servers' totals (42 over 3), so a gets few, even though the whole burst
    is placed between two of its probes."""
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            async with http.post(
                f"{sims.urls['a']}/sessions",
                json={"name": f"other-app-{i}", "webhookUrl": "http://127.0.0.1:9/hook"},
                headers={"X-API-Key": FAST_SIM.api_key},
            ) as r:
                assert r.status < 300, await r.text()
    slow_probes = {**POOL, "baileys_health_interval_seconds": 30.0}
    async with start_stack(settings, None, baileys_urls=sims.spec(), **slow_probes) as stack:

        async def probed() -> bool:
            n = await stack.pool.fetchval("SELECT sessions FROM baileys_servers WHERE name = 'a'")
            return n is not None and n >= 12

        await wait_for("the first probe of a", probed)
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(30)]
        rows = await _wait_all(stack, ids, *LIVE)
        spread = Counter(r["server"] for r in rows)
        totals = {"a": spread["a"] + 12, "b": spread["b"], "c": spread["c"]}
        assert max(totals.values()) - min(totals.values()) <= 2, spread


async def test_a_waha_pool_fetches_each_qr_from_the_server_holding_the_session(
    settings: Settings, waha_sims: Sims
) -> None:
    """WAHA does not push its QR: the webhook service asks for it, and in a pool it must ask
    the server the session was placed on (the webhook URL names it)."""
    async with start_stack(
        settings, None, baileys_urls=waha_sims.spec(), baileys_kind="waha", **POOL
    ) as stack:
        ids = [(await stack.create(f"w{i}"))["id"] for i in range(6)]
        rows = await _wait_all(stack, ids, "qr_ready")
        assert len({r["server"] for r in rows}) == 3
        for row in rows:
            async with stack.http.get(
                f"{waha_sims.urls[row['server']]}/api/{row['session_name']}/auth/qr",
                params={"format": "raw"},
                headers={"X-Api-Key": FAST_SIM.api_key},
            ) as r:
                assert row["qr"] == (await r.json())["value"]
        placed = Counter(r["server"] for r in rows)

        async def counted() -> bool:  # WAHA's count is its session list's length
            found = {
                r["name"]: r["sessions"]
                for r in await stack.pool.fetch("SELECT name, sessions FROM baileys_servers")
            }
            return found == dict(placed)

        await wait_for("each WAHA server's session count", counted)


async def test_a_full_pool_queues_creates_until_room_frees(settings: Settings, sims: Sims) -> None:
    async with start_stack(
        settings, None, baileys_urls=sims.spec(), baileys_max_sessions=5, **POOL
    ) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(20)]

        async def split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
            rows = await _all(stack, ids)
            live = [r for r in rows if r["status"] == "qr_ready"]
            waiting = [
                r
                for r in rows
                if r["status"] == "pending"
                and (r["status_reason"] or "").startswith("waiting for a Baileys server")
            ]
            return (live, waiting) if len(live) == 15 and len(waiting) == 5 else None

        live, waiting = await wait_for("15 live and 5 waiting", split, timeout=30)
        assert Counter(r["server"] for r in live) == {"a": 5, "b": 5, "c": 5}
        assert "at its cap of 5" in waiting[0]["status_reason"]

        async def gauge() -> bool:
            async with stack.http.get(f"{stack.worker_url}/metrics") as r:
                return "zapbus_pool_waiting_creates 5.0" in await r.text()

        await wait_for("the waiting gauge at 5", gauge, timeout=30)
        for row in live[:5]:
            async with stack.http.delete(
                f"{stack.gateway_url}/v1/connections/{row['id']}", headers=stack.auth()
            ) as r:
                assert r.status == 202
        rows = await _wait_all(stack, [w["id"] for w in waiting], *LIVE, timeout=30)
        assert all(r["status_reason"] is None for r in rows)
        counts = Counter(r["server"] for r in await _all(stack, ids) if r["status"] == "qr_ready")
        assert sum(counts.values()) == 15 and max(counts.values()) <= 5, counts


async def test_failover_moves_a_dead_servers_connections_and_cleans_up_on_return(
    settings: Settings, sims: Sims
) -> None:
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(12)]
        rows = await _wait_all(stack, ids, *LIVE)
        on_b = [r["id"] for r in rows if r["server"] == "b"]
        assert on_b
        old_sessions = {r["session_name"] for r in rows if r["server"] == "b"}
        sims.procs["b"].kill()

        async def moved() -> list[dict[str, Any]] | None:
            now = await _all(stack, on_b)
            ok = all(
                r["status"] == "qr_ready" and r["generation"] == 2 and r["server"] in ("a", "c")
                for r in now
            )
            return now if ok else None

        now = await wait_for("b's connections re-placed on a and c", moved, timeout=30)
        assert all(r["reason_code"] == "server_lost" for r in now)
        everyone = await _all(stack, ids)
        assert _one_live_each(await sims.all_live(stack.http), everyone) is None
        items = await _history(stack, on_b[0])
        events = [h for h in items if h["event_type"] == "failover.moved"]
        assert len(events) == 1 and events[0]["reason_code"] == "server_lost"
        assert events[0]["server"] == "b"
        changes = await changes_when(
            stack.settings,
            on_b[0],
            "the move and the new generation's QR on the stream",
            lambda found: [(c.generation, c.status) for c in found[-1:]] == [(2, "qr_ready")],
        )
        (change,) = [c for c in changes if c.cause == "failover.moved"]
        assert change.previous_status == "qr_ready" and change.generation == 2
        assert versions_grow(changes), [(c.cause, c.version) for c in changes]

        # b comes back holding its old sessions: the reconciler deletes every one of them
        sims.procs["b"].start()
        await sims.procs["b"].wait_healthy()
        assert old_sessions <= set(await sims.live(stack.http, "b"))

        async def cleaned() -> bool:
            return not set(await sims.live(stack.http, "b")) & old_sessions

        await wait_for("the superseded sessions deleted from b", cleaned, timeout=30)
        everyone = await _all(stack, ids)
        assert _one_live_each(await sims.all_live(stack.http), everyone) is None
        assert Counter(r["generation"] for r in everyone)[2] == len(on_b)


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history", headers=stack.auth()
    ) as r:
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def test_drain_move_empties_a_server(
    settings: Settings, sims: Sims, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(9)]
        rows = await _wait_all(stack, ids, *LIVE)
        on_a = [r["id"] for r in rows if r["server"] == "a"]
        _cli_env(monkeypatch, stack, sims)
        # the command line, in a thread (it runs its own event loop)
        assert await asyncio.to_thread(cli.main, ["server", "drain", "a", "--move"]) == 0

        async def emptied() -> list[dict[str, Any]] | None:
            now = await _all(stack, ids)
            if any(r["server"] == "a" for r in now) or any(r["status"] != "qr_ready" for r in now):
                return None
            return now if not await sims.live(stack.http, "a") else None

        now = await wait_for("a emptied, its connections live elsewhere", emptied, timeout=40)
        moved = [r for r in now if r["id"] in on_a]
        assert all(r["generation"] == 2 and r["reason_code"] == "server_drained" for r in moved)
        # one at a time: each move only after the one before was live again elsewhere
        steps = []
        for cid in on_a:
            items = await _history(stack, cid)
            (move,) = [h for h in items if h["event_type"] == "drain.moved"]
            live = [h for h in items if h["generation"] == 2 and h["to_status"] == "qr_ready"]
            steps.append((move["recorded_at"], live[0]["recorded_at"]))
        steps.sort()
        for (_, live_at), (next_move_at, _) in itertools.pairwise(steps):
            assert next_move_at >= live_at, steps
        assert _one_live_each(await sims.all_live(stack.http), now) is None
        # a new create never goes to the drained server
        extra = (await stack.create("after"))["id"]
        (late,) = await _wait_all(stack, [extra], *LIVE)
        assert late["server"] in ("b", "c")
        assert await servercli.server_drain(stack.settings, "a", False) == 0
        assert await servercli.server_drain(stack.settings, "nope", True) == 2


async def test_server_list_shows_health_counts_and_drain(
    settings: Settings,
    sims: Sims,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(3)]
        await _wait_all(stack, ids, *LIVE)
        assert await servercli.server_drain(stack.settings, "c", True) == 0
        sims.procs["b"].kill()

        async def listed() -> list[dict[str, Any]] | None:
            capsys.readouterr()
            await servercli.server_list(stack.settings, as_json=True)
            out: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
            by = {s["name"]: s for s in out}
            ok = by["b"]["health"].startswith("down") and by["a"]["health"] == "up"
            return out if ok else None

        out = await wait_for("b seen down", listed, timeout=30)
        by = {s["name"]: s for s in out}
        assert by["c"]["drained"] is True and by["a"]["drained"] is False
        assert by["a"]["url"] == sims.urls["a"] and by["a"]["placed"] == 1
        assert by["a"]["sessions"] == 1

        async def metrics() -> str | None:
            async with stack.http.get(f"{stack.worker_url}/metrics") as r:
                text = await r.text()
            return text if 'zapbus_baileys_server_up{server="b"} 0.0' in text else None

        text = await wait_for("b down in the metrics", metrics, timeout=30)
        assert 'zapbus_baileys_server_drained{server="c"} 1.0' in text
        assert f'zapbus_baileys_server_info{{server="a",url="{sims.urls["a"]}"}} 1.0' in text
        assert 'zapbus_baileys_server_placements{server="a"} 1.0' in text
        # the table form, through the command line (in a thread: it runs its own loop)
        _cli_env(monkeypatch, stack, sims)
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["server", "list"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["NAME", "URL", "HEALTH", "SESSIONS", "PLACED", "CAP", "DRAINED"]
        assert table[3].split()[0] == "c" and table[3].split()[-1] == "yes"


async def test_a_copy_of_a_generation_on_another_server_is_deleted_there(
    settings: Settings, sims: Sims
) -> None:
    """A generation lives on one server: a session of it found on another (made behind
    zapbus's back) is an orphan there, and the placed one stays."""
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        (row,) = await _wait_all(stack, [(await stack.create("one"))["id"]], *LIVE)
        other = next(n for n in NAMES if n != row["server"])
        async with stack.http.post(
            f"{sims.urls[other]}/sessions",
            json={"name": row["session_name"], "webhookUrl": "http://127.0.0.1:9/nowhere"},
            headers={"X-API-Key": FAST_SIM.api_key},
        ) as r:
            assert r.status == 201, await r.text()

        async def copy_gone() -> bool:
            return row["session_name"] not in await sims.live(stack.http, other)

        await wait_for(f"the copy on {other} deleted", copy_gone, timeout=15)
        assert row["session_name"] in await sims.live(stack.http, row["server"])
        _, now = await stack.get(row["id"])
        assert now["status"] == "qr_ready" and now["server"] == row["server"]


@pytest.mark.parametrize("rate", [1.0, 0.5])  # below 1: one move every 2 s, not none
async def test_failover_is_rate_limited(settings: Settings, sims: Sims, rate: float) -> None:
    pool = {**POOL, "baileys_failover_per_second": rate}
    async with start_stack(settings, None, baileys_urls=sims.spec(), **pool) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(9)]
        rows = await _wait_all(stack, ids, *LIVE)
        on_b = [r["id"] for r in rows if r["server"] == "b"]
        assert len(on_b) >= 3
        sims.procs["b"].kill()

        async def moved() -> list[str] | None:
            times = []
            for cid in on_b:
                events = [
                    h for h in await _history(stack, cid) if h["event_type"] == "failover.moved"
                ]
                if not events:
                    return None
                times.append(events[0]["recorded_at"])
            return sorted(times)

        times = await wait_for("b's connections failed over", moved, timeout=30)
        first, last = datetime.fromisoformat(times[0]), datetime.fromisoformat(times[-1])
        # `rate` a second: n moves take (n - 1) / rate seconds at least (less some slack)
        assert (last - first).total_seconds() >= (len(times) - 1) / rate * 0.7, times


async def test_pool_views_put_a_server_back_from_an_outage_on_probation(
    settings: Settings,
) -> None:
    specs = load_settings({"ZAPBUS_BAILEYS_URLS": "a=http://x:1,b=http://y:1,c=http://z:1"}).servers
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        await pool.execute(
            "INSERT INTO baileys_servers (name, url, up, sessions, checked_at, up_since, drained)"
            " VALUES ('a', 'u', true, 7, now(), now() - interval '5 s', false),"
            " ('b', 'u', true, NULL, now() - interval '1 hour', NULL, false),"
            " ('c', 'u', false, 1, now(), NULL, true)"
        )
        now = await pool.fetchval("SELECT now()")
        views = {v.name: v for v in await pool_views(pool, specs, PlacementPolicy(), now)}
        assert views["a"].probation and views["a"].up and views["a"].sessions == 7
        assert views["b"].up is None and not views["b"].probation  # stale: assumed up
        assert views["c"].drained and views["c"].up is False
        later = {
            v.name: v
            for v in await pool_views(pool, specs, PlacementPolicy(rejoin_after_seconds=4), now)
        }
        assert not later["a"].probation
    finally:
        await pool.close()


async def test_failover_waits_while_no_other_server_has_room(
    settings: Settings, sims: Sims, caplog: pytest.LogCaptureFixture
) -> None:
    """Moving a connection nowhere would end its (maybe linked) session for nothing: the dead
    server's connections move only once another server has room for them."""
    async with start_stack(
        settings, None, baileys_urls=sims.spec(), baileys_max_sessions=2, **POOL
    ) as stack:
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(6)]
        rows = await _wait_all(stack, ids, *LIVE)
        on_b = [r["id"] for r in rows if r["server"] == "b"]
        assert len(on_b) == 2
        caplog.set_level(logging.WARNING, logger="zapbus.pool")
        sims.procs["b"].kill()

        async def declined() -> bool:  # past the failover deadline, and nothing moved
            return any("cannot move connections off 'b'" in r.getMessage() for r in caplog.records)

        await wait_for("the failover of b, declined for want of room", declined, timeout=30)
        assert all(r["generation"] == 1 and r["server"] == "b" for r in await _all(stack, on_b))
        for row in [r for r in rows if r["server"] in ("a", "c")][:2]:
            async with stack.http.delete(
                f"{stack.gateway_url}/v1/connections/{row['id']}", headers=stack.auth()
            ) as r:
                assert r.status == 202

        async def moved() -> list[dict[str, Any]] | None:
            now = await _all(stack, on_b)
            done = all(r["generation"] == 2 and r["status"] == "qr_ready" for r in now)
            return now if done else None

        now = await wait_for("b's connections moved once there is room", moved, timeout=20)
        assert all(r["server"] in ("a", "c") and r["reason_code"] == "server_lost" for r in now)


async def test_connections_of_a_server_no_longer_configured_fail_over(
    settings: Settings, sims: Sims
) -> None:
    async with start_stack(settings, None, baileys_urls=sims.spec(), **POOL) as stack:
        (row,) = await _wait_all(stack, [(await stack.create("old"))["id"]], *LIVE)
        # as if it had been placed on a server since taken out of ZAPBUS_BAILEYS_URLS
        await stack.pool.execute(
            "INSERT INTO baileys_servers (name, url, up, checked_at) VALUES"
            " ('retired', 'http://10.9.9.9:3000', true, now())"
        )
        await stack.pool.execute(
            "UPDATE connections SET server = 'retired' WHERE id = $1", uuid.UUID(row["id"])
        )
        await stack.pool.execute(
            "UPDATE placements SET server = 'retired' WHERE connection_id = $1",
            uuid.UUID(row["id"]),
        )

        async def moved() -> dict[str, Any] | None:
            _, now = await stack.get(row["id"])
            ok = now["generation"] == 2 and now["status"] == "qr_ready"
            return now if ok and now["server"] in NAMES else None

        now = await wait_for("the connection moved to a configured server", moved, timeout=20)
        assert now["reason_code"] == "server_lost"

        async def old_gone() -> bool:  # its first session (on a configured one) is deleted
            return row["session_name"] not in await sims.live(stack.http, row["server"])

        await wait_for("the superseded session deleted", old_gone, timeout=15)


async def test_a_create_that_fails_on_one_server_is_placed_on_another(
    settings: Settings, sims: Sims
) -> None:
    """A server that answers its health check but refuses every create: its creates are placed
    again elsewhere (and it takes new ones only when no other server can), nothing fails."""
    async with start_stack(
        settings, None, baileys_urls=sims.spec(), create_max_attempts=2, **POOL
    ) as stack:
        async with stack.http.patch(f"{sims.urls['b']}/_sim/config", json={"fail_rate": 1.0}) as r:
            assert r.status == 200, await r.text()
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(9)]
        rows = await _wait_all(stack, ids, *LIVE, timeout=30)
        assert {r["server"] for r in rows} <= {"a", "c"}, Counter(r["server"] for r in rows)
        assert not await sims.live(stack.http, "b")
        failed_on_b = [
            h
            for cid in ids
            for h in await _history(stack, cid)
            if h["event_type"] == "placement.failed"
        ]
        assert failed_on_b and all(h["server"] == "b" for h in failed_on_b)
        for cid in ids:
            changes = await changes_when(
                stack.settings,
                cid,
                "the QR's change on the stream",
                lambda found: bool(found) and found[-1].status == "qr_ready",
            )
            assert versions_grow(changes), [(c.cause, c.version) for c in changes]
            moved = [c for c in changes if c.cause == "placement.failed"]
            assert all(c.previous_status in ("pending", "creating") for c in moved)
        assert _one_live_each(await sims.all_live(stack.http), rows) is None


async def test_a_create_placed_again_with_no_room_waits_then_proceeds(
    settings: Settings, sims: Sims
) -> None:
    async with start_stack(
        settings,
        None,
        baileys_urls=sims.spec(),
        create_max_attempts=2,
        baileys_max_sessions=1,
        **POOL,
    ) as stack:
        async with stack.http.patch(f"{sims.urls['b']}/_sim/config", json={"fail_rate": 1.0}) as r:
            assert r.status == 200, await r.text()
        ids = [(await stack.create(f"c{i}"))["id"] for i in range(3)]

        async def split() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
            rows = await _all(stack, ids)
            live = [r for r in rows if r["status"] == "qr_ready"]
            waiting = [r for r in rows if "failed this create" in (r["status_reason"] or "")]
            return (live, waiting[0]) if len(live) == 2 and len(waiting) == 1 else None

        live, waiting = await wait_for(
            "two live, one waiting after failing on b", split, timeout=30
        )
        # no server is creating it: it waits in pending, as a create that found no room
        assert (waiting["status"], waiting["server"]) == ("pending", None), waiting
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{live[0]['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202
        rest = [i for i in ids if i != live[0]["id"]]
        rows = await _wait_all(stack, rest, *LIVE, timeout=30)
        assert {r["server"] for r in rows} <= {"a", "c"}
