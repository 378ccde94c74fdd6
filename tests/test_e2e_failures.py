"""End to end: slow and failing Baileys servers, and requests that must be refused."""

from __future__ import annotations

import uuid

import msgspec
import nats

from proto.commands import dead_letter_decoder
from tests.stack import FAST_SIM, Stack, changes_when, start_stack, versions_grow
from zapbus import dlq
from zapbus.config import Settings
from zapbus.tenants import create_tenant
from zapbus.tokens import webhook_token


async def _history(stack: Stack, connection_id: str) -> list[dict[str, object]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history", headers=stack.auth()
    ) as r:
        assert r.status == 200
        items: list[dict[str, object]] = (await r.json())["items"]
        return items


async def test_create_slower_than_worker_timeout_is_retried_and_created_once(
    settings: Settings,
) -> None:
    slow = msgspec.structs.replace(FAST_SIM, create_delay=(1.0, 1.0))
    async with start_stack(settings, slow, baileys_timeout_seconds=0.3) as stack:
        created = await stack.create("slow")
        ready = await stack.wait_status(created["id"], "qr_ready", timeout=20)
        assert ready["attempts"] >= 2
        history = await _history(stack, created["id"])
        retries = [h for h in history if h["event_type"] == "create.retrying"]
        assert retries and "timeout" in str(retries[0]["reason"])
        stats = await stack.sim("GET", "/_sim/stats")
        assert stats["created"] == {created["session_name"]: 1}


async def test_create_against_failing_server_ends_failed_with_reason(settings: Settings) -> None:
    failing = msgspec.structs.replace(FAST_SIM, fail_rate=1.0)
    async with start_stack(settings, failing, create_max_attempts=3) as stack:
        created = await stack.create("doomed")
        failed = await stack.wait_status(created["id"], "failed", timeout=20)
        assert "gave up after 3 attempts" in failed["status_reason"]
        assert "500" in failed["status_reason"]
        assert failed["reason_code"] == "gave_up"
        history = await _history(stack, created["id"])
        assert [h["event_type"] for h in history].count("create.started") == 3
        assert (await stack.sim("GET", "/_sim/stats"))["created"] == {}

        nc = await nats.connect(settings.nats_url)
        try:
            js = nc.jetstream()
            msg = await js.get_last_msg(
                settings.names.dead_letter_stream, settings.names.dead_letter_subject
            )
            letter = dead_letter_decoder.decode(msg.data)
        finally:
            await nc.close()
        assert letter.reason == "exhausted"
        assert letter.deliveries == 3
        assert letter.command is not None and str(letter.command.connection_id) == created["id"]

        # The operator fixes the server and replays the dead letter: the connection recovers.
        await stack.sim("PATCH", "/_sim/config", json={"fail_rate": 0.0})
        nc = await nats.connect(settings.nats_url)
        try:
            letters = await dlq.list_letters(nc.jetstream(), settings.names)
            assert [item.letter.command for item in letters] == [letter.command]
            await dlq.replay(nc.jetstream(), stack.pool, settings.names, letters[0].seq)
            assert await dlq.list_letters(nc.jetstream(), settings.names) == []
        finally:
            await nc.close()
        ready = await stack.wait_status(created["id"], "qr_ready", timeout=20)
        assert ready["generation"] == 1
        # the replay's move back to pending is a change too (webhooks, SSE), as any other
        changes = await changes_when(
            stack.settings,
            created["id"],
            "the replay's change on the stream",
            lambda found: any(c.cause == "dlq.replayed" for c in found),
        )
        replayed = [c for c in changes if c.cause == "dlq.replayed"]
        assert [(c.previous_status, c.status) for c in replayed] == [("failed", "pending")]
        # the create runs again: the reason (and reason code) of the failure it replays is gone
        assert [(c.status_reason, c.reason_code) for c in replayed] == [(None, None)]
        assert versions_grow(changes), [(c.cause, c.version) for c in changes]


async def test_missing_or_wrong_api_key_is_401(stack: Stack) -> None:
    url = f"{stack.gateway_url}/v1/connections"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        async with stack.http.post(url, json={"name": "x"}, headers=headers) as r:
            assert r.status == 401
            assert r.content_type == "application/problem+json"
            assert (await r.json())["type"].endswith("/unauthorized")
    assert await stack.pool.fetchval("SELECT count(*) FROM connections") == 0


async def test_other_tenants_connection_is_404(stack: Stack) -> None:
    mine = await stack.create("mine")
    _, other_key = await create_tenant(stack.pool, "other")
    status, body = await stack.get(mine["id"], key=other_key)
    assert status == 404 and body["type"].endswith("/connection-not-found")
    status, _ = await stack.get(str(uuid.uuid4()))
    assert status == 404
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections", headers=stack.auth(other_key)
    ) as r:
        assert (await r.json())["items"] == []


async def test_webhook_with_wrong_token_is_401_and_changes_nothing(stack: Stack) -> None:
    created = await stack.create("guarded")
    await stack.wait_status(created["id"], "qr_ready")
    before = await stack.get(created["id"])
    body = {"event": "session.status", "data": {"status": "connected"}}
    good = webhook_token(stack.settings.webhook_secret, uuid.UUID(created["id"]), 1)
    wrong_tokens = [
        f"{created['id']}/1/{'A' * len(good)}",
        f"{created['id']}/2/{good}",  # a valid token of another generation
        f"{uuid.uuid4()}/1/{good}",
        f"not-a-uuid/1/{good}",
    ]
    for path in wrong_tokens:
        async with stack.http.post(f"{stack.webhook_url}/webhooks/baileys/{path}", json=body) as r:
            assert r.status == 401, path
            assert r.content_type == "application/problem+json"
    assert await stack.get(created["id"]) == before


async def test_bad_create_bodies_get_clear_4xx(stack: Stack) -> None:
    url = f"{stack.gateway_url}/v1/connections"
    cases: list[tuple[bytes, int]] = [
        (b"{", 400),
        (b"[]", 422),
        (b'{"name": ""}', 422),
        (b'{"name": 5}', 422),
        (b'{"name": "x", "extra": 1}', 422),
        (b'{"name": "' + b"x" * 101 + b'"}', 422),
        (b'{"name": "   "}', 422),
    ]
    for body, expected in cases:
        async with stack.http.post(url, data=body, headers=stack.auth()) as r:
            assert r.status == expected, (body, await r.text())
            assert r.content_type == "application/problem+json"
    assert await stack.pool.fetchval("SELECT count(*) FROM connections") == 0
