"""The simulator speaking the ``waha`` dialect (WAHA 2025-2026, NOWEB engine).

``POST /api/sessions {"name", "start", "config": {"webhooks": [{"url", "events", "hmac":
{"key"}}]}}``, ``GET /api/sessions``, ``GET/DELETE /api/sessions/{name}``, ``POST
/api/{name}/auth/request-code {"phoneNumber"}`` -> ``{"code": "ABCD-ABCD"}``, ``GET
/api/{name}/auth/qr?format=raw`` -> ``{"value"}`` (422 when not showing a QR), ``GET /ping``;
header ``X-Api-Key`` on ``/api/``; errors as NestJS writes them (``{"statusCode", "message",
"error"}``).

Webhooks: ``session.status`` only, in WAHA's envelope, with the session's recent ``statuses``;
the QR is never sent (a ``SCAN_QR_CODE`` per new QR, to be fetched). Signed with
``X-Webhook-Hmac`` (hex HMAC-SHA512 of the body with the create's ``hmac.key``). What happens
to a session, as WAHA's NOWEB engine reports it: the socket opens = STARTING, a QR =
SCAN_QR_CODE, the 515 restart after a scan and a dropped connection = STARTING (WAHA restarts
the client), connected = WORKING, logged out from the phone and the QR limit = FAILED, a
pairing code = nothing (it is the answer to request-code).

With ``waha_core`` set it answers as WAHA Core (2024.10) does: every session but ``default``
is refused with Core's 422 (create, delete, auth routes) while its ``GET`` is a 404,
``GET /api/server/version`` says ``"tier": "CORE"`` (``"PLUS"`` otherwise), and webhooks
carry no HMAC (signing is a Plus feature there).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from services.baileys_sim.dialects.base import Happening, SimDialect, SimEvent, Webhook
from services.baileys_sim.dialects.common import (
    read_json,
    registry_of,
    valid_name,
    valid_webhook_url,
)

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SimSession

ENGINE = "NOWEB"
VERSION = "2026.1.1"
CORE_VERSION = "2024.10.8"
CORE_ONLY = "default"  # the one session name WAHA Core accepts
# WAHA Core's words for any other name (its OnlyDefaultSessionIsAllowed, 422)
CORE_REFUSAL = (
    "WAHA Core support only 'default' session. If you want to run more then one WhatsApp"
    " account - please get WAHA PLUS version. Check this out: https://waha.devlike.pro/"
)
KEPT_STATUSES = 10  # how many recent statuses a webhook's payload.statuses carries

_STATUS_OF: dict[Happening, str | None] = {
    "connecting": "STARTING",
    "qr": "SCAN_QR_CODE",
    "restart_required": "STARTING",
    "connected": "WORKING",
    "closed": "STARTING",
    "logged_out": "FAILED",
    "qr_refs_ended": "FAILED",
    "pairing_code": None,
}
# The registry's session status -> WAHA's
_WAHA_STATUS = {"connecting": "STARTING", "qr": "SCAN_QR_CODE", "connected": "WORKING"}


def nest_error(status: int, message: str) -> web.Response:
    """An error as WAHA (NestJS) answers it."""
    phrase = {400: "Bad Request", 404: "Not Found", 422: "Unprocessable Entity"}
    body = {"statusCode": status, "message": message, "error": phrase.get(status, "Error")}
    return web.json_response(body, status=status)


def sign(body: bytes, key: str) -> str:
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


def me_of(session: SimSession) -> dict[str, Any]:
    """The linked account: the code login's phone, else a number derived from the name."""
    digits = (session.phone_number or "").lstrip("+")
    if not digits.isdigit():
        digits = "5511" + str(int(hashlib.sha256(session.name.encode()).hexdigest(), 16))[:9]
    return {"id": f"{digits}@c.us", "pushName": "zapbus sim"}


