"""The frontend's side of the API: QR images, live updates by SSE, tenancy, OpenAPI."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.stack import Stack
from zapbus.tenants import create_tenant
from zapbus.tokens import webhook_token


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Parse a text/event-stream into {id, event, data} dicts (comments skipped)."""
    frame: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in frame:
                frame["data"] = json.loads(frame["data"])
                yield frame
            frame = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            frame[field] = value


async def _post_webhook(stack: Stack, cid: str, body: dict[str, Any], generation: int = 1) -> None:
    token = webhook_token(stack.settings.webhook_secret, uuid.UUID(cid), generation)
    url = f"{stack.webhook_url}/webhooks/baileys/{cid}/{generation}/{token}"
    async with stack.http.post(url, json=body) as r:
        assert r.status == 202, await r.text()


async def test_qr_as_json_svg_png_and_409_before_ready(stack: Stack) -> None:
    created = await stack.create("qr")
    url = f"{stack.gateway_url}/v1/connections/{created['id']}/qr"
    async with stack.http.get(url, headers=stack.auth()) as r:
        if r.status == 409:  # the QR may already be there; if not, the answer says why
            body = await r.json(content_type=None)
            assert body["type"].endswith("/qr-not-ready")
            assert body["status_now"] in ("pending", "creating", "awaiting_qr")
    ready = await stack.wait_status(created["id"], "qr_ready")
    async with stack.http.get(url, headers=stack.auth()) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        assert await r.json() == {
            "qr": ready["qr"],
            "qr_seq": 1,
            "expires_at": ready["qr_expires_at"],
        }
    async with stack.http.get(url, headers={**stack.auth(), "Accept": "image/svg+xml"}) as r:
        assert r.content_type == "image/svg+xml"
        assert (await r.read()).startswith(b"<svg")
    async with stack.http.get(url, headers={**stack.auth(), "Accept": "image/png"}) as r:
        assert r.content_type == "image/png"
        assert (await r.read()).startswith(b"\x89PNG")
        assert r.headers["Cache-Control"] == "no-store"
    async with stack.http.get(url, headers={**stack.auth(), "Accept": "text/html"}) as r:
        assert r.status == 406
    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/scan")
    await stack.wait_status(created["id"], "connected")
    async with stack.http.get(url, headers=stack.auth()) as r:
        assert r.status == 409
        assert (await r.json(content_type=None))["status_now"] == "connected"


async def test_sse_starts_with_state_follows_changes_and_resumes_without_gaps(
    stack: Stack,
) -> None:
    created = await stack.create("live")
    cid = created["id"]
    await stack.wait_status(cid, "qr_ready")
    url = f"{stack.gateway_url}/v1/connections/{cid}/events"
    timeout = aiohttp.ClientTimeout(total=20)
    async with stack.http.get(url, headers=stack.auth(), timeout=timeout) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = sse_events(r)
        first = await anext(events)
        assert first["data"]["status"] == "qr_ready" and first["data"]["qr_seq"] == 1
        # A new QR by webhook: time from the POST to the browser-side event.
        started = time.perf_counter()
        await _post_webhook(stack, cid, {"event": "qr.update", "data": {"qr": "2@second"}})
        second = await anext(events)
        latency_ms = (time.perf_counter() - started) * 1000
        assert second["event"] == "qr" and second["data"]["qr"] == "2@second"
        assert second["data"]["qr_seq"] == 2
        assert int(second["id"]) > int(first["id"])
        print(f"\nSSE: webhook POST -> event at the client in {latency_ms:.1f} ms")
        last_id = second["id"]

    # Disconnected: the phone scans (pairing, then connected) and nobody is listening.
    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/scan")
    await stack.wait_status(cid, "connected")

    headers = {**stack.auth(), "Last-Event-ID": last_id}
    async with stack.http.get(url, headers=headers, timeout=timeout) as r:
        events = sse_events(r)
        missed = [await anext(events), await anext(events)]
    assert [m["data"]["status"] for m in missed] == ["pairing", "connected"]
    ids = [int(last_id)] + [int(m["id"]) for m in missed]
    assert ids == sorted(ids) and len(set(ids)) == 3


