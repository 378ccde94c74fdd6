"""The ``/v1/webhooks`` routes: a tenant's webhook endpoints and their deliveries.

Deliveries are made by the notifier service; these routes only write and read Postgres.
Another tenant's endpoint is a 404, like any missing one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from services.gateway.auth import tenant_key
from services.gateway.webhook_models import (
    DeliveryAttempt,
    DeliveryAttempts,
    QueuedDelivery,
    WebhookEndpoint,
    WebhookEndpointList,
    WebhookEndpointWithSecret,
    create_webhook_decoder,
)
from zapbus.endpoints import NO_CONNECTION, TEST, UnsafeUrl, check_url, new_secret, replay
from zapbus.httpkit import ProblemError, json_response
from zapbus.runtime import pool_key, settings_key

ROTATION_OVERLAP = "24 hours"
MAX_ENDPOINTS_PER_TENANT = 50
DELIVERIES_LIMIT, DELIVERIES_MAX_LIMIT = 50, 200
_COLUMNS = "id, url, events, description, enabled, disabled_reason, disabled_at, created_at"


def _not_found() -> ProblemError:
    return ProblemError(404, "webhook-not-found", "Webhook endpoint not found")


def _endpoint_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise _not_found() from None


def _endpoint(row: asyncpg.Record, secret: str | None = None) -> Any:
    fields = {k: row[k] for k in _COLUMNS.split(", ")}
    fields["events"] = list(fields["events"])
    if secret is None:
        return msgspec.convert(fields, WebhookEndpoint)
    return msgspec.convert({**fields, "secret": secret}, WebhookEndpointWithSecret)


async def _owned(request: web.Request) -> asyncpg.Record:
    row = await request.app[pool_key].fetchrow(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2",
        _endpoint_id(request),
        request[tenant_key].id,
    )
    if row is None:
        raise _not_found()
    return row


async def create(request: web.Request) -> web.Response:
    try:
        req = create_webhook_decoder.decode(await request.read())
    except msgspec.ValidationError as exc:
        raise ProblemError(422, "invalid-body", "Invalid request body", str(exc)) from None
    except msgspec.DecodeError:
        raise ProblemError(
            400,
            "malformed-json",
            "Malformed JSON",
            'send a JSON object like {"url": "https://...", "events": ["*"]}',
        ) from None
    try:
        url = await check_url(req.url, request.app[settings_key].notify_allow_private)
    except UnsafeUrl as exc:
        raise ProblemError(
            422, "webhook-url-refused", "Webhook URL refused", str(exc), field="url"
        ) from None
    pool, tenant_id, secret = request.app[pool_key], request[tenant_key].id, new_secret()
    async with pool.acquire() as conn, conn.transaction():
        # The tenant's row locked: parallel creates count one after the other, so together
        # they never pass the limit.
        await conn.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
        count = await conn.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1", tenant_id
        )
        if count >= MAX_ENDPOINTS_PER_TENANT:
            raise ProblemError(
                409,
                "too-many-webhooks",
                "Too many webhook endpoints",
                f"at most {MAX_ENDPOINTS_PER_TENANT} per tenant; delete one first",
            )
        row = await conn.fetchrow(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, events, description, secret)"
            f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
            uuid.uuid4(),
            tenant_id,
            url,
            sorted(set(req.events)),
            req.description,
            secret,
        )
    return json_response(
        _endpoint(row, secret), status=201, headers={"Location": f"/v1/webhooks/{row['id']}"}
    )


async def get_many(request: web.Request) -> web.Response:
    rows = await request.app[pool_key].fetch(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1"
        " ORDER BY created_at DESC, id",
        request[tenant_key].id,
    )
    return json_response(WebhookEndpointList(items=[_endpoint(r) for r in rows]))


async def get_one(request: web.Request) -> web.Response:
    return json_response(_endpoint(await _owned(request)))


async def delete(request: web.Request) -> web.Response:
    done = await request.app[pool_key].execute(
        "DELETE FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2",
        _endpoint_id(request),
        request[tenant_key].id,
    )
    if not done.endswith(" 1"):
        raise _not_found()
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    """A new secret; the old one keeps signing beside it for 24 h (receivers switch over)."""
    secret = new_secret()
    row = await request.app[pool_key].fetchrow(
        "UPDATE webhook_endpoints SET previous_secret = secret,"
        f" previous_until = now() + interval '{ROTATION_OVERLAP}', secret = $3"
        f" WHERE id = $1 AND tenant_id = $2 RETURNING {_COLUMNS}",
        _endpoint_id(request),
        request[tenant_key].id,
        secret,
    )
    if row is None:
        raise _not_found()
    return json_response(_endpoint(row, secret))


async def send_test(request: web.Request) -> web.Response:
    """Queue a ``webhook.test`` event to the endpoint (delivered like any other)."""
    row = await _owned(request)
    webhook_id = "msg_" + uuid.uuid4().hex
    body = msgspec.json.encode(
        {
            "type": TEST,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {"endpoint_id": str(row["id"])},
        }
    )
    await request.app[pool_key].execute(
        "INSERT INTO webhook_deliveries (webhook_id, endpoint_id, connection_id, event_type,"
        " payload) VALUES ($1, $2, $3, $4, $5)",
        webhook_id,
        row["id"],
        NO_CONNECTION,
        TEST,
        body,
    )
    return json_response(QueuedDelivery(webhook_id=webhook_id, type=TEST, state="pending"), 202)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DELIVERIES_LIMIT))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= DELIVERIES_MAX_LIMIT):
        raise ProblemError(
            400,
            "invalid-query",
            "Invalid query",
            f"limit must be an integer from 1 to {DELIVERIES_MAX_LIMIT}",
            field="limit",
        )
    return int(raw)


async def deliveries(request: web.Request) -> web.Response:
    """Every attempt, newest first; ``?state=given_up`` for the deliveries given up on."""
    row = await _owned(request)
    limit = _limit(request)
    state = request.query.get("state")
    if state is not None and state not in ("pending", "succeeded", "given_up"):
        raise ProblemError(
            400,
            "invalid-query",
            "Invalid query",
            "state must be pending, succeeded or given_up",
            field="state",
        )
    cursor = request.query.get("cursor")
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
        raise ProblemError(
            400,
            "invalid-query",
            "Invalid query",
            "cursor is not one this API handed out",
            field="cursor",
        )
    rows = await request.app[pool_key].fetch(
        "SELECT a.id, d.webhook_id, d.event_type, d.connection_id, d.state, a.attempt,"
        " a.status_code, a.error, a.duration_ms, a.attempted_at, a.next_attempt_at"
        " FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
        " WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.state = $2)"
        " AND ($3::bigint IS NULL OR a.id < $3) ORDER BY a.id DESC LIMIT $4",
        row["id"],
        state,
        int(cursor) if cursor else None,
        limit + 1,
    )
    items = [
        DeliveryAttempt(
            webhook_id=r["webhook_id"],
            type=r["event_type"],
            connection_id=None if r["connection_id"] == NO_CONNECTION else r["connection_id"],
            state=r["state"],
            attempt=r["attempt"],
            status_code=r["status_code"],
            error=r["error"],
            duration_ms=r["duration_ms"],
            attempted_at=r["attempted_at"],
            next_attempt_at=r["next_attempt_at"],
        )
        for r in rows[:limit]
    ]
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return json_response(DeliveryAttempts(items=items, next_cursor=next_cursor))


async def replay_delivery(request: web.Request) -> web.Response:
    """``POST /v1/webhooks/{id}/deliveries/{webhook_id}/replay``: send a given-up delivery
    again (same webhook-id); a disabled endpoint is enabled again."""
    row = await _owned(request)
    webhook_id = request.match_info["webhook_id"]
    found = await request.app[pool_key].fetchrow(
        "SELECT event_type FROM webhook_deliveries WHERE webhook_id = $1 AND endpoint_id = $2",
        webhook_id,
        row["id"],
    )
    if found is None:
        raise ProblemError(404, "delivery-not-found", "Delivery not found")
    outcome = await replay(request.app[pool_key], webhook_id, request[tenant_key].id)
    if outcome == "not-given-up":
        raise ProblemError(
            409,
            "delivery-not-given-up",
            "Delivery not given up",
            "only a delivery given up on can be replayed",
        )
    return json_response(
        QueuedDelivery(webhook_id=webhook_id, type=found["event_type"], state="pending"), 202
    )


def add_webhook_routes(app: web.Application) -> None:
    app.router.add_post("/v1/webhooks", create)
    app.router.add_get("/v1/webhooks", get_many)
    app.router.add_get("/v1/webhooks/{id}", get_one)
    app.router.add_delete("/v1/webhooks/{id}", delete)
    app.router.add_post("/v1/webhooks/{id}/rotate-secret", rotate_secret)
    app.router.add_post("/v1/webhooks/{id}/test", send_test)
    app.router.add_get("/v1/webhooks/{id}/deliveries", deliveries)
    app.router.add_post("/v1/webhooks/{id}/deliveries/{webhook_id}/replay", replay_delivery)
