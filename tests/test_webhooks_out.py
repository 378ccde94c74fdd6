"""Webhooks to the tenant's backend, end to end: gateway routes, the notifier, a real receiver.

Every receiver is a real aiohttp server on a free loopback port; signatures are checked with
the ``standardwebhooks`` package (an implementation independent of zapbus's sender) and by
hand with hmac.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from services.gateway.app import create_app as create_gateway
from services.gateway.webhook_models import ConnectionEvent, ConnectionEventData
from services.notifier.app import create_app as create_notifier
from services.notifier.sender import Sender
from tests.chains import expected_webhook_ids, first_seen
from tests.stack import Stack, serve, start_stack, wait_for
from zapbus import db
from zapbus.config import Settings
from zapbus.endpoints import is_public
from zapbus.runtime import js_key
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import free_port


@dataclass
class Receiver:
    url: str
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    # answer for the n-th request (0-based); default 204
    answer: Callable[[int, dict[str, Any]], int] = lambda n, body: 204
    delay: float = 0.0
    # which requests wait ``delay`` before the answer (default: all)
    slow: Callable[[dict[str, Any]], bool] = lambda body: True

    def bodies(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(b) for _, b in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[], Any]]:
    runners: list[web.AppRunner] = []

    async def make() -> Receiver:
        port = free_port()
        rec = Receiver(url=f"http://127.0.0.1:{port}/hook")

        async def hook(request: web.Request) -> web.Response:
            import json

            body = await request.read()
            n = len(rec.got)
            rec.got.append((dict(request.headers), body))
            parsed = json.loads(body)
            if rec.delay and rec.slow(parsed):
                await asyncio.sleep(rec.delay)
            return web.Response(status=rec.answer(n, parsed))

        app = web.Application()
        app.router.add_post("/hook", hook)
        runners.append(await serve(app, port))
        return rec

    yield make
    for r in runners:
        await r.cleanup()


async def add_endpoint(
    stack: Stack, url: str, events: list[str] | None = None, key: str | None = None
) -> dict[str, Any]:
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks",
        json={"url": url, "events": events or ["*"], "description": "test"},
        headers=stack.auth(key),
    ) as r:
        assert r.status == 201, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def connect(stack: Stack, connection: dict[str, Any]) -> None:
    row = await stack.wait_status(connection["id"], "qr_ready")
    await stack.sim("POST", f"/_sim/sessions/{row['session_name']}/scan")
    await stack.wait_status(connection["id"], "connected")


def hand_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    return any(sig == f"v1,{expected}" for sig in headers["webhook-signature"].split())


async def test_status_qr_and_deleted_events_signed_and_verified(
    stack: Stack, receiver: Callable[[], Any]
) -> None:
    rec: Receiver = await receiver()
    endpoint = await add_endpoint(stack, rec.url)
    assert endpoint["secret"].startswith("whsec_")
    assert base64.b64decode(endpoint["secret"].removeprefix("whsec_"))
    connection = await stack.create("hooked")
    await connect(stack, connection)

    def statuses() -> list[str]:
        return [b["data"]["status"] for b in rec.bodies() if b["type"] == "connection.status"]

    await wait_for("connected delivered", lambda: _async("connected" in statuses()))
    types = {b["type"] for b in rec.bodies()}
    assert {"connection.status", "connection.qr"} <= types
    wh = Webhook(endpoint["secret"])
    for headers, body in rec.got:
        wh.verify(body, headers)  # the package's verifier: raises if the signature is wrong
        assert hand_verify(endpoint["secret"], headers, body)
        assert headers["webhook-id"].startswith("msg_")
    # the order of states is the order they happened in
    seen = statuses()
    assert seen.index("pending") < seen.index("qr_ready") < seen.index("connected")
    qr = next(b for b in rec.bodies() if b["type"] == "connection.qr")
    assert qr["data"]["id"] == connection["id"] and qr["data"]["qr"]
    assert set(qr) == {"type", "timestamp", "data"}
    assert "reason_code" in qr["data"]

    async with stack.http.delete(
        f"{stack.gateway_url}/v1/connections/{connection['id']}", headers=stack.auth()
    ) as r:
        assert r.status == 202
    await wait_for(
        "connection.deleted delivered",
        lambda: _async(any(b["type"] == "connection.deleted" for b in rec.bodies())),
    )
    # the deliveries route lists the attempts
    async with stack.http.get(
        f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/deliveries", headers=stack.auth()
    ) as r:
        assert r.status == 200
        items = (await r.json())["items"]
    assert items and all(i["status_code"] == 204 and i["attempt"] == 1 for i in items)
    assert {"webhook_id", "type", "attempt", "status_code", "error", "duration_ms"} <= set(items[0])


async def _async(value: Any) -> Any:
    return value


async def test_retried_on_500_with_the_same_webhook_id(
    settings: Settings, receiver: Callable[[], Any]
) -> None:
    async with start_stack(settings, notify_retry_base_seconds=0.1) as stack:
        rec: Receiver = await receiver()
        rec.answer = lambda n, body: 500 if n < 2 else 200
        endpoint = await add_endpoint(stack, rec.url, ["connection.status"])
        async with stack.http.post(
            f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/test", headers=stack.auth()
        ) as r:
            assert r.status == 202
            queued = await r.json()
        await wait_for("third attempt", lambda: _async(len(rec.got) >= 3))
        ids = {h["webhook-id"] for h, _ in rec.got[:3]}
        assert ids == {queued["webhook_id"]}
        async with stack.http.get(
            f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/deliveries", headers=stack.auth()
        ) as r:
            items = (await r.json())["items"]

        async def three() -> Any:
            async with stack.http.get(
                f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/deliveries",
                headers=stack.auth(),
            ) as r:
                items = (await r.json())["items"]
            return items if len(items) == 3 else None

        items = await wait_for("three attempts recorded", three)
        assert [(i["attempt"], i["status_code"]) for i in reversed(items)] == [
            (1, 500),
            (2, 500),
            (3, 200),
        ]
        assert items[-1]["next_attempt_at"] is not None and items[0]["state"] == "succeeded"


async def test_order_per_connection_while_another_connection_is_slow(
    settings: Settings, receiver: Callable[[], Any]
) -> None:
    async with start_stack(settings, notify_retry_base_seconds=0.1) as stack:
        rec: Receiver = await receiver()
        slow_ids: set[str] = set()
        rec.slow = lambda body: body.get("data", {}).get("id") in slow_ids
        rec.delay = 4.0
        tries: dict[str, int] = {}

        def answer(n: int, body: dict[str, Any]) -> int:
            # every first try of the fast connection's events fails: order must hold
            # across retries too
            key = f"{body['data']['id']}{body['data']['status']}{body['data']['qr_seq']}"
            tries[key] = tries.get(key, 0) + 1
            return 503 if tries[key] == 1 and body["data"]["id"] not in slow_ids else 200

        rec.answer = answer
        await add_endpoint(stack, rec.url, ["connection.status"])
        b = await stack.create("slow one")
        slow_ids.add(b["id"])
        a = await stack.create("fast one")
        await connect(stack, a)

        def statuses(connection_id: str) -> list[str]:
            by_id: dict[str, str] = {}
            for (headers, _), body in zip(rec.got, rec.bodies(), strict=True):
                if body["data"]["id"] == connection_id:
                    by_id.setdefault(headers["webhook-id"], body["data"]["status"])
            return list(by_id.values())

        await wait_for(
            "connected delivered for the fast connection",
            lambda: _async("connected" in statuses(a["id"])),
            timeout=20,
        )
        # the slow connection is still on its first change or two: it held nothing back
        assert len(statuses(b["id"])) <= 2
        seen = statuses(a["id"])
        order = ["pending", "creating", "awaiting_qr", "qr_ready", "pairing", "connected"]
        assert [s for s in seen if s in order] == [s for s in order if s in seen], seen
        assert len(seen) >= 4, seen


async def test_a_failing_endpoint_is_disabled_with_a_reason(
    settings: Settings, receiver: Callable[[], Any]
) -> None:
    async with start_stack(
        settings, notify_retry_base_seconds=0.1, notify_disable_after_seconds=1.0
    ) as stack:
        rec: Receiver = await receiver()
        rec.answer = lambda n, body: 500
        endpoint = await add_endpoint(stack, rec.url)
        await stack.create("doomed")

        async def disabled() -> Any:
            async with stack.http.get(
                f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}", headers=stack.auth()
            ) as r:
                body = await r.json()
            return body if not body["enabled"] else None

        body = await wait_for("endpoint disabled", disabled, timeout=20)
        assert "no successful delivery" in body["disabled_reason"]
        assert "HTTP 500" in body["disabled_reason"]
        count = len(rec.got)
        await stack.create("after")
        await asyncio.sleep(1.5)
        assert len(rec.got) == count  # nothing more to a disabled endpoint
        # given-up deliveries are listed and can be replayed (which enables it again)
        async with stack.http.get(
            f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/deliveries?state=given_up",
            headers=stack.auth(),
        ) as r:
            given_up = (await r.json())["items"]
        assert given_up
        rec.answer = lambda n, body: 200
        wid = given_up[0]["webhook_id"]
        async with stack.http.post(
            f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/deliveries/{wid}/replay",
            headers=stack.auth(),
        ) as r:
            assert r.status == 202, await r.text()
        await wait_for(
            "replayed delivery",
            lambda: _async(any(h["webhook-id"] == wid for h, _ in rec.got[count:])),
        )


async def test_private_urls_refused_without_the_flag(
    settings: Settings, receiver: Callable[[], Any]
) -> None:
    async with start_stack(settings, notify_allow_private=False) as stack:
        for url in (
            "https://127.0.0.1/hook",
            "https://10.1.2.3/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://localhost/hook",
            "http://example.com/hook",  # https required
            "ftp://example.com/hook",
        ):
            async with stack.http.post(
                f"{stack.gateway_url}/v1/webhooks",
                json={"url": url, "events": ["*"]},
                headers=stack.auth(),
            ) as r:
                assert r.status == 422, (url, await r.text())
                assert (await r.json())["type"].endswith("webhook-url-refused")
    # at delivery time too (a name that resolved elsewhere when it was accepted)
    rec: Receiver = await receiver()
    sender = Sender(timeout_seconds=2, allow_private=False)
    try:
        for url in (rec.url, rec.url.replace("127.0.0.1", "localhost")):
            attempt = await sender.send(url, ["whsec_" + "A" * 44], "msg_1", b"{}")
            assert attempt.error and attempt.error.startswith("refused"), attempt
            assert not attempt.retryable
        assert rec.got == []
    finally:
        await sender.close()
    # with the flag (what make run sets) a loopback receiver is fine
    sender = Sender(timeout_seconds=2, allow_private=True)
    try:
        attempt = await sender.send(rec.url, ["whsec_" + "A" * 44], "msg_1", b"{}")
        assert attempt.ok and len(rec.got) == 1
    finally:
        await sender.close()


# IPv6 forms that lead to an IPv4 address (or a private network) zapbus must not call
EMBEDDED_PRIVATE = [
    "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix -> 169.254.169.254 (metadata)
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64 (RFC 8215)
    "64:ff9b:1:fffe::a00:1",  # local-use NAT64, another layout
    "::7f00:1",  # IPv4-compatible -> 127.0.0.1
    "::ffff:0:7f00:1",  # IPv4-translated -> 127.0.0.1
    "::ffff:7f00:1",  # IPv4-mapped -> 127.0.0.1
    "2002:7f00:1::1",  # 6to4 -> 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 -> 169.254.169.254
    "fec0::1",  # site-local
    "::",
    "::1",
]
# the same forms leading to public IPv4 addresses are public
EMBEDDED_PUBLIC = ["64:ff9b::808:808", "::ffff:808:808", "2002:808:808::1", "2606:4700::1111"]


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE)
def test_ipv6_forms_that_embed_a_private_ipv4_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", EMBEDDED_PUBLIC)
def test_ipv6_forms_that_embed_a_public_ipv4_stay_public(address: str) -> None:
    assert is_public(address)


async def test_ipv6_forms_embedding_ipv4_refused_at_registration_and_delivery(
    settings: Settings,
) -> None:
    async with start_stack(settings, notify_allow_private=False) as stack:
        sender = Sender(timeout_seconds=2, allow_private=False)
        try:
            for address in EMBEDDED_PRIVATE:
                url = f"https://[{address}]/hook"
                async with stack.http.post(
                    f"{stack.gateway_url}/v1/webhooks",
                    json={"url": url, "events": ["*"]},
                    headers=stack.auth(),
                ) as r:
                    assert r.status == 422, (url, await r.text())
                    assert (await r.json())["type"].endswith("webhook-url-refused")
                attempt = await sender.send(url, ["whsec_" + "A" * 44], "msg_1", b"{}")
                assert attempt.error and attempt.error.startswith("refused"), (url, attempt)
                assert not attempt.retryable
        finally:
            await sender.close()


async def test_rotation_signs_with_both_secrets(stack: Stack, receiver: Callable[[], Any]) -> None:
    rec: Receiver = await receiver()
    endpoint = await add_endpoint(stack, rec.url)
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/rotate-secret", headers=stack.auth()
    ) as r:
        assert r.status == 200
        rotated = await r.json()
    assert rotated["secret"] != endpoint["secret"]
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/test", headers=stack.auth()
    ) as r:
        assert r.status == 202
    await wait_for("test event", lambda: _async(rec.got))
    headers, body = rec.got[0]
    Webhook(rotated["secret"]).verify(body, headers)
    Webhook(endpoint["secret"]).verify(body, headers)
    assert "secret" not in await _get(stack, f"/v1/webhooks/{endpoint['id']}")


async def _get(stack: Stack, path: str, key: str | None = None) -> Any:
    async with stack.http.get(f"{stack.gateway_url}{path}", headers=stack.auth(key)) as r:
        return await r.json()


async def test_list_and_delete(stack: Stack) -> None:
    endpoint = await add_endpoint(stack, "http://127.0.0.1:9/x", ["connection.qr"])
    listed = await _get(stack, "/v1/webhooks")
    assert [e["id"] for e in listed["items"]] == [endpoint["id"]]
    assert listed["items"][0]["events"] == ["connection.qr"]
    async with stack.http.delete(
        f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}", headers=stack.auth()
    ) as r:
        assert r.status == 204
    async with stack.http.get(
        f"{stack.gateway_url}/v1/webhooks/{uuid.uuid4()}", headers=stack.auth()
    ) as r:
        assert r.status == 404


async def test_another_tenants_endpoint_is_404_on_every_route(stack: Stack) -> None:
    from zapbus.tenants import create_tenant

    endpoint = await add_endpoint(stack, "http://127.0.0.1:9/x")
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks/{endpoint['id']}/test", headers=stack.auth()
    ) as r:
        delivery = (await r.json())["webhook_id"]
    _, other = await create_tenant(stack.pool, "intruder")
    wid = endpoint["id"]
    routes = {
        (r.method, r.resource.canonical.replace("{id}", wid).replace("{webhook_id}", delivery))
        for r in stack.apps["gateway"].router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith("/v1/webhooks/{id}")
        and r.method != "HEAD"
    }
    assert len(routes) == 6
    for method, path in sorted(routes):
        async with stack.http.request(
            method, stack.gateway_url + path, headers=stack.auth(other)
        ) as r:
            assert r.status == 404, (method, path, r.status)
            assert r.content_type == "application/problem+json"
    assert (await _get(stack, "/v1/webhooks", other))["items"] == []
    assert (await _get(stack, f"/v1/webhooks/{wid}"))["id"] == wid  # untouched


async def _fanout_backend(stack: Stack) -> int | None:
    """The Postgres backend holding the fan-out's lease (zapbus/leases.py keys it by name
    and schema), or None when nobody holds it."""
    pid: int | None = await stack.pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = (hashtext($1)::bigint & 4294967295)"
        " AND objid::bigint = (hashtext(current_schema())::bigint & 4294967295)",
        "zapbus.notifier.fanout",
    )
    return pid


async def test_an_idle_fan_out_keeps_its_lease_and_delivers_the_next_change(
    settings: Settings, receiver: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing to fan out for longer than ZAPBUS_LEADER_TIMEOUT_SECONDS, the fan-out
    keeps its lease's session alive (Postgres ended it before, and the next change crashed
    the fan-out into a restart, logged as an error with a traceback)."""
    async with start_stack(settings, leader_timeout_seconds=1.0) as stack:
        rec: Receiver = await receiver()
        await add_endpoint(stack, rec.url)
        backend = await wait_for("the fan-out to take its lease", lambda: _fanout_backend(stack))
        # idleness is what is tested: three timeouts' worth with no change to fan out
        await asyncio.sleep(3.5)
        assert await _fanout_backend(stack) == backend, "the idle lease's session was ended"
        await stack.create("after a while")
        await wait_for(
            "the next change delivered",
            lambda: _async(any(b["type"] == "connection.status" for b in rec.bodies())),
        )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert not errors, errors


