"""The simulator speaking the ``evolution`` dialect (Evolution API v2.3 / 2.4).

``POST /instance/create``, ``GET /instance/connectionState/{name}``, ``GET
/instance/fetchInstances``, ``GET /instance/connect/{name}?number=``, ``DELETE
/instance/logout/{name}``, ``DELETE /instance/delete/{name}``, ``GET /``; header ``apikey``.
Errors as Evolution's: ``{"status", "error", "response": {"message": [...]}}``.

Webhooks ``{"event", "instance", "data", "destination", "date_time", "sender", "server_url",
"apikey"}`` as Evolution sends them (``whatsapp.baileys.service.ts``, ``connectionUpdate``):
a reconnectable close (515 after a scan, 428) is not reported, only the ``connecting`` of the
reconnect; a final close (401) is ``status.instance`` + ``logout.instance`` +
``connection.update`` ``close``; the QR limit is a ``qrcode.updated`` carrying a message and
``statusCode`` 500, then ``state: "refused"`` with ``statusReason`` 428.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from services.baileys_sim.dialects.base import SimDialect, SimEvent, Webhook
from services.baileys_sim.dialects.common import (
    read_json,
    registry_of,
    valid_name,
    valid_webhook_url,
)

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SimSession

SERVER_URL = "http://localhost:8080"
LINKED_WUID = "5511999990000@s.whatsapp.net"
QR_LIMIT_MESSAGE = "QR code limit reached, please login again"
_STATES = {"connecting": "connecting", "qr": "connecting", "connected": "open"}
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}


def _fail(status: int, message: str) -> web.Response:
    body = {
        "status": status,
        "error": _REASONS.get(status, "Error"),
        "response": {"message": [message]},
    }
    return web.json_response(body, status=status)


def _now() -> str:
    """Evolution's ``date_time``: local time written as if it were UTC."""
    return datetime.now().isoformat(timespec="milliseconds") + "Z"


def _state(session: SimSession) -> str:
    return _STATES.get(session.status, "close")


def _hook(session: SimSession, event: str, data: Any) -> Webhook:
    connected = session.status == "connected"
    return Webhook(
        body={
            "event": event,
            "instance": session.name,
            "data": data,
            "destination": session.webhook_url,
            "date_time": _now(),
            "sender": LINKED_WUID if connected else None,
            "server_url": SERVER_URL,
            "apikey": None,  # AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES off
        }
    )


def _connection(session: SimSession, state: str, status_reason: int, **extra: Any) -> Webhook:
    data = {"instance": session.name, "state": state, "statusReason": status_reason, **extra}
    return _hook(session, "connection.update", data)


def _qrcode(session: SimSession, qr: str | None, code: str | None) -> Webhook:
    data = {
        "qrcode": {
            "instance": session.name,
            "pairingCode": code,
            "code": qr,
            "base64": "data:image/png;base64,iVBORw0KGgo=",
        }
    }
    return _hook(session, "qrcode.updated", data)


class EvolutionSim(SimDialect):
    kind = "evolution"
    api_key_header = "apikey"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", welcome),
            web.post("/instance/create", create_instance),
            web.get("/instance/connectionState/{name}", connection_state),
            web.get("/instance/fetchInstances", fetch_instances),
            web.get("/instance/connect/{name}", connect),
            web.delete("/instance/logout/{name}", logout),
            web.delete("/instance/delete/{name}", delete_instance),
        ]

    def protects(self, path: str) -> bool:
        return path == "/instance" or path.startswith("/instance/")

    def render(self, session: SimSession, event: SimEvent) -> list[Webhook]:
        match event.what:
            case "connecting" | "restart_required" | "closed":
                # A reconnectable close (515 after a scan, 428) is never reported: Evolution
                # reconnects at once and reports only the new socket's "connecting".
                return [_connection(session, "connecting", 200)]
            case "qr":
                return [_qrcode(session, event.qr, session.pairing_code)]
            case "pairing_code":
                return [_qrcode(session, session.qr, event.code)]
            case "connected":
                return [
                    _connection(
                        session,
                        "open",
                        200,
                        wuid=LINKED_WUID,
                        profileName="Sim Phone",
                        profilePictureUrl=None,
                    )
                ]
            case "logged_out":
                close = {"error": {"output": {"statusCode": 401}}, "date": _now()}
                status = {
                    "instance": session.name,
                    "status": "closed",
                    "disconnectionAt": _now(),
                    "disconnectionReasonCode": 401,
                    "disconnectionObject": json.dumps(close),
                }
                return [
                    _hook(session, "status.instance", status),
                    _hook(session, "logout.instance", None),
                    _connection(session, "close", 401),
                ]
            case "qr_refs_ended":
                limit = {"message": QR_LIMIT_MESSAGE, "statusCode": 500}
                return [
                    _hook(session, "qrcode.updated", limit),
                    _connection(
                        session,
                        "refused",
                        428,
                        wuid=None,
                        profileName=None,
                        profilePictureUrl=None,
                    ),
                ]
        return []


