"""The reconciler end to end: each kind of drift repaired against the simulator's truth.

The interval is set low (0.2 s) and the grace short, so the two-sweep rule and the grace period
are exercised without long waits. The simulator's ``/_sim/stats`` is the ground truth.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import pytest
from aiohttp import web

from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from services.session_worker import reconcile_command
from tests.stack import FAST_SIM, Stack, changes_when, serve, start_stack, versions_grow, wait_for
from zapbus.config import Settings
from zapbus.tokens import webhook_url
from zapbus.tools.localinfra import free_port

FAST_RECONCILE: dict[str, Any] = {
    "reconcile_interval_seconds": 0.2,
    "reconcile_grace_seconds": 0.5,
}


async def _live(stack: Stack) -> list[str]:
    live: list[str] = (await stack.sim("GET", "/_sim/stats"))["live"]
    return live


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history", headers=stack.auth()
    ) as r:
        assert r.status == 200
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def _plant(stack: Stack, connection: dict[str, Any], generation: int, name: str) -> None:
    """Create a session on the simulator behind zapbus's back (a late create finishing)."""
    url = webhook_url(
        stack.settings.webhook_public_url,
        stack.settings.webhook_secret,
        uuid.UUID(connection["id"]),
        generation,
    )
    async with stack.http.post(
        f"{stack.sim_url}/sessions",
        json={"name": name, "webhookUrl": url},
        headers={"X-API-Key": FAST_SIM.api_key},
    ) as r:
        assert r.status == 201, await r.text()


async def _gone(stack: Stack, name: str) -> None:
    async def gone() -> bool:
        return name not in await _live(stack)

    await wait_for(f"session {name} to be deleted from the server", gone)