@dataclass
class _Seen:
    """What the dialect remembers of one session: its recent statuses, whether linked."""

    statuses: list[dict[str, Any]] = field(default_factory=list)
    linked: bool = False


class WahaSim(SimDialect):
    kind = "waha"
    api_key_header = "X-Api-Key"

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[SimSession, _Seen] = weakref.WeakKeyDictionary()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/ping", ping),
            web.get("/api/server/version", server_version),
            web.post("/api/sessions", create_session),
            web.get("/api/sessions", list_sessions),
            web.get("/api/sessions/{name}", get_session),
            web.delete("/api/sessions/{name}", delete_session),
            web.post("/api/{name}/auth/request-code", request_code),
            web.get("/api/{name}/auth/qr", get_qr),
        ]

    def protects(self, path: str) -> bool:
        return path.startswith("/api/")

    def render(self, session: SimSession, event: SimEvent) -> list[Webhook]:
        status = _STATUS_OF[event.what]
        if status is None:
            return []
        seen = self._seen.setdefault(session, _Seen())
        now_ms = int(time.time() * 1000)
        seen.statuses = [*seen.statuses, {"status": status, "timestamp": now_ms}][-KEPT_STATUSES:]
        if status == "WORKING":
            seen.linked = True
        elif status == "FAILED":
            seen.linked = False
        core = not session.secret  # a Core session: created without an HMAC key (unsigned)
        body = {
            "id": f"evt_{uuid.uuid4().hex[:26]}",
            "timestamp": now_ms,
            "event": "session.status",
            "session": session.name,
            "metadata": {},
            "me": me_of(session) if seen.linked else None,
            "payload": {"name": session.name, "status": status, "statuses": seen.statuses},
            "engine": ENGINE,
            "environment": environment(core),
        }
        headers = {
            "X-Webhook-Request-Id": str(uuid.uuid4()),
            "X-Webhook-Timestamp": str(now_ms),
        }
        if session.secret and not core:
            # The registry sends msgspec.json.encode(body): the same bytes as signed here.
            raw = msgspec.json.encode(body)
            headers["X-Webhook-Hmac"] = sign(raw, session.secret)
            headers["X-Webhook-Hmac-Algorithm"] = "sha512"
        return [Webhook(body=body, headers=headers)]

    def snapshot(self, session: SimSession) -> dict[str, Any]:
        """A session as ``GET /api/sessions/{name}`` describes it."""
        status = _WAHA_STATUS.get(session.status, "STARTING")
        return {
            "name": session.name,
            "status": status,
            "config": {"webhooks": [{"url": session.webhook_url, "events": ["session.status"]}]},
            "me": me_of(session) if status == "WORKING" else None,
            "engine": {"engine": ENGINE},
        }


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"message": "pong"})


def environment(core: bool) -> dict[str, Any]:
    """What ``GET /api/server/version`` (and each webhook's ``environment``) says."""
    if core:
        return {"version": CORE_VERSION, "engine": ENGINE, "tier": "CORE", "browser": None}
    return {"version": VERSION, "engine": ENGINE, "tier": "PLUS", "browser": None}


def _core(request: web.Request) -> bool:
    return registry_of(request).config.waha_core


def core_refuses(request: web.Request, name: object) -> web.Response | None:
    """WAHA Core's 422 for a session not named ``default``; None when it is served."""
    if _core(request) and name != CORE_ONLY:
        return nest_error(422, CORE_REFUSAL)
    return None


async def server_version(request: web.Request) -> web.Response:
    return web.json_response(environment(_core(request)))


def _webhook_config(body: dict[str, Any]) -> tuple[str, str] | None:
    """(url, hmac key) of the first webhook of the create's config, None if malformed."""
    config = body.get("config")
    hooks = config.get("webhooks") if isinstance(config, dict) else None
    hook = hooks[0] if isinstance(hooks, list) and hooks else None
    if not isinstance(hook, dict) or not valid_webhook_url(hook.get("url")):
        return None
    hmac_config = hook.get("hmac")
    key = hmac_config.get("key") if isinstance(hmac_config, dict) else None
    return hook["url"], key if isinstance(key, str) else ""


