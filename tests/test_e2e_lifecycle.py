"""Idempotency, recreate and delete with generation fencing, the watchdog, the breaker."""

from __future__ import annotations

import asyncio
import collections
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web
from nats.js.api import StreamInfo

from proto import headers
from proto.commands import CreateSession, command_encoder
from services.baileys_sim.app import create_app as create_sim
from tests.stack import FAST_SIM, Stack, changes_when, start_stack, wait_for
from zapbus import bus
from zapbus.config import Settings
from zapbus.tokens import session_name, webhook_token


async def _post(stack: Stack, path: str, **kw: Any) -> tuple[int, Any]:
    hdrs = {**stack.auth(), **kw.pop("headers", {})}
    async with stack.http.post(f"{stack.gateway_url}{path}", headers=hdrs, **kw) as r:
        return r.status, await r.json(content_type=None)


async def _get(stack: Stack, path: str) -> tuple[int, Any]:
    async with stack.http.get(f"{stack.gateway_url}{path}", headers=stack.auth()) as r:
        return r.status, await r.json(content_type=None)


async def _command_stream(stack: Stack) -> StreamInfo:
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test-probe")
    try:
        return await nc.jetstream().stream_info(stack.settings.names.commands_stream)
    finally:
        await nc.close()


async def _commands_settled(stack: Stack) -> bool:
    """True once the worker's consumer has nothing pending or unacknowledged."""
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test-probe")
    try:
        info = await nc.jetstream().consumer_info(
            stack.settings.names.commands_stream, stack.settings.names.worker_consumer
        )
    finally:
        await nc.close()
    outbox = await stack.pool.fetchval("SELECT count(*) FROM outbox")
    return info.num_pending == 0 and info.num_ack_pending == 0 and outbox == 0


async def test_same_idempotency_key_gives_one_connection(stack: Stack) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = await stack.create("sales", headers=key)
    second = await stack.create("sales", headers=key)
    assert first["id"] == second["id"]
    status, body = await _post(
        stack, "/v1/connections", json={"name": "other"}, headers={**stack.auth(), **key}
    )
    assert status == 422 and body["type"].endswith("/idempotency-key-reused")
    assert await stack.pool.fetchval("SELECT count(*) FROM connections") == 1
    await stack.wait_status(first["id"], "qr_ready")
    assert (
        await stack.pool.fetchval(
            "SELECT count(*) FROM connection_events WHERE event_type = 'create.started'"
        )
        == 1
    )

    # At once: so that the requests race inside Postgres, every pooled connection is opened
    # first (the pool grows on demand, and opening one takes longer than a create).
    await asyncio.gather(*(_get(stack, "/v1/connections") for _ in range(20)))
    same = await asyncio.gather(
        *(
            _post(
                stack, "/v1/connections", json={"name": "race"}, headers={"Idempotency-Key": "r1"}
            )
            for _ in range(20)
        )
    )
    assert [status for status, _ in same] == [202] * 20, same
    assert len({body["id"] for _, body in same}) == 1, same
    # The same key with different bodies at once: one wins, every other one is a 422.
    different = await asyncio.gather(
        *(
            _post(
                stack,
                "/v1/connections",
                json={"name": f"race-{i}"},
                headers={"Idempotency-Key": "r2"},
            )
            for i in range(20)
        )
    )
    by_status = collections.Counter(status for status, _ in different)
    assert by_status == {202: 1, 422: 19}, different
    assert all(b["type"].endswith("/idempotency-key-reused") for s, b in different if s == 422)
    won = next(b for s, b in different if s == 202)
    rows = await stack.pool.fetch(
        "SELECT id, name, session_name, idempotency_key FROM connections ORDER BY created_at"
    )
    assert [(str(r["id"]), r["name"], r["idempotency_key"]) for r in rows] == [
        (first["id"], "sales", "order-42"),
        (same[0][1]["id"], "race", "r1"),
        (won["id"], won["name"], "r2"),
    ]
    for connection_id in (same[0][1]["id"], won["id"]):
        await stack.wait_status(connection_id, "qr_ready")
    await wait_for("the commands to settle", lambda: _commands_settled(stack))
    # One create command each (JetStream stored three in all), one session each.
    info = await _command_stream(stack)
    assert info.state.last_seq == 3
    stats = await stack.sim("GET", "/_sim/stats")
    assert stats["created"] == {r["session_name"]: 1 for r in rows}


