"""The ``waha`` dialect: WAHA (WhatsApp HTTP API, devlikeapro) 2025-2026, any engine.

HTTP (header ``X-Api-Key``; errors are NestJS bodies ``{"statusCode", "message", "error"}``
whose text is in ``message``, ``error`` being only the status phrase):

- ``POST /api/sessions {"name", "start": true, "config": {"webhooks": [{"url", "events":
  ["session.status"], "hmac": {"key"}}]}}`` -> ``201`` with the session; a name in use is
  ``422 "Session '...' already exists. Use PUT to update it."`` (``409`` is read alike);
- ``GET /api/sessions?all=true`` -> ``[{"name", "status", "config", "me", "engine"}]`` (without
  ``all`` WAHA leaves out STOPPED sessions, which still exist);
- ``GET /api/sessions/{name}`` (``404`` = none); ``DELETE /api/sessions/{name}``: stops, logs
  out and deletes in one call, and is idempotent (``200`` whether or not it existed);
- ``POST /api/{name}/auth/request-code {"phoneNumber"}`` (digits) -> ``{"code": "ABCD-ABCD"}``;
  ``422`` until the session shows a QR (``SCAN_QR_CODE``);
- ``GET /api/{name}/auth/qr?format=raw`` -> ``{"value": "2@..."}``; ``422`` once the session
  moved on from ``SCAN_QR_CODE`` (not an error: there is no QR to show);
- ``GET /ping`` -> ``{"message": "pong"}``.

Webhooks: ``{"id", "timestamp", "event", "session", "metadata", "me", "payload", "engine",
"environment"}``; only ``session.status`` is used: ``payload.status`` in ``STOPPED | STARTING |
SCAN_QR_CODE | WORKING | FAILED`` (newer: ``PASSKEY_REQUIRED``,
``PASSKEY_CONFIRMATION_REQUIRED``), and in newer versions ``payload.statuses``, the session's
recent statuses oldest first (``[{"status", "timestamp"}]``), which tells what a ``FAILED``
follows. The QR is never in the webhook: each ``SCAN_QR_CODE`` (one per new QR) is a
``QrToFetch``. Every delivery carries ``X-Webhook-Hmac``, the hex HMAC-SHA512 of the raw body
with the key zapbus put in the create (``X-Webhook-Hmac-Algorithm: sha512``): a missing or
wrong one is refused (401). Deliveries are de-duplicated by the body's ``id`` (``evt_...``,
kept by WAHA's retries); ``timestamp`` is never used to order anything.

What each status is reported as (words ``zapbus/connection/vocabulary.py`` reads):

    STARTING                       connecting (reconnecting when it follows WORKING: the
                                   connection dropped and WAHA restarts it)
    SCAN_QR_CODE                   QrToFetch
    WORKING                        connected
    FAILED after SCAN_QR_CODE      close 408 "QR refs attempts ended": WAHA gives up after its
                                   6 QR codes (its docs), Baileys' qr_expired; the code is
                                   inferred, the reason says so
    FAILED after WORKING           logged_out: the device was unlinked or must authorize again
    FAILED otherwise               failed (no history, or it failed to start)
    PASSKEY_REQUIRED               passkey_required (zapbus cannot sign a WebAuthn challenge)
    PASSKEY_CONFIRMATION_REQUIRED  passkey_confirmation_required (only WAHA's own API can
                                   confirm the code; WhatsApp confirms most pairings by itself
                                   and never gets here)
    STOPPED                        stopped (stopped on the server; it does not start by itself)
    anything else                  Unknown (kept in history as ignored)
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from zapbus.dialects.base import (
    CreateSessionRequest,
    CreateSessionResult,
    Dialect,
    Health,
    ServerSession,
)
from zapbus.dialects.errors import (
    BaileysError,
    PermanentError,
    RetryableError,
    clean_reason,
    error_for_status,
)
from zapbus.dialects.http import ALREADY_EXISTS, Answer, call, sessions_from
from zapbus.dialects.reports import (
    Delivery,
    PayloadError,
    QrToFetch,
    Report,
    StatusReport,
    Unknown,
    account_of,
    checked_status,
    clean_text,
    decode_object,
)
from zapbus.signing import SignatureError

STATUS_EVENT = "session.status"
HMAC_HEADER = "X-Webhook-Hmac"
HMAC_ALGORITHM_HEADER = "X-Webhook-Hmac-Algorithm"
QR_LIMIT_REASON = "QR refs attempts ended"  # Baileys' words (zapbus/connection/vocabulary.py)
QR_LIMIT_CODE = 408
_MAX_ID_CHARS = 150
# WAHA Core refuses every session but "default" with 422 "WAHA Core support only 'default'
# session. ... please get WAHA PLUS version"; its GET /api/server/version says "tier": "CORE".
CORE_REFUSAL = re.compile(r"only\s+'?default'?\s+session|get WAHA PLUS", re.I)
PLUS_REQUIRED = (
    "zapbus needs WAHA Plus: it names one session per connection (WAHA Core accepts only the"
    " session named 'default') and checks each webhook's HMAC (WAHA Core signs nothing)"
)


def _message(answer: Answer) -> str:
    """What WAHA said: NestJS puts it in ``message`` (a text, or a list for validation)."""
    body = answer.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, list):
            message = "; ".join(str(m) for m in message)
        if isinstance(message, str) and message.strip():
            return message
    return answer.detail


def _error(answer: Answer) -> BaileysError:
    return error_for_status(answer.status, _message(answer))


def _ok(answer: Answer) -> bool:
    return 200 <= answer.status < 300


class WahaDialect(Dialect):
    kind = "waha"

    def _headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.api_key}

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _call(self, method: str, path: str, long: bool = False, json: Any = None) -> Answer:
        timeout = self.timeout if long else self.short_timeout
        return await call(self.http, method, self._url(path), self._headers(), timeout, json)

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        if not req.webhook_secret:
            # Without a key WAHA signs nothing and every webhook would be refused (401).
            raise PermanentError("waha: no webhook secret for config.webhooks[0].hmac.key")
        webhook = {
            "url": req.webhook_url,
            "events": [STATUS_EVENT],
            "hmac": {"key": req.webhook_secret},
        }
        body = {"name": req.name, "start": True, "config": {"webhooks": [webhook]}}
        answer = await self._call("POST", "/api/sessions", long=True, json=body)
        if _ok(answer):
            return CreateSessionResult(already_existed=False)
        if answer.status == 409 or (
            answer.status in (400, 422) and ALREADY_EXISTS.search(_message(answer))
        ):
            return CreateSessionResult(already_existed=True)
        raise self._core_refusal(answer) or _error(answer)

    def _core_refusal(self, answer: Answer) -> PermanentError | None:
        """WAHA Core's refusal of a session not named ``default``: the server is marked unfit
        (logged once, /readyz says why) and the error says WAHA Plus is required."""
        if answer.status != 422 or not CORE_REFUSAL.search(_message(answer)):
            return None
        said = clean_reason(_message(answer), 120)
        self.mark_unfit(clean_reason(f"WAHA Core answered 422 ({said}): {PLUS_REQUIRED}", 500))
        return PermanentError(
            f"waha answered 422: WAHA Core serves only the session 'default'; {PLUS_REQUIRED}",
            422,
        )

    async def check_fit(self) -> str | None:
        """WAHA Core (``GET /api/server/version`` says ``"tier": "CORE"``) cannot serve
        zapbus; None for WAHA Plus, or a server that does not say."""
        answer = await self._call("GET", "/api/server/version")
        if not _ok(answer) and answer.status not in (404, 405):
            raise _error(answer)
        body = answer.body if isinstance(answer.body, dict) else {}
        tier, version = body.get("tier"), body.get("version")
        if not isinstance(tier, str) or tier.strip().upper() != "CORE":
            return None
        named = clean_reason(version, 40) if isinstance(version, str) else ""
        self.mark_unfit(clean_reason(f"WAHA Core {named} (tier CORE): {PLUS_REQUIRED}", 500))
        return self.unfit

    async def list_sessions(self) -> list[ServerSession] | None:
        """Every session, STOPPED ones too (``all=true``); items we cannot read are counted
        (the list is then not complete)."""
        answer = await self._call("GET", "/api/sessions?all=true")
        if answer.status in (404, 405):
            return None
        if not _ok(answer):
            raise _error(answer)
        if not isinstance(answer.body, list):
            raise RetryableError(
                f"waha answered {answer.status} to GET /api/sessions with no list of sessions:"
                f" {answer.text[:200]}",
                answer.status,
            )
        return sessions_from(answer.body)

    async def get_session(self, name: str) -> ServerSession | None:
        answer = await self._call("GET", f"/api/sessions/{quote(name, safe='')}")
        if answer.status == 404:
            return None
        if not _ok(answer):
            raise _error(answer)
        status = answer.body.get("status") if isinstance(answer.body, dict) else None
        return ServerSession(name, status if isinstance(status, str) else None)

    async def delete_session(self, name: str) -> bool:
        """One call stops, logs out and deletes. WAHA's delete is idempotent (200 whether or
        not the session existed), so True unless it answers 404."""
        answer = await self._call("DELETE", f"/api/sessions/{quote(name, safe='')}", long=True)
        if answer.status == 404:
            return False
        if _ok(answer):
            return True
        raise self._core_refusal(answer) or _error(answer)

    async def request_pairing_code(self, name: str, phone_number: str) -> str:
        answer = await self._call(
            "POST",
            f"/api/{quote(name, safe='')}/auth/request-code",
            long=True,  # WAHA waits for the first QR when the session is still STARTING
            json={"phoneNumber": phone_number.strip().lstrip("+")},
        )
        if answer.status == 422:
            # "Can request code only in SCAN_QR_CODE status": not yet (or no longer).
            raise RetryableError(f"waha answered 422: {_message(answer)}", 422)
        if not _ok(answer):
            raise _error(answer)
        code = answer.body.get("code") if isinstance(answer.body, dict) else None
        if not isinstance(code, str) or not code.strip():
            raise RetryableError(f"no pairing code in the answer: {answer.text[:200]}")
        return code.strip()

    async def fetch_qr(self, name: str) -> str | None:
        answer = await self._call("GET", f"/api/{quote(name, safe='')}/auth/qr?format=raw")
        if answer.status in (404, 422):
            return None  # gone, or no longer showing a QR: nothing to show
        if not _ok(answer):
            raise _error(answer)
        value = answer.body.get("value") if isinstance(answer.body, dict) else None
        return value if isinstance(value, str) and value.strip() else None

    async def healthy(self) -> bool:
        try:
            answer = await self._call("GET", "/ping")
            if answer.status == 404:  # a server without /ping: its API answers or not
                answer = await self._call("GET", "/api/sessions")
        except RetryableError:
            return False
        return _ok(answer)

    async def health(self) -> Health:
        """``/ping`` says up; WAHA's health gives no session count, so it is the length of
        its session list (None when the list does not answer)."""
        if not await self.healthy():
            return Health(up=False)
        try:
            listed = await self.list_sessions()
        except BaileysError:
            listed = None
        return Health(up=True, sessions=None if listed is None else len(listed))

    @classmethod
    def parse_webhook(cls, body: bytes, headers: Mapping[str, str], secret: str) -> Delivery:
        verify_hmac(body, headers, secret)
        doc = decode_object(body)
        event = doc.get("event")
        if not isinstance(event, str) or not event:
            raise PayloadError("event", "must be a non-empty string")
        session = doc.get("session")
        if session is not None and not isinstance(session, str):
            raise PayloadError("session", "must be a string")
        delivery_id = doc.get("id")
        if not isinstance(delivery_id, str) or not delivery_id.strip():
            delivery_id = None  # an older WAHA: nothing to de-duplicate by
        else:
            delivery_id = delivery_id.strip()[:_MAX_ID_CHARS]
        if event != STATUS_EVENT:
            reports: list[Report] = [Unknown(name=event[:100])]
        else:
            reports = [_status_report(doc)]
        return Delivery(session=session, reports=reports, delivery_id=delivery_id)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict: look the name up case-insensitively
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def hmac_of(body: bytes, key: str) -> str:
    """What WAHA puts in ``X-Webhook-Hmac``: hex HMAC-SHA512 of the raw body."""
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


def verify_hmac(body: bytes, headers: Mapping[str, str], secret: str) -> None:
    """SignatureError unless ``X-Webhook-Hmac`` is the body's HMAC-SHA512 with ``secret``."""
    if not secret:
        raise SignatureError("no HMAC key for this connection")
    algorithm = _header(headers, HMAC_ALGORITHM_HEADER)
    if algorithm is not None and algorithm.strip().lower() != "sha512":
        raise SignatureError(f"{HMAC_ALGORITHM_HEADER} must be sha512")
    given = _header(headers, HMAC_HEADER)
    if not given or not given.strip():
        raise SignatureError(f"{HMAC_HEADER} missing")
    expected = hmac_of(body, secret)
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "replace")):
        raise SignatureError(f"{HMAC_HEADER} does not match the body")


