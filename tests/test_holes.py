"""The five holes of the issue "The server's truth", one test each (each failed on the old main).

The reconciler is switched off here (a sweep an hour), so each test shows the edge-triggered
fix on its own; the reconciler is the backstop, tested in tests/test_reconcile.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import nats

from tests.stack import FAST_SIM, Stack, start_stack, wait_for
from zapbus import dlq
from zapbus.config import Settings
from zapbus.tokens import webhook_token

NO_RECONCILE: dict[str, Any] = {"reconcile_interval_seconds": 3600}


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history",
        headers=stack.auth(),
        params={"limit": "500"},
    ) as r:
        assert r.status == 200
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def _letters(stack: Stack) -> list[dlq.Letter]:
    nc = await nats.connect(stack.settings.nats_url)
    try:
        return await dlq.list_letters(nc.jetstream(), stack.settings.names)
    finally:
        await nc.close()


async def _replay(stack: Stack, seq: int) -> None:
    nc = await nats.connect(stack.settings.nats_url)
    try:
        await dlq.replay(nc.jetstream(), stack.pool, stack.settings.names, seq)
    finally:
        await nc.close()


async def test_1_a_reconnect_cycle_of_identical_bodies_is_projected_every_time(
    settings: Settings,
) -> None:
    async with start_stack(settings, **NO_RECONCILE) as stack:
        connection = await stack.create("cycle")
        await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("POST", f"/_sim/sessions/{connection['session_name']}/scan")
        await stack.wait_status(connection["id"], "connected")
        cid = uuid.UUID(connection["id"])
        token = webhook_token(stack.settings.webhook_secret, cid, 1)
        url = f"{stack.webhook_url}/webhooks/baileys/{cid}/1/{token}"
        close = {
            "event": "session.status",
            "session": connection["session_name"],
            "data": {"status": "close", "statusReason": 428},
        }
        opened = {
            "event": "session.status",
            "session": connection["session_name"],
            "data": {"status": "connected"},
        }
        for body, status in [(close, "reconnecting"), (opened, "connected")] * 2:
            async with stack.http.post(url, json=body) as r:  # no webhook-id: a bare sender
                assert r.status == 202
                assert not (await r.json())["duplicate"]
            await stack.wait_status(connection["id"], status)
        history = await _history(stack, connection["id"])
        moves = [h["to_status"] for h in history if h["applied"]][-4:]
        assert moves == ["reconnecting", "connected", "reconnecting", "connected"]


async def test_2_a_replay_that_fails_again_is_dead_lettered_again_and_in_history(
    settings: Settings,
) -> None:
    failing = msgspec.structs.replace(FAST_SIM, fail_rate=1.0)
    async with start_stack(settings, failing, create_max_attempts=2, **NO_RECONCILE) as stack:
        connection = await stack.create("doomed")
        await stack.wait_status(connection["id"], "failed")
        first = await wait_for("a dead letter", lambda: _letters(stack))
        assert len(first) == 1
        await _replay(stack, first[0].seq)
        await stack.wait_status(connection["id"], "pending", "creating")
        await stack.wait_status(connection["id"], "failed")

        async def again() -> list[dlq.Letter] | None:
            letters = await _letters(stack)
            return letters if letters and letters[0].seq != first[0].seq else None

        second = await wait_for("the replay's own dead letter", again)
        assert len(second) == 1
        history = await _history(stack, connection["id"])
        started = [h for h in history if h["event_type"] == "create.started"]
        assert len(started) == 4  # two attempts per run, both runs recorded
        assert [h["to_status"] for h in history if h["applied"]][-1] == "failed"


async def test_3_a_dead_lettered_delete_can_be_replayed(settings: Settings) -> None:
    async with start_stack(settings, create_max_attempts=2, **NO_RECONCILE) as stack:
        connection = await stack.create("stubborn")
        await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("PATCH", "/_sim/config", json={"delete_fail_rate": 1.0})
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{connection['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202
        letters = await wait_for("the delete's dead letter", lambda: _letters(stack))
        assert letters[0].letter.command is not None
        assert letters[0].letter.command.kind == "delete"
        assert connection["session_name"] in (await stack.sim("GET", "/_sim/stats"))["live"]
        await stack.sim("PATCH", "/_sim/config", json={"delete_fail_rate": 0.0})
        await _replay(stack, letters[0].seq)

        async def gone() -> bool:
            stats = await stack.sim("GET", "/_sim/stats")
            return connection["session_name"] not in stats["live"]

        await wait_for("the replayed delete to remove the session", gone)

        async def untracked() -> bool:  # the worker stops tracking it right after the call
            return bool(await stack.pool.fetchval("SELECT count(*) FROM session_deletes") == 0)

        await wait_for("the delete to be no longer tracked", untracked)


async def test_4_the_watchdog_waits_for_a_create_the_worker_holds(settings: Settings) -> None:
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(2.5, 2.5))
    async with start_stack(
        settings,
        slow,
        baileys_timeout_seconds=6.0,
        ack_wait_seconds=1.5,
        watchdog_deadline_seconds=0.5,
        watchdog_interval_seconds=0.1,
        **NO_RECONCILE,
    ) as stack:
        connection = await stack.create("held")
        ready = await stack.wait_status(connection["id"], "qr_ready", "failed", timeout=20)
        assert ready["status"] == "qr_ready", ready
        stats = await stack.sim("GET", "/_sim/stats")
        assert stats["created"] == {connection["session_name"]: 1}
        history = await _history(stack, connection["id"])
        assert not [h for h in history if h["event_type"].startswith("watchdog.")]


async def test_4_a_create_for_a_row_that_failed_meanwhile_deletes_its_session(
    settings: Settings,
) -> None:
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(1.5, 1.5))
    async with start_stack(settings, slow, **NO_RECONCILE) as stack:
        connection = await stack.create("overtaken")
        await stack.wait_status(connection["id"], "creating")
        # What the old watchdog did to a create still in the worker's hands.
        await stack.pool.execute(
            "UPDATE connections SET status = 'failed', status_reason = 'timeout' WHERE id = $1",
            uuid.UUID(connection["id"]),
        )

        async def made_then_removed() -> bool:
            stats = await stack.sim("GET", "/_sim/stats")
            made = stats["created"].get(connection["session_name"]) == 1
            return made and connection["session_name"] not in stats["live"]

        await wait_for("the session made for a failed row to be deleted", made_then_removed)
        history = await _history(stack, connection["id"])
        assert not [h for h in history if h["event_type"] == "create.succeeded"]


async def test_5_a_timed_out_create_the_server_finished_is_deleted_after_a_delete(
    settings: Settings,
) -> None:
    # The POST times out at 0.5 s; the server creates the session at 1.5 s, after the tenant's
    # delete already met 404. The retry (at ~2 s) is fenced and must remove it.
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(1.5, 1.5))
    async with start_stack(
        settings,
        slow,
        baileys_timeout_seconds=0.5,
        retry_base_seconds=2.0,
        retry_max_seconds=2.0,
        **NO_RECONCILE,
    ) as stack:
        connection = await stack.create("orphaned")

        async def timed_out() -> bool:
            history = await _history(stack, connection["id"])
            return any(h["event_type"] == "create.retrying" for h in history)

        await wait_for("the first POST to time out", timed_out)
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{connection['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202

        async def created_then_removed() -> bool:
            stats = await stack.sim("GET", "/_sim/stats")
            made = stats["created"].get(connection["session_name"]) == 1
            return made and connection["session_name"] not in stats["live"]

        await wait_for("the orphan to be deleted", created_then_removed, timeout=20)


async def test_an_exists_answer_for_a_session_the_server_cannot_show_is_not_a_create(
    settings: Settings,
) -> None:
    """Found by the chaos test: a worker killed mid-create leaves its POST running on the
    server; the redelivered create is told "already exists" and took that as done, and when the
    dead worker's create then failed on the server, the row sat in awaiting_qr with no session
    until the watchdog failed it. "Exists" counts only when the server shows the session."""
    from aiohttp import web

    posts: list[str] = []
    live: set[str] = set()

    async def create(request: web.Request) -> web.Response:
        name = (await request.json())["name"]
        posts.append(name)
        if len(posts) == 1:  # another request is still making it (and will fail)
            return web.json_response({"error": "session already exists"}, status=409)
        live.add(name)
        return web.json_response({"name": name}, status=201)

    async def get(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in live:
            return web.json_response({"name": name, "status": "connecting"})
        return web.json_response({"error": "session not found"}, status=404)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": len(live)})

    app = web.Application()
    app.router.add_post("/sessions", create)
    app.router.add_get("/sessions/{name}", get)
    app.router.add_get("/health", health)
    async with start_stack(settings, sim=None, **NO_RECONCILE) as stack:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", stack.sim_port).start()
        try:
            connection = await stack.create("phantom")
            async def made() -> bool:
                return connection["session_name"] in live

            await wait_for("the session to be made on the server", made, timeout=30)
            row = await stack.wait_status(connection["id"], "awaiting_qr", "failed")
            assert row["status"] == "awaiting_qr", row
            history = await _history(stack, connection["id"])
            retried = [h for h in history if h["event_type"] == "create.retrying"]
            assert retried and "does not show it yet" in retried[0]["reason"], history
        finally:
            await runner.cleanup()
