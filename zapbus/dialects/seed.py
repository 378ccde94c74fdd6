"""The ``seed`` dialect: the Baileys server of the original plan (and zapbus's simulator).

HTTP: ``POST /sessions {name, webhookUrl}``, ``GET /sessions`` (optional), ``GET/DELETE
/sessions/{name}``, ``POST /sessions/{name}/pairing-code {phoneNumber}``, ``GET /health``,
header ``X-API-Key``; bodies ``{"success": true, "data": ...}`` or ``{"success": false,
"error": "..."}``.

Webhooks: ``{"event", "session", "data"}`` with field variants seen in Baileys-based servers:
the QR in ``qr`` / ``qrCode`` / ``code``; the status in ``status`` / ``connection`` /
``state``; a code in ``code`` / ``statusCode`` / ``statusReason`` /
``lastDisconnect.error.output.statusCode``; raw Baileys ``connection.update`` bodies (only
``qr``, or only ``isNewLogin`` ...). Deliveries are de-duplicated by ``webhook-id`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from zapbus.dialects.base import (
    CreateSessionRequest,
    CreateSessionResult,
    Dialect,
    Health,
    ServerSession,
    sessions_figure,
)
from zapbus.dialects.errors import RetryableError
from zapbus.dialects.http import (
    ALREADY_EXISTS,
    NOT_FOUND,
    Answer,
    call,
    session_from,
    session_items,
    sessions_from,
)
from zapbus.dialects.reports import (
    Delivery,
    PairingCodeReport,
    PayloadError,
    QrReport,
    Report,
    Unknown,
    checked_qr,
    connection_state,
    decode_object,
    first,
)

QR_EVENTS = frozenset({"qr.update", "qr", "qr.updated", "connection.qr", "qrcode.updated"})
STATUS_EVENTS = frozenset(
    {"session.status", "connection.update", "status", "session.update", "connection.status"}
)
CODE_EVENTS = frozenset({"pairing.code", "pairing_code", "code.update"})


class SeedDialect(Dialect):
    kind = "seed"

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    async def _call(self, method: str, path: str, long: bool = False, json: Any = None) -> Answer:
        timeout = self.timeout if long else self.short_timeout
        return await call(self.http, method, self.base_url + path, self._headers(), timeout, json)

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        answer = await self._call(
            "POST", "/sessions", long=True, json={"name": req.name, "webhookUrl": req.webhook_url}
        )
        if answer.status == 409:
            return CreateSessionResult(already_existed=True)
        if answer.failed and answer.status < 300 and ALREADY_EXISTS.search(answer.detail):
            return CreateSessionResult(already_existed=True)
        if answer.status in (200, 201, 202) and not answer.failed:
            return CreateSessionResult(already_existed=False)
        raise answer.error()

    async def list_sessions(self) -> list[ServerSession] | None:
        """Every session the server holds; None when it has no list route (404 or 405).

        Items the server describes in a way we cannot read are counted, not listed (the list
        is then not complete).
        """
        answer = await self._call("GET", "/sessions")
        if answer.status in (404, 405):
            return None
        if not 200 <= answer.status < 300 or answer.failed:
            raise answer.error()
        items = session_items(answer.body)
        if items is None:
            raise RetryableError(
                f"baileys answered {answer.status} to GET /sessions with no list of sessions:"
                f" {answer.text[:200]}",
                answer.status,
            )
        return sessions_from(items)

    async def get_session(self, name: str) -> ServerSession | None:
        answer = await self._call("GET", f"/sessions/{quote(name, safe='')}")
        if answer.status == 404 or (answer.failed and NOT_FOUND.search(answer.detail)):
            return None
        if not 200 <= answer.status < 300 or answer.failed:
            raise answer.error()
        body = answer.body
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body = body["data"]
        found = session_from(body, name) if isinstance(body, dict) else None
        return ServerSession(name, found.state if found else None)

    async def delete_session(self, name: str) -> bool:
        answer = await self._call("DELETE", f"/sessions/{quote(name, safe='')}")
        if answer.status == 404 or (answer.failed and NOT_FOUND.search(answer.detail)):
            return False
        if answer.status in (200, 202, 204) and not answer.failed:
            return True
        raise answer.error()

    async def request_pairing_code(self, name: str, phone_number: str) -> str:
        answer = await self._call(
            "POST",
            f"/sessions/{quote(name, safe='')}/pairing-code",
            json={"phoneNumber": phone_number.lstrip("+")},
        )
        if not 200 <= answer.status < 300 or answer.failed:
            raise answer.error()
        data = answer.body.get("data") if isinstance(answer.body, dict) else None
        _, code = first(data if isinstance(data, dict) else {}, "code", "pairingCode")
        if not isinstance(code, str) or not code.strip():
            raise RetryableError(f"no pairing code in the answer: {answer.text[:200]}")
        return code.strip()

    async def healthy(self) -> bool:
        return (await self.health()).up

    async def health(self) -> Health:
        """``GET /health`` -> ``{status, sessions}``."""
        try:
            answer = await self._call("GET", "/health")
        except RetryableError:
            return Health(up=False)
        if answer.status != 200 or answer.failed:
            return Health(up=False)
        return Health(up=True, sessions=sessions_figure(answer.body))

    @classmethod
    def parse_webhook(cls, body: bytes, headers: Mapping[str, str], secret: str) -> Delivery:
        doc = decode_object(body)
        event = doc.get("event", doc.get("type"))
        if not isinstance(event, str) or not event:
            raise PayloadError("event", "must be a non-empty string")
        session = doc.get("session", doc.get("sessionId"))
        if session is not None and not isinstance(session, str):
            raise PayloadError("session", "must be a string")
        reports = _reports(event, doc)
        return Delivery(session=session, reports=reports, delivery_id=headers.get("webhook-id"))


def _reports(event: str, doc: dict[str, Any]) -> list[Report]:
    if event not in QR_EVENTS | STATUS_EVENTS | CODE_EVENTS:
        return [Unknown(name=event[:100])]
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise PayloadError("data", "must be a JSON object")
    if event in QR_EVENTS:
        key, qr = first(data, "qr", "qrCode", "code")
        return [QrReport(qr=checked_qr(qr, f"data.{key}"))]
    if event in CODE_EVENTS:
        key, code = first(data, "code", "pairingCode")
        if not isinstance(code, str) or not code.strip() or len(code) > 32:
            raise PayloadError(f"data.{key}", "must be a short non-empty string")
        return [PairingCodeReport(code=code.strip())]
    return connection_state(data) or [Unknown(name=event[:100])]