async def test_orphans_of_deleted_and_superseded_generations_are_deleted(
    settings: Settings,
) -> None:
    async with start_stack(settings, **FAST_RECONCILE) as stack:
        deleted = await stack.create("deleted")
        await stack.wait_status(deleted["id"], "qr_ready")
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{deleted['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202
        await _gone(stack, deleted["session_name"])
        await _plant(stack, deleted, 1, deleted["session_name"])

        moved = await stack.create("moved")
        await stack.wait_status(moved["id"], "qr_ready")
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections/{moved['id']}/recreate", headers=stack.auth()
        ) as r:
            assert r.status == 202
            new_name = (await r.json())["session_name"]
        await _gone(stack, moved["session_name"])
        await _plant(stack, moved, 1, moved["session_name"])

        await _gone(stack, deleted["session_name"])
        await _gone(stack, moved["session_name"])
        assert new_name in await _live(stack)
        for connection in (deleted, moved):
            history = await _history(stack, connection["id"])
            assert any(h["event_type"] == "reconcile.session_deleted" for h in history)


async def test_a_lost_session_is_created_again_and_the_row_says_so(settings: Settings) -> None:
    async with start_stack(settings, **FAST_RECONCILE) as stack:
        connection = await stack.create("lost")
        await stack.wait_status(connection["id"], "qr_ready")
        lost = (await stack.sim("POST", "/_sim/restart"))["data"]["lost"]
        assert lost == [connection["session_name"]]

        await stack.wait_status(connection["id"], "reconnecting")
        await stack.wait_status(connection["id"], "qr_ready")
        stats = await stack.sim("GET", "/_sim/stats")
        assert stats["created"][connection["session_name"]] == 2
        assert stats["live"] == [connection["session_name"]]
        history = await _history(stack, connection["id"])
        recreated = [h for h in history if h["event_type"] == "reconcile.recreated"]
        assert len(recreated) == 1
        assert recreated[0]["reason"] == "session lost on server"
        assert recreated[0]["to_status"] == "reconnecting"
        _, body = await stack.get(connection["id"])
        assert body["generation"] == 1
        changes = await changes_when(
            stack.settings,
            connection["id"],
            "the re-create's change on the stream",
            lambda found: any(c.cause == "reconcile.recreated" for c in found),
        )
        (change,) = [c for c in changes if c.cause == "reconcile.recreated"]
        assert (change.previous_status, change.status) == ("qr_ready", "reconnecting")
        assert versions_grow(changes) and body["version"] >= changes[-1].version


async def test_a_session_lost_right_after_its_create_is_created_again_within_5_s(
    settings: Settings,
) -> None:
    """Issue 19 #13: with a 1 s interval and 2 s grace, a session the server loses is created
    again within ~5 s of the loss, timed on the simulator's own record of the create. The
    default ack_wait (30 s) makes the worker's hold on a create 30 s long; a hold that was not
    released when the create ended kept the row "held" and the re-create ~20 s late."""
    async with start_stack(
        settings, reconcile_interval_seconds=1.0, reconcile_grace_seconds=2.0, ack_wait_seconds=30.0
    ) as stack:
        connections = [await stack.create(f"lost-{i}") for i in range(3)]
        for connection in connections:
            await stack.wait_status(connection["id"], "qr_ready")
        lost_at = time.time()
        lost = (await stack.sim("POST", "/_sim/restart"))["data"]["lost"]
        assert sorted(lost) == sorted(c["session_name"] for c in connections)

        async def recreated() -> dict[str, float] | None:
            stats = await stack.sim("GET", "/_sim/stats")
            times = {n: t[-1] for n, t in stats["create_requested_at"].items() if len(t) >= 2}
            return times if len(times) == len(connections) else None

        times = await wait_for("every lost session to be created again", recreated, timeout=60)
        late = max(times.values()) - lost_at
        # 5 s is the bound; the margin is for a loaded 2-core machine (the bug: 20-30 s)
        assert late < 5.0 + 5.0, f"re-created {late:.1f} s after the loss"


async def test_a_session_lost_too_often_fails(settings: Settings) -> None:
    async with start_stack(settings, **FAST_RECONCILE, reconcile_max_recreates=1) as stack:
        connection = await stack.create("flaky")
        await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("POST", "/_sim/restart")
        await stack.wait_status(connection["id"], "reconnecting")
        await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("POST", "/_sim/restart")
        failed = await stack.wait_status(connection["id"], "failed")
        assert failed["status_reason"].startswith("session lost on server")
        assert await _live(stack) == []


async def test_a_state_the_row_missed_is_reported_through_the_projector(
    settings: Settings,
) -> None:
    async with start_stack(settings, **FAST_RECONCILE) as stack:
        connection = await stack.create("silent")
        await stack.wait_status(connection["id"], "qr_ready")
        # The phone scans, but the webhooks saying so are lost.
        await stack.sim("POST", f"/_sim/sessions/{connection['session_name']}/scan?silent=1")
        await stack.wait_status(connection["id"], "connected")
        history = await _history(stack, connection["id"])
        observed = [h for h in history if h["event_type"] == "reconcile.status"]
        assert observed and observed[-1]["applied"] and observed[-1]["to_status"] == "connected"


async def test_unknown_sessions_are_counted_and_deleted_only_when_allowed(
    settings: Settings,
) -> None:
    stranger = f"zb_{uuid.uuid4().hex}_g1"
    foreign = "someone-elses-session"
    for allowed in (False, True):
        async with start_stack(
            settings, **FAST_RECONCILE, reconcile_delete_unknown=allowed
        ) as stack:
            for name in (stranger, foreign):
                async with stack.http.post(
                    f"{stack.sim_url}/sessions",
                    json={"name": name, "webhookUrl": "http://127.0.0.1:9/nowhere"},
                    headers={"X-API-Key": FAST_SIM.api_key},
                ) as r:
                    assert r.status == 201

            async def counted(stack: Stack = stack) -> bool:
                async with stack.http.get(f"{stack.worker_url}/metrics") as r:
                    text = await r.text()
                return 'zapbus_reconcile_drift_found_total{kind="unknown"} 0.0' not in text

            await wait_for("the unknown session to be counted", counted)
            if allowed:
                await _gone(stack, stranger)
            else:
                await wait_for("two more sweeps", counted)  # and it is still there:
                assert stranger in await _live(stack)
            assert foreign in await _live(stack)  # not named like ours: never touched


async def test_without_a_list_route_each_wanted_session_is_asked_for(settings: Settings) -> None:
    sim = msgspec.structs.replace(FAST_SIM, list_route=False)
    async with start_stack(settings, sim, **FAST_RECONCILE) as stack:
        connection = await stack.create("nolist")
        await stack.wait_status(connection["id"], "qr_ready")
        async with stack.http.get(
            f"{stack.sim_url}/sessions", headers={"X-API-Key": sim.api_key}
        ) as r:
            assert r.status == 404
        await stack.sim("POST", "/_sim/restart")
        await stack.wait_status(connection["id"], "reconnecting")
        await stack.wait_status(connection["id"], "qr_ready")
        assert (await stack.sim("GET", "/_sim/stats"))["created"][connection["session_name"]] == 2


async def test_a_list_item_that_cannot_be_read_is_never_counted_lost(settings: Settings) -> None:
    """Issue 19 #12: the list route names the wanted session in a shape zapbus cannot read
    (in front of the simulator, a server that answers its list so). The list is then not
    complete: the session is asked for by name and found, never judged lost and re-created."""
    sim_port = free_port()
    sim_runner = await serve(create_sim(msgspec.structs.replace(FAST_SIM, port=sim_port)), sim_port)
    sim_url = f"http://127.0.0.1:{sim_port}"
    listed = 0

    async def forward(request: web.Request) -> web.Response:
        nonlocal listed
        async with stack.http.request(
            request.method,
            sim_url + request.path_qs,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        ) as r:
            body = await r.read()
            if request.method == "GET" and request.path == "/sessions" and r.status == 200:
                doc = msgspec.json.decode(body)
                # the same sessions, each named under a key no dialect reads
                doc["data"] = [{"sessionName": i["name"]} for i in doc["data"]]
                body = msgspec.json.encode(doc)
                listed += 1
            return web.Response(body=body, status=r.status, content_type=r.content_type)

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", forward)
    try:
        async with start_stack(settings, None, **FAST_RECONCILE) as stack:
            front = await serve(proxy, stack.sim_port)
            try:
                connection = await stack.create("odd-list")
                await stack.wait_status(connection["id"], "qr_ready")
                seen = listed

                async def sweeps() -> bool:
                    return listed >= seen + 4

                await wait_for("four sweeps of the odd list", sweeps, timeout=30)
                stats = await stack.sim("GET", "/_sim/stats")
                assert stats["created"] == {connection["session_name"]: 1}
                _, row = await stack.get(connection["id"])
                assert row["status"] == "qr_ready"
                history = await _history(stack, connection["id"])
                assert not [h for h in history if h["event_type"].startswith("reconcile.")]
            finally:
                await front.cleanup()
    finally:
        await sim_runner.cleanup()


async def test_cli_dry_run_shows_the_drift_then_a_run_repairs_it(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # The loop sweeps rarely here, so only the command acts.
    sim: SimConfig = FAST_SIM
    async with start_stack(settings, sim, reconcile_interval_seconds=3600) as stack:
        connection = await stack.create("cli")
        await stack.wait_status(connection["id"], "qr_ready")
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{connection['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202
        await _gone(stack, connection["session_name"])
        await _plant(stack, connection, 1, connection["session_name"])
        stranger = f"zb_{uuid.uuid4().hex}_g3"
        async with stack.http.post(
            f"{stack.sim_url}/sessions",
            json={"name": stranger, "webhookUrl": "http://127.0.0.1:9/x"},
            headers={"X-API-Key": sim.api_key},
        ) as r:
            assert r.status == 201

        assert await reconcile_command.reconcile(stack.settings, dry_run=True) == 0
        out = capsys.readouterr().out
        lines = {line.split()[1]: line for line in out.splitlines()[1:-1]}
        assert lines[connection["session_name"]].split()[0] == "orphan"
        assert "would delete" in lines[connection["session_name"]]
        assert lines[stranger].split()[0] == "unknown"
        assert "(dry run: nothing repaired)" in out
        assert connection["session_name"] in await _live(stack)

        assert await reconcile_command.reconcile(stack.settings, dry_run=False) == 0
        await _gone(stack, connection["session_name"])
        assert stranger in await _live(stack)