async def create_session(request: web.Request) -> web.Response:
    """``POST /api/sessions``: reserve the name, wait the create delay, then create and start."""
    body = await read_json(request)
    if body is None:
        return nest_error(400, "invalid json body")
    name = body.get("name")
    if refused := core_refuses(request, name):
        return refused
    if not valid_name(name):
        return nest_error(400, "invalid session name")
    hook = _webhook_config(body)
    if hook is None:
        return nest_error(400, "config.webhooks[0].url must be an http(s) URL")
    url, key = hook
    if _core(request):
        key = ""  # Core signs no webhook: it ignores the hmac key
    match await registry_of(request).create_flow(name, url, key):
        case "exists":
            return nest_error(422, f"Session '{name}' already exists. Use PUT to update it.")
        case "shutting_down":
            return nest_error(503, "shutting down")
        case "failed":
            return web.json_response(
                {"statusCode": 500, "message": "Internal server error"}, status=500
            )
    session = registry_of(request).live.get(name)
    snapshot = DIALECT.snapshot(session) if session is not None else {"name": name}
    return web.json_response({**snapshot, "status": "STARTING"}, status=201)


async def list_sessions(request: web.Request) -> web.Response:
    registry = registry_of(request)
    if not registry.config.list_route:
        return nest_error(404, "Cannot GET /api/sessions")
    return web.json_response([DIALECT.snapshot(s) for s in registry.live.values()])


async def get_session(request: web.Request) -> web.Response:
    session = registry_of(request).live.get(request.match_info["name"])
    if session is None:
        return nest_error(404, "Session not found")
    return web.json_response(DIALECT.snapshot(session))


async def delete_session(request: web.Request) -> web.Response:
    """Stop, log out and delete; idempotent (200 for a session that is not there)."""
    if refused := core_refuses(request, request.match_info["name"]):
        return refused
    if registry_of(request).delete_flow(request.match_info["name"]) == "failed":
        return web.json_response(
            {"statusCode": 500, "message": "Internal server error"}, status=500
        )
    return web.Response(status=200)


async def request_code(request: web.Request) -> web.Response:
    """``POST /api/{name}/auth/request-code``: 422 unless the session shows a QR."""
    registry = registry_of(request)
    name = request.match_info["name"]
    if refused := core_refuses(request, name):
        return refused
    body = await read_json(request)
    phone = body.get("phoneNumber") if body is not None else None
    if not isinstance(phone, str) or not phone.strip():
        return nest_error(400, "phoneNumber must be a string")
    session = registry.live.get(name)
    if session is None:
        return nest_error(404, "Session not found")
    status = _WAHA_STATUS.get(session.status, "STARTING")
    code = registry.pairing_code(name, phone)
    if code is None:
        return nest_error(
            422, f"Can request code only in SCAN_QR_CODE status. The current status is {status}"
        )
    return web.json_response({"code": f"{code[:4]}-{code[4:]}"})


async def get_qr(request: web.Request) -> web.Response:
    """``GET /api/{name}/auth/qr?format=raw``: the QR shown now; 422 when none is."""
    if refused := core_refuses(request, request.match_info["name"]):
        return refused
    if request.query.get("format") != "raw":
        return nest_error(400, "the simulator serves format=raw only")
    session = registry_of(request).live.get(request.match_info["name"])
    if session is None:
        return nest_error(404, "Session not found")
    if session.status != "qr" or not session.qr:
        status = _WAHA_STATUS.get(session.status, "STARTING")
        return nest_error(422, f"Session status is not as expected: {status}, not SCAN_QR_CODE")
    return web.json_response({"value": session.qr})


DIALECT = WahaSim()