async def test_gateway_changes_say_the_previous_status_and_make_no_status_event_without_one(
    settings: Settings, receiver: Callable[[], Any]
) -> None:
    """The gateway's own changes (create, recreate, delete) carry ``previous_status`` and a
    ``version``; a recreate of a pending connection (pending again) is no ``connection.status``.
    Only the gateway and the notifier run: no worker moves the connection on meanwhile."""
    settings = msgspec.structs.replace(settings, notify_allow_private=True, outbox_poll_seconds=0.2)
    ports = {"gateway": free_port(), "notifier": free_port()}
    runners = [
        await serve(create_gateway(settings), ports["gateway"]),
        await serve(create_notifier(settings), ports["notifier"]),
    ]
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=2)
    try:
        _, key = await create_tenant(pool, f"prev-{uuid.uuid4().hex[:6]}")
        base, auth = f"http://127.0.0.1:{ports['gateway']}", {"Authorization": f"Bearer {key}"}
        rec: Receiver = await receiver()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/v1/webhooks", json={"url": rec.url, "events": ["*"]}, headers=auth
            ) as r:
                assert r.status == 201, await r.text()
            async with http.post(f"{base}/v1/connections", json={"name": "p"}, headers=auth) as r:
                cid = (await r.json())["id"]
            async with http.post(f"{base}/v1/connections/{cid}/recreate", headers=auth) as r:
                assert r.status == 202 and (await r.json())["status"] == "pending"
            async with http.delete(f"{base}/v1/connections/{cid}", headers=auth) as r:
                assert r.status == 202
            async with http.get(f"{base}/v1/connections/{cid}", headers=auth) as r:
                assert (await r.json())["version"] == 3  # created, recreated, deleted
        await wait_for(
            "the delete's two events delivered",
            # one connection's events arrive in order: nothing comes after these two
            lambda: _async(
                sum(b["data"]["cause"] == "delete.requested" for b in rec.bodies()) == 2 or None
            ),
            timeout=30,
        )
    finally:
        await pool.close()
        for runner in reversed(runners):
            await runner.cleanup()
    got = [(b["type"], b["data"]["cause"], b["data"]["previous_status"]) for b in rec.bodies()]
    # the create, then the delete; the recreate (pending -> pending) made none
    assert sorted(got) == [
        ("connection.deleted", "delete.requested", "pending"),
        ("connection.status", "create.requested", None),  # nothing before a create
        ("connection.status", "delete.requested", "pending"),
    ], got
    versions = {b["data"]["cause"]: b["data"]["version"] for b in rec.bodies()}
    assert versions == {"create.requested": 1, "delete.requested": 3}
    # the bodies are what the OpenAPI document's webhooks say, field for field
    for body in rec.bodies():
        msgspec.convert(body, ConnectionEvent, strict=False)
        assert set(body["data"]) == set(ConnectionEventData.__struct_fields__), body


