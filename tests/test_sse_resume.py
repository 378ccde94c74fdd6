"""SSE: a resume the stream cannot answer for starts from the row, never from silence; at most
ZAPBUS_SSE_MAX_STREAMS_PER_TENANT open streams per tenant on a replica, and of those
ZAPBUS_SSE_MAX_STREAMS_PER_CLIENT_TOKEN per connection with client tokens; a client that went
away frees its slot within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proto.changes import ConnectionChanged, change_encoder
from proto.events import CreateStarted, SessionCreated
from proto.names import Names
from services.gateway.app import create_app as create_gateway
from services.gateway.live import READ_LIMIT
from services.projector.store import Applied, project
from tests.stack import serve, wait_for
from tests.test_frontend_api import sse_events
from zapbus.config import Settings
from zapbus.connection.machine import QrPolicy
from zapbus.runtime import js_key, pool_key, settings_key
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import free_port

Client = TestClient[Any, Any]
WAIT = 10.0  # for any one expected event


@pytest.fixture
async def gateway(settings: Settings, aiohttp_client: Any) -> Client:
    client: Client = await aiohttp_client(create_gateway(settings))
    return client


async def _tenant_key(client: Client, name: str = "sse") -> str:
    _, key = await create_tenant(client.app[pool_key], f"{name}-{uuid.uuid4().hex[:6]}")
    return key


async def _connection(client: Client, key: str) -> str:
    """A new connection whose own change (create.requested) is already on the stream."""
    auth = {"Authorization": f"Bearer {key}"}
    async with client.post("/v1/connections", json={"name": "live"}, headers=auth) as r:
        assert r.status == 202, await r.text()
        cid = str((await r.json())["id"])
    await wait_for("the create change on the stream", lambda: _last_seq(client, cid))
    return cid


def _names(client: Client) -> Names:
    names: Names = client.app[settings_key].names
    return names


async def _last_seq(client: Client, cid: str) -> int:
    js = client.app[js_key]
    names = _names(client)
    try:
        msg = await js.get_last_msg(names.changes_stream, names.change_subject(cid))
    except Exception:
        return 0
    return int(msg.seq or 0)


async def _publish(client: Client, cid: str, cause: str) -> int:
    """Publish a change of ``cid`` as the projector would; its stream sequence."""
    change = ConnectionChanged(
        connection_id=uuid.UUID(cid),
        generation=1,
        status="pending",
        status_reason=None,
        qr=None,
        qr_seq=0,
        qr_expires_at=None,
        cause=cause,
        changed_at=datetime.now(UTC),
    )
    ack = await client.app[js_key].publish(
        _names(client).change_subject(cid), change_encoder.encode(change)
    )
    return int(ack.seq)


async def _next(events: AsyncIterator[dict[str, Any]], what: str) -> dict[str, Any]:
    try:
        async with asyncio.timeout(WAIT):
            return await anext(events)
    except TimeoutError:
        raise AssertionError(f"no event within {WAIT}s: expected {what}") from None


async def _resume_starts_with_snapshot_then_live(
    client: Client, key: str, cid: str, last_event_id: int
) -> None:
    headers = {"Authorization": f"Bearer {key}", "Last-Event-ID": str(last_event_id)}
    async with client.get(f"/v1/connections/{cid}/events", headers=headers) as r:
        assert r.status == 200
        events = sse_events(r)
        first = await _next(events, "the snapshot")
        assert first["data"]["cause"] == "snapshot", first
        assert first["data"]["status"] == "pending"
        seq = await _publish(client, cid, "test.live")
        live = await _next(events, "the live change")
        assert live["data"]["cause"] == "test.live" and int(live["id"]) == seq


async def test_resume_beyond_the_last_sequence_gets_the_snapshot_then_live(
    gateway: Client,
) -> None:
    key = await _tenant_key(gateway)
    cid = await _connection(gateway, key)
    beyond = await _last_seq(gateway, cid) + 1000  # e.g. an id from a stream since recreated
    await _resume_starts_with_snapshot_then_live(gateway, key, cid, beyond)


async def test_resume_older_than_the_first_sequence_gets_the_snapshot_then_live(
    gateway: Client,
) -> None:
    key = await _tenant_key(gateway)
    cid = await _connection(gateway, key)
    old = await _publish(gateway, cid, "test.old")
    await _publish(gateway, cid, "test.old")
    await gateway.app[js_key].purge_stream(_names(gateway).changes_stream)
    await _resume_starts_with_snapshot_then_live(gateway, key, cid, old - 1)


async def test_resume_with_more_missed_than_one_read_gets_the_snapshot_then_live(
    gateway: Client,
) -> None:
    key = await _tenant_key(gateway)
    cid = await _connection(gateway, key)
    seen = await _last_seq(gateway, cid)
    for _ in range(READ_LIMIT + 1):
        await _publish(gateway, cid, "test.missed")
    await _resume_starts_with_snapshot_then_live(gateway, key, cid, seen)


async def test_resume_within_the_stream_replays_what_was_missed(gateway: Client) -> None:
    key = await _tenant_key(gateway)
    cid = await _connection(gateway, key)
    seen = await _last_seq(gateway, cid)
    missed = [await _publish(gateway, cid, "test.missed") for _ in range(3)]
    headers = {"Authorization": f"Bearer {key}", "Last-Event-ID": str(seen)}
    async with gateway.get(f"/v1/connections/{cid}/events", headers=headers) as r:
        events = sse_events(r)
        got = [await _next(events, "a missed change") for _ in missed]
    assert [int(e["id"]) for e in got] == missed
    assert {e["data"]["cause"] for e in got} == {"test.missed"}


async def test_open_streams_are_capped_per_tenant(settings: Settings, aiohttp_client: Any) -> None:
    limited = msgspec.structs.replace(settings, sse_max_streams_per_tenant=2)
    client: Client = await aiohttp_client(create_gateway(limited))
    key, other = await _tenant_key(client), await _tenant_key(client, "other")
    cid = await _connection(client, key)
    other_cid = await _connection(client, other)
    url = f"/v1/connections/{cid}/events"
    auth = {"Authorization": f"Bearer {key}"}
    first = await client.get(url, headers=auth)
    second = await client.get(url, headers=auth)
    try:
        for stream in (first, second):
            assert stream.status == 200
            await _next(sse_events(stream), "the snapshot")
        async with client.get(url, headers=auth) as r:
            assert r.status == 429
            assert r.content_type == "application/problem+json"
            body = await r.json(content_type=None)
            assert body["type"].endswith("/too-many-streams") and body["status"] == 429
            assert int(r.headers["Retry-After"]) > 0
        # the limit is per tenant: another tenant still gets its stream
        other_auth = {"Authorization": f"Bearer {other}"}
        async with client.get(f"/v1/connections/{other_cid}/events", headers=other_auth) as r:
            assert r.status == 200
    finally:
        first.close()
    # The closed stream's slot is freed once the server notices (at its next write).
    await _publish(client, cid, "test.wake")

    async def admitted() -> bool:
        async with client.get(url, headers=auth) as r:
            return r.status == 200

    try:
        await wait_for("a slot freed by the closed stream", admitted, timeout=WAIT, every=0.1)
    finally:
        second.close()


async def test_a_change_committed_after_the_snapshot_with_an_earlier_time_is_not_dropped(
    gateway: Client,
) -> None:
    """A change's time is its transaction's start: transaction A starts, B changes the row
    and commits, the SSE snapshot is read, then A changes the row and commits. A's change is
    newer than the snapshot but carries an earlier time; the client must get it."""
    key = await _tenant_key(gateway)
    cid = await _connection(gateway, key)
    pool, names, policy = gateway.app[pool_key], _names(gateway), QrPolicy()
    common = {"connection_id": uuid.UUID(cid), "generation": 1, "occurred_at": datetime.now(UTC)}
    started = CreateStarted(event_id=uuid.uuid4(), attempt=1, **common)  # type: ignore[arg-type]
    created = SessionCreated(event_id=uuid.uuid4(), attempt=1, **common)  # type: ignore[arg-type]
    url, auth = f"/v1/connections/{cid}/events", {"Authorization": f"Bearer {key}"}
    async with pool.acquire() as a:
        async with a.transaction():
            a_began = await a.fetchval("SELECT now()")  # A's time: its start
            async with pool.acquire() as b, b.transaction():  # B: pending -> creating
                assert _applied(await project(b, [started], policy, names))
            stream = await gateway.get(url, headers=auth)
            events = sse_events(stream)
            snapshot = await _next(events, "the snapshot")
            # A: creating -> awaiting_qr, committed after the snapshot was read
            assert _applied(await project(a, [created], policy, names))
    try:
        got = await _next(events, "A's change")
        while got["data"]["status"] == "creating":  # B's own change may come after the snapshot
            got = await _next(events, "A's change")
    finally:
        stream.close()
    assert snapshot["data"]["cause"] == "snapshot"
    assert snapshot["data"]["status"] == "creating"  # B's change is in the snapshot
    assert got["data"]["status"] == "awaiting_qr" and got["data"]["cause"] == "create.succeeded"
    # by the clock A's change is older than the snapshot; by the version it is newer
    assert datetime.fromisoformat(got["data"]["changed_at"]) == a_began
    assert a_began < datetime.fromisoformat(snapshot["data"]["changed_at"])
    assert got["data"]["version"] == snapshot["data"]["version"] + 1 == 3
    async with gateway.get(f"/v1/connections/{cid}", headers=auth) as r:
        assert (await r.json())["version"] == 3  # the resource says it too


def _applied(results: list[Applied]) -> bool:
    return all(r.outcome is not None and r.outcome.applied for r in results)


# Well below the 15 s keep-alive: a vanished client's slot must be free before it.
FREED_WITHIN = 8.0


@contextlib.asynccontextmanager
async def _served(settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway served as in production: aiohttp's test server cancels a handler whose
    client went away (handler_cancellation), a real server does not, so a vanished client
    is seen only by the stream itself."""
    app = create_gateway(settings)
    port = free_port()
    runner = await serve(app, port)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def _create_connection(http: aiohttp.ClientSession, base: str, key: str) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{base}/v1/connections", json={"name": "live"}, headers=auth) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["id"])


