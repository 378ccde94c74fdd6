"""The ``evolution`` dialect: Evolution API v2.3 / 2.4 (WHATSAPP-BAILEYS instances).

HTTP (header ``apikey``, the server's global key):

- ``POST /instance/create {"instanceName", "integration": "WHATSAPP-BAILEYS", "qrcode": true,
  "webhook": {"url", "byEvents": false, "base64": false, "events": [...]}}`` (plus ``"number"``,
  digits only, for code login) -> ``201``; a name in use is ``403 "This name ... is already in
  use."`` (``400`` in some versions);
- ``GET /instance/connectionState/{name}`` -> ``{"instance": {"instanceName", "state"}}``;
- ``GET /instance/fetchInstances`` -> a list of instances (v2: ``{"name",
  "connectionStatus", ...}``; v1 and the docs' example: ``{"instance": {"instanceName",
  "status"}}``);
- ``DELETE /instance/logout/{name}`` (``400 ... is not connected`` when closed), then
  ``DELETE /instance/delete/{name}``; ``404`` = no such instance;
- ``GET /instance/connect/{name}?number=...`` -> ``{"pairingCode", "code", "count"}``;
- ``GET /`` -> ``{"status": 200, "message": "Welcome to the Evolution API ..."}``.

Errors are ``{"status", "error": "Forbidden", "response": {"message": [...]}}``; the text is in
``response.message``, not in ``error``.

Webhooks: ``{"event", "instance", "data", "date_time", "sender", "server_url", "apikey"}``,
``event`` ``qrcode.updated`` / ``connection.update`` / ``status.instance`` /
``logout.instance`` (some versions: ``QRCODE_UPDATED`` ...). The QR is ``data.qrcode.code``
(``data.qrcode.pairingCode`` carries the code of a code login); status ``data.state`` in ``open
| connecting | close | refused`` with a numeric ``data.statusReason`` (200 = none). A
reconnectable close is never reported (Evolution reconnects silently and then reports
``connecting``). At its QR limit Evolution sends a ``qrcode.updated`` with ``{"message": "QR code
limit reached, please login again", "statusCode": 500}`` and then ``state: "refused"`` with
``statusReason`` 428: both are reported as Baileys' 408 "QR refs attempts ended" (qr_expired),
which is what they mean. ``date_time`` is local time labelled UTC: never read. The session is
``instance``; Evolution gives no delivery id, so nothing is de-duplicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from zapbus.dialects.base import (
    CreateSessionRequest,
    CreateSessionResult,
    Dialect,
    ServerSession,
)
from zapbus.dialects.errors import BaileysError, RetryableError, error_for_status
from zapbus.dialects.http import ALREADY_EXISTS, NOT_FOUND, Answer, call, sessions_from
from zapbus.dialects.reports import (
    Delivery,
    PairingCodeReport,
    PayloadError,
    QrReport,
    Report,
    StatusReport,
    Unknown,
    account_of,
    checked_qr,
    checked_status,
    clean_text,
    decode_object,
    to_code,
)

INTEGRATION = "WHATSAPP-BAILEYS"
WEBHOOK_EVENTS = ("QRCODE_UPDATED", "CONNECTION_UPDATE", "STATUS_INSTANCE", "LOGOUT_INSTANCE")
QR_LIMIT_REASON = "QR refs attempts ended"  # Baileys' words (zapbus/connection/vocabulary.py)
# A create racing another one for the same name fails in Evolution's database.
_EXISTS = re.compile(ALREADY_EXISTS.pattern + r"|unique constraint", re.I)
_NO_CODE = 200  # Evolution's statusReason when there is no disconnect code


def _event_name(event: str) -> str:
    """``QRCODE_UPDATED`` and ``qrcode.updated`` alike -> ``qrcode.updated``."""
    return event.strip().lower().replace("_", ".").replace("-", ".")


def _message(answer: Answer) -> str:
    """What Evolution said: ``response.message`` (a list or a text), else the usual places."""
    body = answer.body
    if isinstance(body, dict):
        response = body.get("response")
        message = response.get("message") if isinstance(response, dict) else None
        if message is None:
            message = body.get("message")
        if isinstance(message, list):
            message = "; ".join(str(m) for m in message if m is not None)
        if isinstance(message, str) and message.strip():
            error = body.get("error")
            return f"{error}: {message}" if isinstance(error, str) and error else message
    return answer.detail


class EvolutionDialect(Dialect):
    kind = "evolution"

    def _headers(self) -> dict[str, str]:
        return {"apikey": self.api_key}

    async def _call(self, method: str, path: str, long: bool = False, json: Any = None) -> Answer:
        timeout = self.timeout if long else self.short_timeout
        return await call(self.http, method, self.base_url + path, self._headers(), timeout, json)

    def _error(self, answer: Answer) -> BaileysError:
        if 200 <= answer.status < 300:
            # A 200 {"error": true, "message": ...} (Evolution's connect catches its errors)
            return RetryableError(f"evolution answered {answer.status}: {_message(answer)}")
        return error_for_status(answer.status, _message(answer))

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        body: dict[str, Any] = {
            "instanceName": req.name,
            "integration": INTEGRATION,
            "qrcode": True,
            "webhook": {
                "url": req.webhook_url,
                "byEvents": False,
                "base64": False,
                "events": list(WEBHOOK_EVENTS),
            },
        }
        if req.login == "code" and req.phone_number:
            body["number"] = _digits(req.phone_number)
        # Evolution answers the create only after it has started the socket (5 s or more).
        answer = await self._call("POST", "/instance/create", long=True, json=body)
        if answer.status in (400, 403, 409) and _EXISTS.search(_message(answer)):
            return CreateSessionResult(already_existed=True)
        if answer.status == 409:
            return CreateSessionResult(already_existed=True)
        if answer.status not in (200, 201):
            raise self._error(answer)
        qrcode = answer.body.get("qrcode") if isinstance(answer.body, dict) else None
        code = qrcode.get("pairingCode") if isinstance(qrcode, dict) else None
        return CreateSessionResult(
            already_existed=False,
            pairing_code=code.strip() if isinstance(code, str) and code.strip() else None,
        )

    async def get_session(self, name: str) -> ServerSession | None:
        answer = await self._call("GET", f"/instance/connectionState/{quote(name, safe='')}")
        if answer.status == 404 or (answer.status == 400 and NOT_FOUND.search(_message(answer))):
            return None
        if not 200 <= answer.status < 300:
            raise self._error(answer)
        instance = answer.body.get("instance") if isinstance(answer.body, dict) else None
        state = instance.get("state") if isinstance(instance, dict) else None
        return ServerSession(name, state if isinstance(state, str) and state else None)

    async def list_sessions(self) -> list[ServerSession] | None:
        """Every instance (of every integration: the reconciler skips names not its own)."""
        answer = await self._call("GET", "/instance/fetchInstances")
        if answer.status in (404, 405):
            return None
        if not 200 <= answer.status < 300:
            raise self._error(answer)
        if not isinstance(answer.body, list):
            raise RetryableError(
                f"evolution answered {answer.status} to GET /instance/fetchInstances with no"
                f" list of instances: {answer.text[:200]}",
                answer.status,
            )
        return sessions_from(answer.body, _listed)

    async def delete_session(self, name: str) -> bool:
        """Log the instance out (so WhatsApp unlinks the device), then delete it. A logout of
        an instance that is not connected answers 400; Evolution's delete also logs out an
        instance that is still open or connecting, so a failed logout is not fatal."""
        path = quote(name, safe="")
        # Whatever the logout answers (400 "not connected", 404, even a 500 from Baileys'
        # logout), the delete decides: it logs out itself and says whether the instance was.
        await self._call("DELETE", f"/instance/logout/{path}")
        answer = await self._call("DELETE", f"/instance/delete/{path}")
        if answer.status == 404 or (answer.status == 400 and NOT_FOUND.search(_message(answer))):
            return False
        if 200 <= answer.status < 300:
            return True
        raise self._error(answer)

    async def request_pairing_code(self, name: str, phone_number: str) -> str:
        answer = await self._call(
            "GET", f"/instance/connect/{quote(name, safe='')}?number={_digits(phone_number)}"
        )
        if not 200 <= answer.status < 300 or (
            isinstance(answer.body, dict) and answer.body.get("error") is True
        ):
            raise self._error(answer)
        body = answer.body if isinstance(answer.body, dict) else {}
        code = body.get("pairingCode")
        if code is None and isinstance(body.get("qrcode"), dict):
            code = body["qrcode"].get("pairingCode")
        if not isinstance(code, str) or not code.strip():
            # {"count": 0}: no socket yet (or already linked); ask again later.
            raise RetryableError(f"no pairing code in the answer: {answer.text[:200]}")
        return code.strip()

    async def healthy(self) -> bool:
        try:
            answer = await self._call("GET", "/")
        except RetryableError:
            return False
        return answer.status == 200

    @classmethod
    def parse_webhook(cls, body: bytes, headers: Mapping[str, str], secret: str) -> Delivery:
        doc = decode_object(body)
        event = doc.get("event")
        if not isinstance(event, str) or not event.strip():
            raise PayloadError("event", "must be a non-empty string")
        session = doc.get("instance")
        if session is not None and not isinstance(session, str):
            raise PayloadError("instance", "must be a string")
        # No delivery id: Evolution gives none (and date_time is never read).
        return Delivery(session=session, reports=_reports(event, doc.get("data")))


def _digits(phone_number: str) -> str:
    """E.164 ``+5511987654321`` as Evolution wants it: ``5511987654321``."""
    return "".join(ch for ch in phone_number if ch.isdigit())


def _listed(item: Any) -> ServerSession | None:
    """One instance of ``fetchInstances``: v2 ``{"name", "connectionStatus"}``, v1
    ``{"instance": {"instanceName", "status"}}``; None when it names none."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("instance"), dict):
        item = item["instance"]
    name = next(
        (v for k in ("name", "instanceName") if isinstance(v := item.get(k), str) and v), None
    )
    if name is None:
        return None
    state = next(
        (
            v
            for k in ("connectionStatus", "state", "status")
            if isinstance(v := item.get(k), str) and v
        ),
        None,
    )
    return ServerSession(name, state)