async def test_parallel_creates_never_pass_the_per_tenant_limit(stack: Stack) -> None:
    """Issue 19 #12: the count and the insert ran apart, so creates in parallel each saw room."""
    from services.gateway.webhooks import MAX_ENDPOINTS_PER_TENANT

    for n in range(MAX_ENDPOINTS_PER_TENANT - 5):
        await add_endpoint(stack, f"http://127.0.0.1:9/before-{n}")

    async def create(n: int) -> int:
        async with stack.http.post(
            f"{stack.gateway_url}/v1/webhooks",
            json={"url": f"http://127.0.0.1:9/race-{n}", "events": ["*"]},
            headers=stack.auth(),
        ) as r:
            if r.status == 409:
                assert (await r.json(content_type=None))["type"].endswith("too-many-webhooks")
            return r.status

    statuses = await asyncio.gather(*(create(n) for n in range(40)))
    assert sorted(set(statuses)) == [201, 409], statuses
    assert statuses.count(201) == 5
    count = await stack.pool.fetchval(
        "SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1", stack.tenant_id
    )
    assert count == MAX_ENDPOINTS_PER_TENANT


STATUS_ONLY = ["connection.status"]


async def test_a_batch_a_dead_fan_out_held_is_queued_before_newer_changes(
    stack: Stack, receiver: Callable[[], Any]
) -> None:
    """A fan-out killed between fetching a batch and acking it: the batch waits on the
    consumer for ack_wait (10 s) while the next fan-out fetches newer changes. Those must not
    overtake it: the next fan-out reads the held changes from the stream first."""
    names = stack.settings.names
    js = stack.apps["gateway"][js_key]
    rec: Receiver = await receiver()
    endpoint = await add_endpoint(stack, rec.url, STATUS_ONLY)

    def got() -> list[tuple[str, dict[str, Any]]]:
        return [(h["webhook-id"], b) for (h, _), b in zip(rec.got, rec.bodies(), strict=True)]

    # a change goes through, so the fan-out has a checkpoint
    warm = await stack.create("warm")
    await stack.wait_status(warm["id"], "qr_ready")
    warm_chain = await expected_webhook_ids(js, names, warm["id"], endpoint["id"], STATUS_ONLY)
    await wait_for(
        "the warm-up delivered", lambda: _async(first_seen(got(), warm["id"]) == warm_chain)
    )
    await stack.runners["notifier"].cleanup()  # the notifier is down

    async def consumer_pending() -> tuple[int, int]:
        info = await js.consumer_info(names.changes_stream, names.notifier_consumer)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    created = await stack.create("held")
    await stack.wait_status(created["id"], "qr_ready")

    async def undelivered() -> bool:
        return (await consumer_pending())[0] >= 3

    await wait_for("its changes on the consumer", undelivered)
    # the dead fan-out: fetches the oldest changes and never acks them
    dead = await js.pull_subscribe_bind(names.notifier_consumer, stream=names.changes_stream)
    held = await dead.fetch(2, timeout=5)
    await dead.unsubscribe()
    assert len(held) == 2 and (await consumer_pending())[1] == 2
    # newer changes of the same connection
    async with stack.http.post(
        f"{stack.gateway_url}/v1/connections/{created['id']}/recreate", headers=stack.auth()
    ) as r:
        assert r.status == 202, await r.text()
    await wait_for(
        "the recreated connection in qr_ready",
        lambda: _async_row(
            stack, created["id"], lambda b: b["generation"] == 2 and b["status"] == "qr_ready"
        ),
        timeout=30,
    )
    # a new notifier, while the dead one's batch still waits for ack_wait
    port = int(stack.notifier_url.rsplit(":", 1)[1])
    stack.runners["notifier"] = await serve(create_notifier(stack.settings), port)

    async def all_received() -> tuple[list[str], list[str]] | None:
        seen = first_seen(got(), created["id"])
        chain = await expected_webhook_ids(js, names, created["id"], endpoint["id"], STATUS_ONLY)
        return (seen, chain) if set(chain) <= set(seen) else None

    seen, chain = await wait_for("every webhook of the connection", all_received, timeout=60)
    assert len(chain) > 4
    assert seen == chain


async def _async_row(stack: Stack, connection_id: str, ok: Callable[[Any], bool]) -> bool:
    status, body = await stack.get(connection_id)
    return status == 200 and ok(body)
