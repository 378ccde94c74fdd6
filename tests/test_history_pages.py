"""``GET /v1/connections/{id}/history`` comes a bounded page at a time (``limit``, default 100,
at most 500; ``next_cursor``), like ``GET /v1/connections``."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from services.gateway.app import create_app as create_gateway
from zapbus.config import Settings
from zapbus.runtime import pool_key
from zapbus.tenants import create_tenant

EXTRA_EVENTS = 249  # with create.requested: 250 entries


async def _history(client: TestClient[Any, Any], url: str, key: str) -> tuple[int, Any]:
    async with client.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json(content_type=None)


async def test_history_is_paginated_with_a_bounded_page(
    settings: Settings, aiohttp_client: Any
) -> None:
    client: TestClient[Any, Any] = await aiohttp_client(create_gateway(settings))
    pool = client.app[pool_key]
    _, key = await create_tenant(pool, f"history-{uuid.uuid4().hex[:6]}")
    async with client.post(
        "/v1/connections", json={"name": "h"}, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 202
        cid = (await r.json())["id"]
    await pool.execute(
        "INSERT INTO connection_events (event_id, connection_id, generation, event_type,"
        " applied, occurred_at) SELECT gen_random_uuid(), $1, 1, 'status.reported', false, now()"
        " FROM generate_series(1, $2)",
        uuid.UUID(cid),
        EXTRA_EVENTS,
    )
    url = f"/v1/connections/{cid}/history"

    status, first = await _history(client, url, key)
    assert status == 200 and len(first["items"]) == 100 and first["next_cursor"]
    assert first["items"][0]["event_type"] == "create.requested"

    seqs: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"?limit=60&cursor={cursor}" if cursor else "?limit=60"
        status, page = await _history(client, url + query, key)
        assert status == 200 and len(page["items"]) <= 60
        seqs += [item["seq"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5 and len(seqs) == EXTRA_EVENTS + 1
    assert seqs == sorted(set(seqs))  # oldest first, nothing twice, nothing skipped

    status, everything = await _history(client, url + "?limit=500", key)
    assert status == 200 and len(everything["items"]) == 250
    assert everything["next_cursor"] is None

    for bad in ("?limit=501", "?limit=0", "?limit=x", "?cursor=bm9wZQ", "?cursor=%FF"):
        status, body = await _history(client, url + bad, key)
        assert status == 400, (bad, body)
        assert body["type"].endswith("/invalid-query")
