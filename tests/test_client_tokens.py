"""Client tokens (browser-safe access to one connection), the /connect page, the languages of
the pages, and the security headers of every gateway answer."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime
from typing import Any

import aiohttp
import msgspec
import pytest

from services.gateway import client_tokens, pages
from services.gateway.app import create_app as create_gateway
from services.gateway.auth import CLIENT_TOKEN_ROUTES
from tests.stack import Stack
from zapbus.config import DEV_WEBHOOK_SECRET, ConfigError, Settings, require_client_token_secret
from zapbus.tenants import create_tenant

KEY = client_tokens.signing_key(Settings(webhook_secret="s3cret"))


async def _mint(stack: Stack, cid: str, body: Any = None, key: str | None = None) -> Any:
    url = f"{stack.gateway_url}/v1/connections/{cid}/client-token"
    async with stack.http.post(url, json=body, headers=stack.auth(key)) as r:
        return r.status, await r.json(content_type=None)


def _fill(route: str, cid: str) -> str:
    return re.sub(r"\{[^}]+\}", cid, route)


def test_tokens_round_trip_and_refuse_tampering_other_keys_and_expiry() -> None:
    tenant, connection = uuid.uuid4(), uuid.uuid4()
    token, claims = client_tokens.mint(KEY, tenant, connection, 600, now=1_000_000)
    assert token.startswith("zbc_") and re.fullmatch(r"zbc_[\w-]+\.[\w-]+", token)
    assert client_tokens.verify(KEY, token, now=1_000_599) == claims
    assert (claims.tenant_id, claims.connection_id, claims.expires) == (
        tenant,
        connection,
        1_000_600,
    )
    with pytest.raises(client_tokens.ExpiredToken):
        client_tokens.verify(KEY, token, now=1_000_600)
    other = client_tokens.signing_key(Settings(client_token_secret="another"))
    with pytest.raises(client_tokens.InvalidToken):
        client_tokens.verify(other, token, now=1_000_000)
    payload, mac = token.split(".")
    forged_payload, _ = client_tokens.mint(KEY, tenant, uuid.uuid4(), 600, now=1_000_000)
    for bad in (
        payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B"),
        forged_payload.split(".")[0] + "." + mac,  # another connection under this signature
        payload,
        "zbc_.",
        "zbc_!!!.???",
        "zb_" + token[4:],
        token + "x",
    ):
        with pytest.raises(client_tokens.InvalidToken):
            client_tokens.verify(KEY, bad, now=1_000_000)


def test_the_signing_key_is_never_the_public_default_outside_dev() -> None:
    with pytest.raises(ConfigError, match="ZAPBUS_CLIENT_TOKEN_SECRET"):
        require_client_token_secret(Settings())
    with pytest.raises(ConfigError):
        require_client_token_secret(Settings(webhook_secret=DEV_WEBHOOK_SECRET))
    with pytest.raises(ConfigError):  # the gateway does not start with it
        create_gateway(Settings())
    require_client_token_secret(Settings(client_token_secret="own"))
    require_client_token_secret(Settings(webhook_secret="own"))  # derived from it
    require_client_token_secret(Settings(env="dev"))
    # an own secret gives another key than the webhook secret's
    assert client_tokens.signing_key(Settings(client_token_secret="a")) != (
        client_tokens.signing_key(Settings(webhook_secret="a", client_token_secret="b"))
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", "en"),
        ("pt-BR,pt;q=0.9,en;q=0.8", "pt-BR"),
        ("pt", "pt-BR"),
        ("pt-PT", "pt-BR"),
        ("en-US,en;q=0.9,pt-BR;q=0.8", "en"),
        ("fr-FR, pt-BR;q=0.5", "pt-BR"),
        ("de, fr", "en"),
        ("pt;q=0, en", "en"),
        ("en;q=0.4, pt-BR;q=0.6", "pt-BR"),
    ],
)
def test_language_follows_accept_language(header: str, expected: str) -> None:
    assert pages.language(header) == expected


async def test_minting_bounds_the_lifetime(stack: Stack) -> None:
    created = await stack.create("mint")
    cid = created["id"]
    before = time.time()
    status, body = await _mint(stack, cid, {"ttl_seconds": 600})
    assert status == 200, body
    assert set(body) == {"token", "expires_at", "connect_url"}
    expires = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert before + 599 <= expires <= time.time() + 601
    assert body["connect_url"].endswith(f"/connect/{body['token']}")
    status, body = await _mint(stack, cid)  # no body: 10 minutes
    assert status == 200
    assert datetime.fromisoformat(body["expires_at"]).timestamp() <= time.time() + 601
    status, body = await _mint(stack, cid, {"ttl_seconds": 86400})
    assert status == 200, body
    for ttl in (86401, 0, -5, "600", 1.5):
        status, body = await _mint(stack, cid, {"ttl_seconds": ttl})
        assert status == 422 and body["type"].endswith("/invalid-body"), (ttl, body)
    status, body = await _mint(stack, cid, {"ttl": 60})
    assert status == 422
    url = f"{stack.gateway_url}/v1/connections/{cid}/client-token"
    async with stack.http.post(url, data=b"{", headers=stack.auth()) as r:
        assert r.status == 400
    status, body = await _mint(stack, str(uuid.uuid4()))
    assert status == 404


async def _first_event(resp: aiohttp.ClientResponse) -> str:
    async with asyncio.timeout(10):
        async for line in resp.content:
            if line.startswith(b"data: "):
                return line.decode()
    raise AssertionError("the stream ended without an event")


async def test_a_client_token_reads_its_connection_and_nothing_else(stack: Stack) -> None:
    """Every route of the router with a client token: the three reads of its connection
    answer, any other route is a 403 problem, another connection a 404 (same tenant or not)."""
    mine = await stack.create("mine")
    sibling = await stack.create("sibling")
    cid = mine["id"]
    await stack.wait_status(cid, "qr_ready")
    other_tenant, other_key = await create_tenant(stack.pool, "other")
    foreign = await stack.create("foreign", headers=stack.auth(other_key))
    status, issued = await _mint(stack, cid, {"ttl_seconds": 600})
    assert status == 200
    token = issued["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=15)

    routes = {
        (r.method, r.resource.canonical)
        for r in stack.apps["gateway"].router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/v1/") and r.method != "HEAD"
    }
    allowed = {(m, route) for m, route in CLIENT_TOKEN_ROUTES if m == "GET"}
    assert allowed <= routes
    assert ("POST", "/v1/connections/{id}/client-token") in routes
    for method, route in sorted(routes):
        path = _fill(route, cid)
        async with stack.http.request(
            method, stack.gateway_url + path, headers=bearer, timeout=timeout
        ) as r:
            if (method, route) in allowed:
                assert r.status == 200, (method, route, r.status, await r.text())
                if route.endswith("/events"):
                    assert '"status":"qr_ready"' in await _first_event(r)
                else:
                    body = await r.json()
                    assert body["qr"] == (await stack.get(cid))[1]["qr"]
            else:
                assert r.status == 403, (method, route, r.status)
                assert r.content_type == "application/problem+json"
                assert (await r.json())["type"].endswith("/client-token-scope")
        for other in (sibling["id"], foreign["id"], str(uuid.uuid4()), "not-a-uuid"):
            if (method, route) not in allowed:
                continue
            async with stack.http.request(
                method, stack.gateway_url + _fill(route, other), headers=bearer
            ) as r:
                assert r.status == 404, (method, route, other, r.status)
                assert r.content_type == "application/problem+json"

    # ?token= for <img src> and EventSource; never an API key there
    qr_url = f"{stack.gateway_url}/v1/connections/{cid}/qr"
    async with stack.http.get(
        qr_url, params={"token": token}, headers={"Accept": "image/svg+xml"}
    ) as r:
        assert r.status == 200 and r.content_type == "image/svg+xml"
    events_url = f"{stack.gateway_url}/v1/connections/{cid}/events"
    async with stack.http.get(events_url, params={"token": token}, timeout=timeout) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        await _first_event(r)
    async with stack.http.get(qr_url, params={"token": stack.api_key}) as r:
        assert r.status == 401
    async with stack.http.get(f"{stack.gateway_url}/v1/connections", params={"token": token}) as r:
        assert r.status == 403

    # forged, signed with another key, expired: 401, as header and as ?token=
    payload, mac = token.split(".")
    forged = payload + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    foreign_key = client_tokens.signing_key(Settings(client_token_secret="not-this-one"))
    other_signed, _ = client_tokens.mint(foreign_key, stack.tenant_id, uuid.UUID(cid), 600)
    key = client_tokens.signing_key(stack.settings)
    expired, _ = client_tokens.mint(key, stack.tenant_id, uuid.UUID(cid), 600, time.time() - 601)
    for bad, why in ((forged, "not a valid"), (other_signed, "not a valid"), (expired, "expired")):
        for kw in ({"headers": {"Authorization": f"Bearer {bad}"}}, {"params": {"token": bad}}):
            async with stack.http.get(qr_url, **kw) as r:
                assert r.status == 401, (why, kw)
                assert why in (await r.json(content_type=None))["detail"]
    # a token of another tenant's key for this connection finds nothing
    crossed, _ = client_tokens.mint(key, other_tenant.id, uuid.UUID(cid), 600)
    async with stack.http.get(qr_url, headers={"Authorization": f"Bearer {crossed}"}) as r:
        assert r.status == 404
    status, body = await stack.get(cid)
    assert status == 200 and body["status"] == "qr_ready"  # untouched


async def test_a_client_token_event_stream_ends_when_the_token_expires(stack: Stack) -> None:
    created = await stack.create("short")
    cid = created["id"]
    status, issued = await _mint(stack, cid, {"ttl_seconds": 2})
    assert status == 200
    url = f"{stack.gateway_url}/v1/connections/{cid}/events"
    started = time.monotonic()
    async with stack.http.get(
        url, params={"token": issued["token"]}, timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        assert r.status == 200
        await _first_event(r)
        async with asyncio.timeout(6):
            async for _ in r.content:  # until the server ends the stream
                pass
    assert time.monotonic() - started < 5
    async with stack.http.get(url, params={"token": issued["token"]}) as r:
        assert r.status == 401


SCRIPT = re.compile(r"<script\b([^>]*)>", re.I)


async def test_every_answer_has_nosniff_and_pages_a_strict_policy(stack: Stack) -> None:
    created = await stack.create("headers")
    cid = created["id"]
    await stack.wait_status(cid, "qr_ready")
    _, issued = await _mint(stack, cid)
    token = issued["token"]
    g = stack.gateway_url
    pages_ = [f"{g}/", f"{g}/connect/{token}", f"{g}/connect/zbc_forged.x"]
    others: list[tuple[str, dict[str, str]]] = [
        (f"{g}/v1/connections", stack.auth()),
        (f"{g}/v1/connections", {}),  # 401
        (f"{g}/v1/connections/{cid}", stack.auth()),
        (f"{g}/v1/connections/{uuid.uuid4()}", stack.auth()),  # 404
        (f"{g}/v1/connections/{cid}/qr", {**stack.auth(), "Accept": "image/svg+xml"}),
        (f"{g}/v1/connections/{cid}/qr", {**stack.auth(), "Accept": "image/png"}),
        (f"{g}/openapi.json", {}),
        (f"{g}/static/app.js", {}),
        (f"{g}/static/connect.js", {}),
        (f"{g}/static/style.css", {}),
        (f"{g}/nowhere", {}),
        (f"{g}/healthz", {}),
        (f"{g}/metrics", {}),
    ]
    for url in pages_:
        async with stack.http.get(url) as r:
            assert r.content_type == "text/html", url
            assert r.headers["X-Content-Type-Options"] == "nosniff", url
            assert r.headers["Referrer-Policy"] == "no-referrer", url
            csp = {
                d.split()[0]: d.split()[1:]
                for d in map(str.strip, r.headers["Content-Security-Policy"].split(";"))
            }
            assert csp["frame-ancestors"] == ["'none'"], url
            assert csp["script-src"] == ["'self'"], url  # no inline script, no eval
            assert csp["default-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
            text = await r.text()
            for attrs in SCRIPT.findall(text):  # every script is a file, none inline
                assert "src=" in attrs, url
            assert not re.search(r"\son[a-z]+\s*=", text), url  # no inline handlers
    for url, headers in others:
        async with stack.http.get(url, headers=headers) as r:
            assert r.headers["X-Content-Type-Options"] == "nosniff", url
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], url
    async with stack.http.get(
        f"{g}/v1/connections/{cid}/events",
        headers=stack.auth(),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        await _first_event(r)


async def test_pages_speak_the_language_asked_for(stack: Stack) -> None:
    created = await stack.create("lang")
    cid = created["id"]
    _, issued = await _mint(stack, cid)
    token = issued["token"]
    key = client_tokens.signing_key(stack.settings)
    expired, _ = client_tokens.mint(key, stack.tenant_id, uuid.UUID(cid), 1, time.time() - 5)
    for accept, lang in (("pt-BR,pt;q=0.9,en;q=0.5", "pt-BR"), ("en-GB", "en"), ("", "en")):
        headers = {"Accept-Language": accept} if accept else {}
        for path in ("/", f"/connect/{token}"):
            async with stack.http.get(stack.gateway_url + path, headers=headers) as r:
                assert r.status == 200
                assert f'<html lang="{lang}">' in await r.text(), (path, accept)
                assert r.headers["Content-Language"] == lang
                assert "Accept-Language" in r.headers["Vary"]
                assert r.headers["Cache-Control"] == "no-store"
    async with stack.http.get(f"{stack.gateway_url}/connect/{token}") as r:
        text = await r.text()
        assert f'data-connection-id="{cid}"' in text and 'data-link="ok"' in text
        assert "{{" not in text
    async with stack.http.get(f"{stack.gateway_url}/connect/{expired}") as r:
        assert r.status == 410 and 'data-link="expired"' in await r.text()
    async with stack.http.get(f"{stack.gateway_url}/connect/zbc_x.y") as r:
        text = await r.text()
        assert r.status == 404 and 'data-link="invalid"' in text
        assert 'data-connection-id=""' in text


def test_openapi_documents_the_client_token() -> None:
    from services.gateway.openapi import build

    doc = build()
    op = doc["paths"]["/v1/connections/{id}/client-token"]["post"]
    assert op["operationId"] == "createClientToken"
    schemas = doc["components"]["schemas"]
    assert schemas["ClientTokenRequest"]["properties"]["ttl_seconds"]["maximum"] == 86400
    assert {"token", "expires_at"} <= set(schemas["ClientTokenIssued"]["required"])
    for path in ("/v1/connections/{id}", "/v1/connections/{id}/qr"):
        names = [p["name"] for p in doc["paths"][path]["get"]["parameters"]]
        assert "token" in names
    assert msgspec.json.encode(doc)  # serialisable
