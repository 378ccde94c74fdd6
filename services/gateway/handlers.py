"""The ``/v1/connections`` routes. None of them waits for the Baileys server."""

from __future__ import annotations

import uuid

import asyncpg
import msgspec
from aiohttp import web

from proto.changes import ConnectionChanged
from services.gateway import client_tokens, qr, sse
from services.gateway.app_keys import hub_key, qr_renderer_key, relay_key, stream_slots_key
from services.gateway.auth import client_token_key, tenant_key, token_signing_key
from services.gateway.lifecycle import (
    CodeNotAvailable,
    ConnectionDeleted,
    IdempotencyConflict,
    PhoneInUse,
    PhoneNumberRequired,
    TooSoon,
    create_connection,
    delete_connection,
    recreate_connection,
    request_pairing_code,
)
from services.gateway.models import (
    ClientTokenIssued,
    ClientTokenRequest,
    ConnectionList,
    History,
    QrCode,
    RecreateConnection,
    client_token_decoder,
    create_decoder,
    recreate_decoder,
)
from services.gateway.store import get_connection, history, list_connections
from zapbus.connection.states import Status
from zapbus.connection.writer import change_from
from zapbus.dialects import dialect_class
from zapbus.httpkit import ProblemError, json_response
from zapbus.runtime import pool_key, settings_key

MAX_IDEMPOTENCY_KEY = 200
HISTORY_LIMIT, HISTORY_MAX_LIMIT = 100, 500


def _connection_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise _not_found() from None


def _not_found() -> ProblemError:
    # The same answer for "does not exist" and "belongs to another tenant".
    return ProblemError(404, "connection-not-found", "Connection not found")