async def test_recreate_fences_old_generation_commands_and_webhooks(stack: Stack) -> None:
    created = await stack.create("fenced")
    cid = uuid.UUID(created["id"])
    gen1 = created["session_name"]
    await stack.wait_status(created["id"], "qr_ready")

    status, recreated = await _post(stack, f"/v1/connections/{cid}/recreate")
    assert status == 202
    assert recreated["generation"] == 2 and recreated["status"] == "pending"
    gen2 = recreated["session_name"]
    assert gen2 == session_name(cid, 2) != gen1
    ready = await stack.wait_status(created["id"], "qr_ready")
    assert ready["generation"] == 2

    async def gen1_gone() -> bool:
        return gen1 not in (await stack.sim("GET", "/_sim/stats"))["live"]

    await wait_for("generation 1's Baileys session to be deleted", gen1_gone)

    # A late create command of generation 1 must not create its session again.
    late = CreateSession(
        command_id=uuid.uuid4(),
        connection_id=cid,
        tenant_id=stack.tenant_id,
        generation=1,
        session_name=gen1,
        requested_at=datetime.now(UTC),
    )
    nc = await bus.connect(stack.settings.nats_url, "zapbus-test")
    try:
        await nc.jetstream().publish(
            stack.settings.names.command_subject("create"),
            command_encoder.encode(late),
            headers={headers.MSG_ID: str(late.command_id)},
        )
    finally:
        await nc.close()
    await wait_for("the late command to be handled", lambda: _commands_settled(stack))

    # A late webhook of generation 1 (valid token for generation 1) must not change the row.
    before = await stack.get(created["id"])
    token = webhook_token(stack.settings.webhook_secret, cid, 1)
    async with stack.http.post(
        f"{stack.webhook_url}/webhooks/baileys/{cid}/1/{token}",
        json={"event": "session.status", "session": gen1, "data": {"status": "connected"}},
    ) as r:
        assert r.status == 202

    async def late_webhook_recorded() -> bool:
        return bool(
            await stack.pool.fetchval(
                "SELECT count(*) FROM connection_events WHERE connection_id = $1 AND generation = 1"
                " AND event_type = 'status.reported' AND NOT applied",
                cid,
            )
        )

    await wait_for("the late webhook in history, not applied", late_webhook_recorded)
    assert await stack.get(created["id"]) == before
    stats = await stack.sim("GET", "/_sim/stats")
    assert stats["created"] == {gen1: 1, gen2: 1}
    assert stats["live"] == [gen2]


async def test_delete_removes_the_baileys_session(stack: Stack) -> None:
    created = await stack.create("bye")
    await stack.wait_status(created["id"], "qr_ready")
    async with stack.http.delete(
        f"{stack.gateway_url}/v1/connections/{created['id']}", headers=stack.auth()
    ) as r:
        assert r.status == 202
        assert (await r.json())["status"] == "deleted"

    async def gone() -> bool:
        return created["session_name"] not in (await stack.sim("GET", "/_sim/stats"))["live"]

    await wait_for("the Baileys session to be deleted", gone)
    status, body = await _post(stack, f"/v1/connections/{created['id']}/recreate")
    assert status == 409 and body["type"].endswith("/connection-deleted")
    assert (await stack.get(created["id"]))[1]["status"] == "deleted"


async def test_watchdog_redrives_a_command_the_bus_lost(settings: Settings) -> None:
    fast = {"watchdog_deadline_seconds": 0.5, "watchdog_interval_seconds": 0.2}
    async with start_stack(settings, FAST_SIM, **fast) as stack:
        # A connection whose create command was committed but never reached JetStream:
        # written straight to Postgres with no outbox row, as after a host crash.
        cid, command_id = uuid.uuid4(), uuid.uuid4()
        await stack.pool.execute(
            "INSERT INTO connections (id, tenant_id, name, session_name, status, command_id,"
            " status_changed_at) VALUES ($1, $2, 'lost', $3, 'pending', $4, $5)",
            cid,
            stack.tenant_id,
            session_name(cid, 1),
            command_id,
            datetime.now(UTC) - timedelta(minutes=5),
        )
        ready = await stack.wait_status(str(cid), "qr_ready")
        assert ready["attempts"] == 1
        events = await stack.pool.fetch(
            "SELECT event_type, command_id FROM connection_events WHERE connection_id = $1"
            " ORDER BY seq",
            cid,
        )
        assert events[0]["event_type"] == "watchdog.redriven"
        assert {e["command_id"] for e in events if e["command_id"]} == {command_id}


