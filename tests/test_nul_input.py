"""NUL characters, on every route of the gateway, get a 4xx problem+json (never a 500).

PostgreSQL cannot store NUL in text; the review found ``POST /v1/webhooks`` with ``\\u0000``
in ``description`` or ``url`` and a replay with ``%00`` in the delivery id answered 500. The
test walks the gateway's router, so a route added later is covered too: NUL in each path
parameter, in the query, and in the body's strings.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from tests.stack import Stack

PROBLEM_JSON = "application/problem+json"
TIMEOUT = aiohttp.ClientTimeout(total=20)  # an SSE stream that opened would hang the test
NUL_BODIES = [
    {"name": "sales\u0000"},
    {"url": "https://example.com/hook\u0000", "events": ["*"]},
    {"url": "https://example.com/hook", "events": ["*"], "description": "a\u0000b"},
    {"url": "https://example.com/hook", "events": ["*\u0000"]},
    {"name\u0000": "sales"},
    {"ttl_seconds": 60, "login": "qr\u0000"},
]


def _routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every route but HEAD; a static directory as ``{filename}``."""
    found = []
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path += "/{filename}"
        found.append((route.method, path))
    return sorted(set(found))


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), template)


async def _assert_refused(
    stack: Stack, method: str, path: str, what: str, json: Any = None, query: str = ""
) -> None:
    url = f"{stack.gateway_url}{path}{query}"
    async with stack.http.request(
        method, url, json=json, headers=stack.auth(), timeout=TIMEOUT
    ) as r:
        text = await r.text()
        assert 400 <= r.status < 500, (method, path, what, r.status, text)
        assert r.content_type == PROBLEM_JSON, (method, path, what, r.content_type, text)


async def test_nul_anywhere_on_every_route_is_a_4xx_problem(stack: Stack) -> None:
    connection = await stack.create("nul")
    async with stack.http.post(
        f"{stack.gateway_url}/v1/webhooks",
        json={"url": "https://example.com/hook", "events": ["*"]},
        headers=stack.auth(),
    ) as r:
        assert r.status == 201, await r.text()
        endpoint = await r.json()
    # what the review saw answered 500
    for body in NUL_BODIES[1:3]:
        await _assert_refused(stack, "POST", "/v1/webhooks", "review", json=body)
    await _assert_refused(
        stack, "POST", f"/v1/webhooks/{endpoint['id']}/deliveries/msg_%00/replay", "review"
    )
    real = {
        "id": connection["id"],
        "token": "x",
        "webhook_id": "msg_" + uuid.uuid4().hex,
        "filename": "app.js",
    }
    routes = _routes(stack.apps["gateway"])
    assert ("POST", "/v1/webhooks/{id}/deliveries/{webhook_id}/replay") in routes
    for method, template in routes:
        ids = {**real, "id": endpoint["id"]} if template.startswith("/v1/webhooks") else real
        # NUL in each path parameter, the others real
        for param in re.findall(r"\{(\w+)\}", template):
            path = _fill(template, {**ids, param: f"{ids[param]}%00"})
            await _assert_refused(stack, method, path, f"NUL in {{{param}}}")
        path = _fill(template, ids)
        # NUL in a query value, and in a query name
        await _assert_refused(stack, method, path, "NUL in the query", query="?cursor=%00")
        await _assert_refused(stack, method, path, "NUL in a query name", query="?a%00=1")
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            for body in NUL_BODIES:
                await _assert_refused(stack, method, path, f"NUL in {body}", json=body)
    # nothing was made or changed by any of them
    async with stack.http.get(f"{stack.gateway_url}/v1/connections", headers=stack.auth()) as r:
        assert [c["id"] for c in (await r.json())["items"]] == [connection["id"]]
    async with stack.http.get(f"{stack.gateway_url}/v1/webhooks", headers=stack.auth()) as r:
        assert [e["id"] for e in (await r.json())["items"]] == [endpoint["id"]]