async def create(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        req = create_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProblemError(422, "invalid-body", "Invalid request body", str(exc)) from None
    except msgspec.DecodeError:
        raise ProblemError(
            400, "malformed-json", "Malformed JSON", 'send a JSON object like {"name": "sales"}'
        ) from None
    name = req.name.strip()
    if not name or not name.isprintable():
        raise ProblemError(
            422,
            "invalid-body",
            "Invalid request body",
            "name must contain printable characters",
            field="name",
        )
    idem = request.headers.get("Idempotency-Key")
    if idem is not None and not (0 < len(idem) <= MAX_IDEMPOTENCY_KEY and idem.isprintable()):
        raise ProblemError(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            f"1 to {MAX_IDEMPOTENCY_KEY} printable characters",
        )
    _check_login(request, req.login, req.phone_number)
    one_per_phone = _one_per_phone(request)
    if one_per_phone and req.phone_number is None:
        raise _phone_required(request)
    tenant = request[tenant_key]
    try:
        connection, created = await create_connection(
            request.app[pool_key],
            request.app[settings_key].names,
            tenant.id,
            name,
            idem,
            req.login,
            req.phone_number,
            one_per_phone=one_per_phone,
        )
    except IdempotencyConflict:
        raise ProblemError(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this key was used with a different request body",
        ) from None
    except PhoneInUse as exc:
        raise _phone_in_use(request, exc) from None
    if created:
        request.app[relay_key].kick()
    location = f"/v1/connections/{connection.id}"
    return json_response(connection, status=202, headers={"Location": location})


def _one_per_phone(request: web.Request) -> bool:
    """Does the Baileys server key sessions by phone number, one per phone (fazer)?"""
    return dialect_class(request.app[settings_key].baileys_kind).keys_by_phone


def _phone_required(request: web.Request) -> ProblemError:
    kind = request.app[settings_key].baileys_kind
    return ProblemError(
        422,
        "invalid-body",
        "Invalid request body",
        f"the Baileys server ({kind}) keys connections by phone number: phone_number is"
        " required, in E.164 (e.g. +5511987654321)",
        field="phone_number",
    )


def _phone_in_use(request: web.Request, exc: PhoneInUse) -> ProblemError:
    kind = request.app[settings_key].baileys_kind
    return ProblemError(
        409,
        "phone-in-use",
        "Phone number in use",
        f"the Baileys server ({kind}) holds one connection per phone number and connection"
        f" {exc.connection_id} uses this one: delete it first (or recreate it)",
        connection_id=str(exc.connection_id),
    )


def _check_login(
    request: web.Request, login: str | None, phone_number: str | None, needs_phone: bool = True
) -> None:
    """Code login needs a phone number and a server that can give codes (else 422)."""
    if login != "code":
        return
    if phone_number is None and needs_phone:
        raise ProblemError(
            422,
            "invalid-body",
            "Invalid request body",
            'login "code" needs phone_number, in E.164 (e.g. +5511987654321)',
            field="phone_number",
        )
    kind = request.app[settings_key].baileys_kind
    if not dialect_class(kind).code_login:
        raise ProblemError(
            422,
            "login-method-unsupported",
            "Login method unsupported",
            f'the Baileys server ({kind}) cannot link by pairing code; use login "qr"',
            field="login",
        )


async def get_one(request: web.Request) -> web.Response:
    connection = await get_connection(
        request.app[pool_key], request[tenant_key].id, _connection_id(request)
    )
    if connection is None:
        raise _not_found()
    return json_response(connection)


def _limit(request: web.Request, default: int, maximum: int) -> int:
    """The ``limit`` query parameter, 1 to ``maximum``; 400 otherwise."""
    raw_limit = request.query.get("limit", str(default))
    try:
        # digits only: int() would also take " 5", "+5", "1_0" and non-ASCII digits
        if not (raw_limit.isascii() and raw_limit.isdigit()):
            raise ValueError
        limit = int(raw_limit)
        if not 1 <= limit <= maximum:
            raise ValueError
    except ValueError:
        raise ProblemError(
            400,
            "invalid-query",
            "Invalid query",
            f"limit must be an integer from 1 to {maximum}",
            field="limit",
        ) from None
    return limit


def _bad_cursor() -> ProblemError:
    return ProblemError(
        400,
        "invalid-query",
        "Invalid query",
        "cursor is not one this API handed out",
        field="cursor",
    )


async def get_many(request: web.Request) -> web.Response:
    limit = _limit(request, 50, 200)
    try:
        items, cursor = await list_connections(
            request.app[pool_key], request[tenant_key].id, limit, request.query.get("cursor")
        )
    except (ValueError, asyncpg.DataError):
        # DataError: a forged cursor whose timestamp Postgres cannot take (out of range)
        raise _bad_cursor() from None
    return json_response(ConnectionList(items=items, next_cursor=cursor))


async def get_history(request: web.Request) -> web.Response:
    connection_id = _connection_id(request)
    limit = _limit(request, HISTORY_LIMIT, HISTORY_MAX_LIMIT)
    try:
        page = await history(
            request.app[pool_key],
            request[tenant_key].id,
            connection_id,
            limit,
            request.query.get("cursor"),
        )
    except ValueError:
        raise _bad_cursor() from None
    if page is None:
        raise _not_found()
    entries, cursor = page
    return json_response(History(items=entries, next_cursor=cursor))


async def new_pairing_code(request: web.Request) -> web.Response:
    """``POST /v1/connections/{id}/pairing-code``: ask for a new code (code login, not linked
    yet); rate-limited. The code arrives on the resource and as an SSE event."""
    settings = request.app[settings_key]
    try:
        connection = await request_pairing_code(
            request.app[pool_key],
            settings.names,
            request[tenant_key].id,
            _connection_id(request),
            settings.pairing_code_min_interval_seconds,
        )
    except CodeNotAvailable as exc:
        raise ProblemError(
            409, "pairing-code-unavailable", "No pairing code now", exc.why, status_now=exc.status
        ) from None
    except TooSoon as exc:
        err = ProblemError(
            429,
            "too-many-requests",
            "Too many requests",
            f"a new code was asked for recently; try again in {exc.retry_after} s",
        )
        err.response.headers["Retry-After"] = str(exc.retry_after)
        raise err from None
    if connection is None:
        raise _not_found()
    request.app[relay_key].kick()
    return json_response(connection, status=202)


async def recreate(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        req = recreate_decoder.decode(body) if body.strip() else RecreateConnection()
    except msgspec.ValidationError as exc:
        raise ProblemError(422, "invalid-body", "Invalid request body", str(exc)) from None
    except msgspec.DecodeError:
        raise ProblemError(400, "malformed-json", "Malformed JSON", "send a JSON object") from None
    # the phone number may be the row's own (checked in the transaction)
    _check_login(request, req.login, req.phone_number, needs_phone=False)
    one_per_phone = _one_per_phone(request)
    try:
        connection = await recreate_connection(
            request.app[pool_key],
            request.app[settings_key].names,
            request[tenant_key].id,
            _connection_id(request),
            req.login,
            req.phone_number,
            one_per_phone=one_per_phone,
        )
    except PhoneNumberRequired:
        if one_per_phone:
            raise _phone_required(request) from None
        raise ProblemError(
            422,
            "invalid-body",
            "Invalid request body",
            'login "code" needs phone_number, in E.164 (e.g. +5511987654321)',
            field="phone_number",
        ) from None
    except PhoneInUse as exc:
        raise _phone_in_use(request, exc) from None
    except ConnectionDeleted:
        raise ProblemError(
            409,
            "connection-deleted",
            "Connection deleted",
            "a deleted connection cannot be recreated; create a new one",
        ) from None
    if connection is None:
        raise _not_found()
    request.app[relay_key].kick()
    return json_response(
        connection, status=202, headers={"Location": f"/v1/connections/{connection.id}"}
    )


async def delete(request: web.Request) -> web.Response:
    connection = await delete_connection(
        request.app[pool_key],
        request.app[settings_key].names,
        request[tenant_key].id,
        _connection_id(request),
    )
    if connection is None:
        raise _not_found()
    request.app[relay_key].kick()
    return json_response(connection, status=202)


async def get_qr(request: web.Request) -> web.Response:
    connection = await get_connection(
        request.app[pool_key], request[tenant_key].id, _connection_id(request)
    )
    if connection is None:
        raise _not_found()
    media = qr.negotiate(request.headers.get("Accept", ""))
    if media is None:
        raise ProblemError(
            406, "not-acceptable", "Not acceptable", f"offered: {', '.join(qr.OFFERED)}"
        )
    if connection.status != Status.QR_READY or not connection.qr:
        raise ProblemError(
            409,
            "qr-not-ready",
            "QR code not ready",
            f"the connection is {connection.status}",
            status_now=connection.status,
        )
    headers = {"Cache-Control": "no-store", "Vary": "Accept"}
    if media == qr.JSON:
        body = QrCode(
            qr=connection.qr, qr_seq=connection.qr_seq, expires_at=connection.qr_expires_at
        )
        return json_response(body, headers=headers)
    image = await request.app[qr_renderer_key].render(connection.qr, media)
    return web.Response(body=image, content_type=media, headers=headers)


async def get_events(request: web.Request) -> web.StreamResponse:
    pool, tenant_id = request.app[pool_key], request[tenant_key].id
    connection_id = _connection_id(request)
    claims = request.get(client_token_key)
    # 429 past the tenant's limit, or past the client tokens' limit of the connection
    token_connection = None if claims is None else connection_id
    with request.app[stream_slots_key].take(tenant_id, token_connection):
        if await get_connection(pool, tenant_id, connection_id) is None:
            raise _not_found()

        async def load() -> ConnectionChanged:
            current = await get_connection(pool, tenant_id, connection_id)
            if current is None:
                raise _not_found()
            return change_from(msgspec.structs.asdict(current), "snapshot")

        ends_at = None if claims is None else float(claims.expires)  # a token's stream ends
        return await sse.stream(request, request.app[hub_key], connection_id, load, ends_at)


async def new_client_token(request: web.Request) -> web.Response:
    """``POST /v1/connections/{id}/client-token``: a token that reads only this connection
    (resource, QR, events) until it expires; for a browser, or a link to the person who
    scans (``connect_url``). Checked without the database (client_tokens.py)."""
    body = await request.read()
    try:
        req = client_token_decoder.decode(body) if body.strip() else ClientTokenRequest()
    except msgspec.ValidationError as exc:
        field = "ttl_seconds" if "ttl_seconds" in str(exc) else None
        raise ProblemError(
            422, "invalid-body", "Invalid request body", str(exc), field=field
        ) from None
    except msgspec.DecodeError:
        raise ProblemError(
            400, "malformed-json", "Malformed JSON", 'send a JSON object like {"ttl_seconds": 600}'
        ) from None
    tenant_id, connection_id = request[tenant_key].id, _connection_id(request)
    connection = await get_connection(request.app[pool_key], tenant_id, connection_id)
    if connection is None:
        raise _not_found()
    if connection.status == Status.DELETED:
        raise ProblemError(
            409,
            "connection-deleted",
            "Connection deleted",
            "a deleted connection has nothing to show",
            status_now=connection.status,
        )
    token, claims = client_tokens.mint(
        request.app[token_signing_key], tenant_id, connection_id, req.ttl_seconds
    )
    base = request.app[settings_key].public_gateway_url.rstrip("/")
    issued = ClientTokenIssued(
        token=token, expires_at=claims.expires_at, connect_url=f"{base}/connect/{token}"
    )
    return json_response(issued, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/connections", create)
    app.router.add_get("/v1/connections", get_many)
    app.router.add_get("/v1/connections/{id}", get_one)
    app.router.add_delete("/v1/connections/{id}", delete)
    app.router.add_post("/v1/connections/{id}/recreate", recreate)
    app.router.add_post("/v1/connections/{id}/pairing-code", new_pairing_code)
    app.router.add_get("/v1/connections/{id}/history", get_history)
    app.router.add_get("/v1/connections/{id}/qr", get_qr)
    app.router.add_get("/v1/connections/{id}/events", get_events)
    app.router.add_post("/v1/connections/{id}/client-token", new_client_token)