async def test_watchdog_fails_a_connection_stuck_awaiting_qr(settings: Settings) -> None:
    fast = {"watchdog_deadline_seconds": 0.5, "watchdog_interval_seconds": 0.2}
    async with start_stack(settings, FAST_SIM, **fast) as stack:
        cid = uuid.uuid4()
        await stack.pool.execute(
            "INSERT INTO connections (id, tenant_id, name, session_name, status,"
            " status_changed_at) VALUES ($1, $2, 'silent', $3, 'awaiting_qr', $4)",
            cid,
            stack.tenant_id,
            session_name(cid, 1),
            datetime.now(UTC) - timedelta(minutes=5),
        )
        failed = await stack.wait_status(str(cid), "failed")
        assert failed["status_reason"].startswith("timeout: no progress in awaiting_qr")
        (change,) = await changes_when(
            stack.settings, str(cid), "the time-out's change on the stream", bool
        )
        assert (change.cause, change.previous_status) == ("watchdog.timeout", "awaiting_qr")
        assert change.version == failed["version"] == 2  # the row's first change


async def test_breaker_makes_commands_wait_for_a_down_server(settings: Settings) -> None:
    """With 2 attempts and the server down, a create would fail; with the breaker it waits."""
    async with start_stack(
        settings, None, create_max_attempts=2, breaker_threshold=1, breaker_probe_seconds=0.2
    ) as stack:
        created = await stack.create("patient")

        async def breaker_open() -> bool:
            async with stack.http.get(f"{stack.worker_url}/metrics") as r:
                text = await r.text()
            return any(
                line.startswith("zapbus_worker_breaker_open{") and line.endswith(" 1.0")
                for line in text.splitlines()
            )

        await wait_for("the breaker to open", breaker_open)
        # a create placed while its server does not answer waits pending, not "creating"
        later = await stack.create("placed while down")

        async def placed() -> Any:
            _, body = await stack.get(later["id"])
            return body if body["server"] else None

        assert (await wait_for("the second create placed", placed))["status"] == "pending"
        sim = msgspec.structs.replace(FAST_SIM, port=stack.sim_port)
        runner = web.AppRunner(create_sim(sim))
        await runner.setup()
        back_at = datetime.now(UTC)
        try:
            await web.TCPSite(runner, "127.0.0.1", stack.sim_port).start()
            ready = await stack.wait_status(created["id"], "qr_ready", timeout=20)
            assert ready["attempts"] == 2
            await stack.wait_status(later["id"], "qr_ready", timeout=20)
        finally:
            await runner.cleanup()
        async with stack.http.get(
            f"{stack.gateway_url}/v1/connections/{later['id']}/history", headers=stack.auth()
        ) as r:
            started = [
                datetime.fromisoformat(h["occurred_at"])
                for h in (await r.json())["items"]
                if h["event_type"] == "create.started"
            ]
        assert started and min(started) > back_at, (started, back_at)


async def test_a_delete_the_server_answers_404_says_the_session_was_already_gone(
    settings: Settings,
) -> None:
    """Issue 19 #5: the server lost the session (a restart), so its delete answers 404: the
    delete is done, and history says the session was already gone, not that it was removed."""
    async with start_stack(settings, reconcile_interval_seconds=3600) as stack:
        lost, kept = await stack.create("lost"), await stack.create("kept")
        for connection in (lost, kept):
            await stack.wait_status(connection["id"], "qr_ready")
        await stack.sim("POST", "/_sim/restart")  # both sessions gone, silently
        await _post(stack, f"/v1/connections/{kept['id']}/recreate")
        await stack.wait_status(kept["id"], "qr_ready")  # generation 2 is on the server
        for connection in (kept, lost):
            async with stack.http.delete(
                f"{stack.gateway_url}/v1/connections/{connection['id']}", headers=stack.auth()
            ) as r:
                assert r.status == 202

        async def deleted(connection: dict[str, Any], generation: int) -> Any:
            _, body = await _get(stack, f"/v1/connections/{connection['id']}/history")
            done = [
                h["reason"]
                for h in body["items"]
                if h["event_type"] == "session.deleted" and h["generation"] == generation
            ]
            return done or None

        assert await wait_for("the lost one's delete", lambda: deleted(lost, 1)) == [
            "session already gone from the server"
        ]
        assert await wait_for("the kept one's delete", lambda: deleted(kept, 2)) == [
            "session removed from the server"
        ]