def _qr_limit(why: str) -> StatusReport:
    """Evolution's QR limit, as the Baileys close that means the same (-> qr_expired)."""
    return StatusReport(status="close", code=408, reason=f"{QR_LIMIT_REASON} ({why})"[:300])


def _reports(event: str, data: Any) -> list[Report]:
    name = _event_name(event)
    unknown: list[Report] = [Unknown(name=event[:100])]
    if name == "logout.instance":  # data is null
        return [StatusReport(status="logged_out", reason="logout.instance")]
    if not isinstance(data, dict):
        return unknown
    if name == "qrcode.updated":
        return _qrcode(data) or unknown
    if name == "connection.update":
        return _connection(data) or unknown
    if name == "status.instance":
        return _status_instance(data) or unknown
    return unknown


def _qrcode(data: dict[str, Any]) -> list[Report]:
    qrcode = data.get("qrcode")
    if isinstance(qrcode, dict):
        reports: list[Report] = []
        code = qrcode.get("pairingCode")
        if code is not None:
            if not isinstance(code, str) or not code.strip() or len(code) > 32:
                raise PayloadError("data.qrcode.pairingCode", "must be a short non-empty string")
            reports.append(PairingCodeReport(code=code.strip()))
        if qrcode.get("code") is not None:
            reports.append(QrReport(qr=checked_qr(qrcode["code"], "data.qrcode.code")))
        return reports
    message = data.get("message")
    if isinstance(message, str) and "limit" in message.lower():
        return [_qr_limit(clean_text(message, 200) or "QR code limit reached")]
    return []


def _connection(data: dict[str, Any]) -> list[Report]:
    state = data.get("state")
    if state is None:
        return []
    state = checked_status(state, "data.state")
    code = to_code(data.get("statusReason"), "data.statusReason")
    if state.strip().lower() == "refused":
        # Sent right after the QR limit message, with statusReason 428.
        return [_qr_limit(f"refused, statusReason {code}")]
    phone, name = account_of(data)
    return [
        StatusReport(
            status=state,
            code=None if code == _NO_CODE else code,
            account_phone=phone,
            account_name=name,
        )
    ]


def _status_instance(data: dict[str, Any]) -> list[Report]:
    """``{"instance", "status": "closed", "disconnectionReasonCode": 401, ...}`` when a close
    is final (401, 403, 402, 406)."""
    status = data.get("status")
    if status is None:
        return []
    status = checked_status(status, "data.status")
    code = to_code(data.get("disconnectionReasonCode"), "data.disconnectionReasonCode")
    if status.strip().lower() == "closed":
        status = "close"
    return [StatusReport(status=status, code=None if code == _NO_CODE else code)]