async def welcome(request: web.Request) -> web.Response:
    """``GET /``: Evolution's unauthenticated welcome."""
    return web.json_response(
        {
            "status": 200,
            "message": "Welcome to the Evolution API, it is working!",
            "version": "2.3.6",
            "clientName": "baileys_sim",
            "documentation": "https://doc.evolution-api.com",
        }
    )


async def create_instance(request: web.Request) -> web.Response:
    """``POST /instance/create``: reserve the name, wait the create delay, then create."""
    body = await read_json(request)
    if body is None:
        return _fail(400, "invalid json body")
    name = body.get("instanceName")
    if not valid_name(name):
        return _fail(400, "instanceName is invalid")
    if body.get("integration") != "WHATSAPP-BAILEYS":
        return _fail(400, "Invalid integration")
    webhook = body.get("webhook")
    url = webhook.get("url") if isinstance(webhook, dict) else None
    if not valid_webhook_url(url):
        return _fail(400, 'Invalid "url" property')
    number = body.get("number")
    if number is not None and not (isinstance(number, str) and number.isdigit()):
        return _fail(400, "number must be digits")
    registry = registry_of(request)
    match await registry.create_flow(name, url, phone_number=number):
        case "exists":
            return _fail(403, f'This name "{name}" is already in use.')
        case "shutting_down":
            return _fail(500, "shutting down")
        case "failed":
            return _fail(500, "internal error")
    session = registry.live.get(name)
    code = registry.pairing_code(name, number) if number else None
    return web.json_response(
        {
            "instance": {
                "instanceName": name,
                "instanceId": str(uuid.uuid4()),
                "integration": "WHATSAPP-BAILEYS",
                "status": _state(session) if session else "close",
            },
            "hash": uuid.uuid4().hex.upper(),
            "webhook": {
                "webhookUrl": url,
                "webhookByEvents": webhook.get("byEvents") if isinstance(webhook, dict) else None,
                "webhookBase64": webhook.get("base64") if isinstance(webhook, dict) else None,
            },
            "qrcode": {
                "pairingCode": code,
                "code": session.qr if session else None,
                "count": session.qr_count if session else 0,
            },
        },
        status=201,
    )


async def connection_state(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    session = registry_of(request).live.get(name)
    if session is None:
        return _fail(404, f'The "{name}" instance does not exist')
    return web.json_response({"instance": {"instanceName": name, "state": _state(session)}})


async def fetch_instances(request: web.Request) -> web.Response:
    """``GET /instance/fetchInstances``: v2's list of instance records."""
    registry = registry_of(request)
    if not registry.config.list_route:
        return _fail(404, "Cannot GET /instance/fetchInstances")
    return web.json_response(
        [
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, s.name)),
                "name": s.name,
                "connectionStatus": _state(s),
                "ownerJid": LINKED_WUID if s.status == "connected" else None,
                "integration": "WHATSAPP-BAILEYS",
                "number": s.phone_number,
                "clientName": "baileys_sim",
            }
            for s in registry.live.values()
        ]
    )


async def connect(request: web.Request) -> web.Response:
    """``GET /instance/connect/{name}?number=``: the QR and, with a number, a pairing code
    (``{"count": 0}`` until the socket shows a QR)."""
    name = request.match_info["name"]
    registry = registry_of(request)
    session = registry.live.get(name)
    if session is None:
        return _fail(404, f'The "{name}" instance does not exist')
    if session.status == "connected":
        return web.json_response({"instance": {"instanceName": name, "state": "open"}})
    if session.status != "qr":
        return web.json_response({"count": 0})
    number = request.query.get("number")
    code = registry.pairing_code(name, number) if number else session.pairing_code
    return web.json_response({"pairingCode": code, "code": session.qr, "count": session.qr_count})


async def logout(request: web.Request) -> web.Response:
    """``DELETE /instance/logout/{name}``. Evolution answers 400 "not connected" for an
    instance in state ``close``, which a live simulated session never is. The simulated
    instance stays until it is deleted, without webhooks (they would reach a row that is
    already being deleted)."""
    name = request.match_info["name"]
    if name not in registry_of(request).live:
        return _fail(404, f'The "{name}" instance does not exist')
    return web.json_response(
        {"status": "SUCCESS", "error": False, "response": {"message": "Instance logged out"}}
    )


async def delete_instance(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    match registry_of(request).delete_flow(name):
        case "failed":
            return _fail(500, "internal error")
        case "missing":
            return _fail(404, f'The "{name}" instance does not exist')
    return web.json_response(
        {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
    )


DIALECT = EvolutionSim()