async def _mint_token(http: aiohttp.ClientSession, base: str, key: str, cid: str) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{base}/v1/connections/{cid}/client-token", headers=auth) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["token"])


async def _admitted(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], params: dict[str, str]
) -> bool:
    async with http.get(url, headers=headers, params=params) as r:
        return r.status == 200


async def test_client_tokens_have_their_own_small_cap_per_connection(settings: Settings) -> None:
    assert settings.sse_max_streams_per_client_token == 5  # the default
    async with _served(settings) as (base, app), aiohttp.ClientSession() as http:
        _, key = await create_tenant(app[pool_key], f"sse-{uuid.uuid4().hex[:6]}")
        auth = {"Authorization": f"Bearer {key}"}
        cid = await _create_connection(http, base, key)
        other_cid = await _create_connection(http, base, key)
        token = await _mint_token(http, base, key, cid)
        second_token = await _mint_token(http, base, key, cid)
        url = f"{base}/v1/connections/{cid}/events"
        streams = []
        try:
            for _ in range(5):
                stream = await http.get(url, params={"token": token})
                streams.append(stream)
                assert stream.status == 200
                await _next(sse_events(stream), "the snapshot")
            # a sixth from client tokens of that connection (any of them) is refused
            for t in (token, second_token):
                async with http.get(url, params={"token": t}) as r:
                    assert r.status == 429, r.status  # (a 200 is an endless stream)
                    body = await r.json(content_type=None)
                    assert body["type"].endswith("/too-many-streams")
                    assert "client tokens" in body["detail"]
                    assert int(r.headers["Retry-After"]) > 0
            # the tenant's own key, and another connection's token, still get theirs
            assert await _admitted(http, url, auth, {})
            other_token = await _mint_token(http, base, key, other_cid)
            other_url = f"{base}/v1/connections/{other_cid}/events"
            assert await _admitted(http, other_url, {}, {"token": other_token})
        finally:
            for stream in streams:
                stream.close()  # the browsers went away; nothing is written to them meanwhile
        await wait_for(
            "a client token's slot freed",
            lambda: _admitted(http, url, {}, {"token": token}),
            timeout=FREED_WITHIN,
            every=0.2,
        )


async def test_a_vanished_client_frees_its_slot_within_seconds(settings: Settings) -> None:
    """Nothing happens on the connection after the client left: its slot is freed by seeing
    the closed socket, not by a keep-alive write failing 15 s later."""
    limited = msgspec.structs.replace(settings, sse_max_streams_per_tenant=1)
    async with _served(limited) as (base, app), aiohttp.ClientSession() as http:
        _, key = await create_tenant(app[pool_key], f"sse-{uuid.uuid4().hex[:6]}")
        auth = {"Authorization": f"Bearer {key}"}
        url = f"{base}/v1/connections/{await _create_connection(http, base, key)}/events"
        stream = await http.get(url, headers=auth)
        assert stream.status == 200
        await _next(sse_events(stream), "the snapshot")
        assert not await _admitted(http, url, auth, {})  # 429: the one slot is taken
        stream.close()
        await wait_for(
            "the vanished client's slot",
            lambda: _admitted(http, url, auth, {}),
            timeout=FREED_WITHIN,
            every=0.2,
        )