async def test_every_v1_route_is_404_for_another_tenant(stack: Stack) -> None:
    created = await stack.create("private")
    await stack.wait_status(created["id"], "qr_ready")
    _, other = await create_tenant(stack.pool, "intruder")
    headers = {"Authorization": f"Bearer {other}"}
    cid = created["id"]
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": ["*"]},
        headers=stack.auth(),
    ) as r:
        wid = (await r.json())["id"]
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks/{wid}/test", headers=stack.auth()
    ) as r:
        delivery = (await r.json())["webhook_id"]
    routes = {
        ("GET", f"/v1/webhooks/{wid}"),
        ("DELETE", f"/v1/webhooks/{wid}"),
        ("POST", f"/v1/webhooks/{wid}/rotate-secret"),
        ("POST", f"/v1/webhooks/{wid}/test"),
        ("GET", f"/v1/webhooks/{wid}/deliveries"),
        ("POST", f"/v1/webhooks/{wid}/deliveries/{delivery}/replay"),
        ("GET", f"/v1/connections/{cid}"),
        ("DELETE", f"/v1/connections/{cid}"),
        ("POST", f"/v1/connections/{cid}/recreate"),
        ("POST", f"/v1/connections/{cid}/pairing-code"),
        ("GET", f"/v1/connections/{cid}/history"),
        ("GET", f"/v1/connections/{cid}/qr"),
        ("GET", f"/v1/connections/{cid}/events"),
        ("POST", f"/v1/connections/{cid}/client-token"),
    }
    # Every route of the app with an {id} is walked: a new route cannot be forgotten here.
    app_routes = {
        (
            r.method,
            r.resource.canonical.replace("{webhook_id}", delivery).replace(
                "{id}", wid if r.resource.canonical.startswith("/v1/webhooks/") else cid
            ),
        )
        for r in stack.apps["gateway"].router.routes()
        if r.resource is not None and "{id}" in r.resource.canonical and r.method != "HEAD"
    }
    assert app_routes == routes
    for method, path in sorted(routes):
        async with stack.http.request(method, stack.gateway_url + path, headers=headers) as r:
            assert r.status == 404, (method, path, r.status)
            assert r.content_type == "application/problem+json"
    async with stack.http.get(f"{stack.gateway_url}/v1/connections", headers=headers) as r:
        assert (await r.json())["items"] == []
    async with stack.http.get(f"{stack.gateway_url}/v1/webhooks", headers=headers) as r:
        assert (await r.json())["items"] == []
    status, body = await stack.get(cid)
    assert status == 200 and body["status"] == "qr_ready"  # untouched by the intruder


async def test_openapi_documents_exactly_the_routes_served(stack: Stack) -> None:
    async with stack.http.get(f"{stack.gateway_url}/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (r.method, r.resource.canonical)
        for r in stack.apps["gateway"].router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/v1/") and r.method != "HEAD"
    }
    assert documented == served
    for name in ("Connection", "Problem", "QrCode", "History", "LiveEvent"):
        assert name in doc["components"]["schemas"]


async def test_web_page_is_served(stack: Stack) -> None:
    async with stack.http.get(f"{stack.gateway_url}/") as r:
        assert r.status == 200 and "text/html" in r.content_type
        assert "New connection" in await r.text()
    async with stack.http.get(f"{stack.gateway_url}/static/app.js") as r:
        assert r.status == 200


async def test_sse_works_across_gateway_replicas(stack: Stack) -> None:
    """Live updates come from JetStream, so a second replica serves and resumes them too."""
    from aiohttp import web

    from services.gateway.app import create_app as create_gateway
    from zapbus.tools.localinfra import free_port

    port = free_port()
    runner = web.AppRunner(create_gateway(stack.settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        created = await stack.create("replicas")  # through replica A
        cid = created["id"]
        timeout = aiohttp.ClientTimeout(total=20)
        url_b = f"http://127.0.0.1:{port}/v1/connections/{cid}/events"
        async with stack.http.get(url_b, headers=stack.auth(), timeout=timeout) as r:
            events = sse_events(r)
            seen = [await anext(events)]
            while seen[-1]["data"]["status"] != "qr_ready":
                seen.append(await anext(events))
        await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/scan")
        await stack.wait_status(cid, "connected")
        url_a = f"{stack.gateway_url}/v1/connections/{cid}/events"
        headers = {**stack.auth(), "Last-Event-ID": seen[-1]["id"]}
        async with stack.http.get(url_a, headers=headers, timeout=timeout) as r:
            events = sse_events(r)
            resumed = [(await anext(events))["data"]["status"] for _ in range(2)]
        assert resumed == ["pairing", "connected"]
    finally:
        await runner.cleanup()
