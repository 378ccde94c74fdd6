"""The simulator speaking the ``fazer`` dialect (fazer-ai baileys-api v3).

``POST /connections/{phone} {"webhookUrl", "webhookVerifyToken"}`` (200, no body; a phone
already live with the same webhook URL is answered 200 again, with another URL it is replaced:
a fresh connection of a higher epoch), ``DELETE /connections/{phone}`` (404 "Phone number not
found"), ``GET /status`` (no API key); header ``x-api-key``; refused input is 422 as fazer's
validator answers it. The session's name in the simulator (``/_sim/sessions/{name}/...``) is its
phone number.

Webhooks ``{"event": "connection.update", "data": {..., "epoch"}, "webhookVerifyToken"}``, as
fazer rewrites Baileys' connection state: closes it reconnects after (515 after a scan, 428)
become ``{"connection": "reconnecting"}`` without a code; only 401 and 408 "QR refs attempts
ended" arrive as ``close`` with ``lastDisconnect``. It has no pairing code. With
``whatsapp_unreachable`` (SimConfig) a connection shows no QR: ten ``reconnecting``, then
``{"error": "reconnect_loop_detected"}``, and the phone is forgotten (DELETE: 404), as the
real server does when it cannot reach WhatsApp.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from services.baileys_sim.dialects.base import SimDialect, SimEvent, Webhook
from services.baileys_sim.dialects.common import read_json, registry_of, valid_webhook_url

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SimSession

_PHONE = re.compile(r"\+\d{5,15}")
RECONNECT_LIMIT = 10  # fazer's handleReconnecting gives up on the 11th reconnect in a row
_QR_DATA_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"  # noqa: E501


def _invalid(field: str, message: str) -> web.Response:
    """A refusal shaped like Elysia's validation error (fazer's framework)."""
    return web.json_response({"type": "validation", "on": field, "message": message}, status=422)


def _closed(code: int, error: str, message: str) -> dict[str, Any]:
    """``lastDisconnect`` as it reaches the webhook: a Boom serialized by JSON.stringify (its
    ``message`` is not enumerable: only ``output.payload.message`` carries the text)."""
    return {
        "connection": "close",
        "lastDisconnect": {
            "error": {
                "data": None,
                "isBoom": True,
                "isServer": code >= 500,
                "output": {
                    "statusCode": code,
                    "payload": {"statusCode": code, "error": error, "message": message},
                    "headers": {},
                },
            },
            "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        },
    }


class FazerSim(SimDialect):
    kind = "fazer"
    api_key_header = "x-api-key"

    def __init__(self) -> None:
        # The lease epoch of each phone: raised by every create (an explicit POST takes the
        # connection over under a new lease), never lowered.
        self.epochs: dict[str, int] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/connections/{phone}", self.create_connection),
            web.delete("/connections/{phone}", delete_connection),
            web.get("/status", status),
        ]

    def protects(self, path: str) -> bool:
        return path.startswith("/connections/")

    def render(self, session: SimSession, event: SimEvent) -> list[Webhook]:
        datas: list[dict[str, Any]]
        match event.what:
            case "connecting":
                datas = [{"connection": "connecting"}]
            case "qr":
                datas = [{"qr": event.qr, "connection": "connecting", "qrDataUrl": _QR_DATA_URL}]
            case "restart_required":
                # isNewLogin after the scan, then the 515 close: both hidden as reconnecting.
                datas = [{"connection": "reconnecting"}, {"connection": "reconnecting"}]
            case "connected":
                datas = [{"connection": "open"}]
            case "closed":
                datas = [{"connection": "reconnecting"}]
            case "logged_out":
                datas = [_closed(401, "Unauthorized", "Stream Errored (conflict)")]
            case "qr_refs_ended":
                datas = [_closed(408, "Request Time-out", "QR refs attempts ended")]
            case "pairing_code":
                datas = []  # fazer has no pairing code
            case "gave_up":
                # Every close (408 ENOTFOUND here) is hidden as "reconnecting"; the 11th in a
                # row trips its guard: it stops and forgets the connection (DELETE: 404).
                datas = [{"connection": "reconnecting"}] * RECONNECT_LIMIT
                datas.append({"error": "reconnect_loop_detected"})
        epoch = self.epochs.get(session.name, 1)
        return [
            Webhook(
                body={
                    "event": "connection.update",
                    "data": {**data, "epoch": epoch},
                    "webhookVerifyToken": session.secret,
                }
            )
            for data in datas
        ]

    async def create_connection(self, request: web.Request) -> web.Response:
        """``POST /connections/{phone}``: connect (slowly), or re-answer a live phone."""
        phone = request.match_info["phone"]
        if not _PHONE.fullmatch(phone):
            return _invalid("params", "phoneNumber must match ^\\+\\d{5,15}$")
        body = await read_json(request)
        if body is None:
            return _invalid("body", "invalid json body")
        url, token = body.get("webhookUrl"), body.get("webhookVerifyToken")
        if not valid_webhook_url(url):
            return _invalid("body", "webhookUrl must be a uri")
        if not isinstance(token, str) or len(token) < 6:
            return _invalid("body", "webhookVerifyToken must have at least 6 characters")
        registry = registry_of(request)
        live = registry.live.get(phone)
        if live is not None:
            if live.webhook_url == url:
                live.secret = token
                return web.Response(status=200)
            registry.delete(phone)  # another webhook: a fresh connection under a new lease
        self.epochs[phone] = self.epochs.get(phone, 0) + 1
        match await registry.create_flow(phone, url, secret=token, phone_number=phone):
            case "exists":  # a create of this phone is under way
                return web.Response(status=200)
            case "shutting_down":
                return web.Response(text="Something went wrong", status=500)
            case "failed":
                return web.Response(text="Something went wrong", status=500)
        return web.Response(status=200)


async def delete_connection(request: web.Request) -> web.Response:
    """``DELETE /connections/{phone}``: log out and forget the connection."""
    match registry_of(request).delete_flow(request.match_info["phone"]):
        case "failed":
            return web.Response(text="Something went wrong", status=500)
        case "missing":
            return web.Response(text="Phone number not found", status=404)
    return web.Response(status=200)


async def status(request: web.Request) -> web.Response:
    """``GET /status``: the server's configuration summary (fazer asks no API key here)."""
    return web.json_response({"packageInfo": {"name": "baileys-api", "version": "sim"}})


DIALECT = FazerSim()