def _before(payload: dict[str, Any], current: str) -> str | None:
    """The status WAHA reported before ``current``, from ``payload.statuses`` (oldest first;
    ordered by ``timestamp`` when every entry has one); None when WAHA did not say."""
    items = payload.get("statuses")
    if not isinstance(items, list):
        return None
    entries = [i for i in items if isinstance(i, dict) and isinstance(i.get("status"), str)]
    stamps = [e.get("timestamp") for e in entries]
    if all(isinstance(t, int | float) and not isinstance(t, bool) for t in stamps):
        entries.sort(key=lambda e: e["timestamp"])  # stable: equal stamps keep their order
    words = [str(e["status"]).upper() for e in entries]
    while words and words[-1] == current:  # the current one, repeated (one per QR)
        words.pop()
    return words[-1] if words else None


def _me(doc: dict[str, Any]) -> str | None:
    """The linked account's id (``5511...@c.us``) when WAHA gives one."""
    me = doc.get("me")
    return clean_text(me.get("id"), 100) if isinstance(me, dict) else None


def _status_report(doc: dict[str, Any]) -> Report:
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise PayloadError("payload", "must be a JSON object")
    raw = checked_status(payload.get("status"), "payload.status")
    status = raw.strip().upper()
    before = _before(payload, status)
    after = f" after {before}" if before else ""
    match status:
        case "STARTING":
            if before == "WORKING":
                return StatusReport(
                    status="reconnecting",
                    reason="WAHA STARTING after WORKING: the connection dropped, WAHA restarts it",
                )
            return StatusReport(status="connecting", reason=f"WAHA STARTING{after}")
        case "SCAN_QR_CODE":
            return QrToFetch()
        case "WORKING":
            me = _me(doc)
            phone, name = account_of(doc)
            return StatusReport(
                status="connected",
                reason=f"WAHA WORKING as {me}" if me else "WAHA WORKING",
                account_phone=phone,
                account_name=name,
            )
        case "FAILED" if before == "SCAN_QR_CODE":
            return StatusReport(
                status="close",
                code=QR_LIMIT_CODE,
                reason=f"{QR_LIMIT_REASON} (WAHA FAILED after SCAN_QR_CODE: no QR code was"
                " scanned; code inferred)",
            )
        case "FAILED" if before == "WORKING":
            return StatusReport(
                status="logged_out",
                reason="WAHA FAILED after WORKING: the device was unlinked or must authorize again",
            )
        case "FAILED":
            why = after or " (no status history: logged out, QR not scanned, or failed to start)"
            return StatusReport(status="failed", reason=f"WAHA FAILED{why}")
        case "PASSKEY_REQUIRED":
            return StatusReport(
                status="passkey_required",
                reason="WAHA PASSKEY_REQUIRED: WhatsApp asks for a passkey (WebAuthn) to finish"
                " linking, which zapbus cannot provide",
            )
        case "PASSKEY_CONFIRMATION_REQUIRED":
            return StatusReport(
                status="passkey_confirmation_required",
                reason="WAHA PASSKEY_CONFIRMATION_REQUIRED: the user must confirm a code through"
                " WAHA's API (POST /api/{session}/auth/passkey/confirm), which zapbus cannot do",
            )
        case "STOPPED":
            return StatusReport(
                status="stopped",
                reason=f"WAHA STOPPED{after}: stopped on the server, it does not start again by"
                " itself",
            )
    return Unknown(name=f"{STATUS_EVENT} {raw}"[:100])
