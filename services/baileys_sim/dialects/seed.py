"""The simulator speaking the ``seed`` dialect (the original plan's Baileys server).

``POST /sessions {name, webhookUrl}``, ``GET /sessions``, ``GET/DELETE /sessions/{name}``,
``POST /sessions/{name}/pairing-code {phoneNumber}``; ``X-API-Key``; bodies ``{"success": true,
"data": ...}`` / ``{"success": false, "error": ...}``. Webhooks ``{"event": "qr.update" |
"session.status" | "pairing.code", "session", "data"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from services.baileys_sim.dialects.base import SimDialect, SimEvent, Webhook
from services.baileys_sim.dialects.common import (
    fail,
    ok,
    read_json,
    registry_of,
    valid_name,
    valid_webhook_url,
)

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SimSession


def _status(name: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"event": "session.status", "session": name, "data": {"status": status, **extra}}


class SeedSim(SimDialect):
    kind = "seed"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/sessions", create_session),
            web.get("/sessions", list_sessions),
            web.get("/sessions/{name}", get_session),
            web.delete("/sessions/{name}", delete_session),
            web.post("/sessions/{name}/pairing-code", pairing_code),
        ]

    def render(self, session: SimSession, event: SimEvent) -> list[Webhook]:
        name = session.name
        body: dict[str, Any]
        match event.what:
            case "connecting":
                body = _status(name, "connecting")
            case "qr":
                body = {"event": "qr.update", "session": name, "data": {"qr": event.qr}}
            case "pairing_code":
                body = {"event": "pairing.code", "session": name, "data": {"code": event.code}}
            case "restart_required":
                body = _status(name, "close", statusReason=515, reason="restartRequired")
            case "connected":
                body = _status(name, "connected")
            case "closed":
                body = _status(name, "close", statusReason=428, reason="connectionClosed")
            case "logged_out":
                body = _status(name, "close", statusReason=401, reason="loggedOut")
            case "qr_refs_ended":
                body = _status(name, "close", statusReason=408, reason="QR refs attempts ended")
        return [Webhook(body=body)]


async def create_session(request: web.Request) -> web.Response:
    """``POST /sessions``: reserve the name, wait the create delay, then create (or fail)."""
    body = await read_json(request)
    if body is None:
        return fail(400, "invalid json body")
    name = body.get("name")
    if not valid_name(name):
        return fail(400, "invalid session name")
    webhook_url = body.get("webhookUrl")
    if not valid_webhook_url(webhook_url):
        return fail(400, "invalid webhookUrl")
    match await registry_of(request).create_flow(name, webhook_url):
        case "exists":
            return fail(409, "session already exists")
        case "shutting_down":
            return fail(503, "shutting down")
        case "failed":
            return fail(500, "internal error")
    return ok({"name": name, "status": "connecting"}, status=201)


async def list_sessions(request: web.Request) -> web.Response:
    """``GET /sessions``: every live session (404 when the list route is switched off)."""
    registry = registry_of(request)
    if not registry.config.list_route:
        return fail(404, "not found")
    return ok([s.snapshot() for s in registry.live.values()])


async def get_session(request: web.Request) -> web.Response:
    session = registry_of(request).live.get(request.match_info["name"])
    if session is None:
        return fail(404, "session not found")
    return ok(session.snapshot())


async def delete_session(request: web.Request) -> web.Response:
    match registry_of(request).delete_flow(request.match_info["name"]):
        case "failed":
            return fail(500, "internal error")
        case "missing":
            return fail(404, "session not found")
    return ok()


class _CodeRequest(msgspec.Struct):
    phoneNumber: str


async def pairing_code(request: web.Request) -> web.Response:
    """``POST /sessions/{name}/pairing-code``: 428 until the socket is open (first QR)."""
    registry = registry_of(request)
    name = request.match_info["name"]
    try:
        body = msgspec.json.decode(await request.read(), type=_CodeRequest)
    except msgspec.MsgspecError:
        return fail(400, "phoneNumber required")
    if name not in registry.live:
        return fail(404, "session not found")
    code = registry.pairing_code(name, body.phoneNumber)
    if code is None:
        return fail(428, "Connection Closed")
    return ok({"code": code})


DIALECT = SeedSim()
