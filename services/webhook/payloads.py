"""Reading what a Baileys server posts: field variants, unknown fields, malformed bodies.

Baileys-based servers differ: the QR is in ``qr``, ``qrCode`` or ``code``; the status in
``status``, ``connection`` or ``state``; a disconnect code in ``code``, ``statusCode``,
``statusReason`` or ``lastDisconnect.error.output.statusCode``. This module turns any of them
into a ``QrReport`` or a ``StatusReport``, or says which field is wrong.

Every text that leaves this module can be stored in Postgres, which refuses NUL characters in
``text``: a QR or status carrying one is refused here, a reason loses them. (An event the database
cannot store would otherwise stop the projector on every redelivery.)
"""

from __future__ import annotations

from typing import Any

import msgspec

QR_EVENTS = frozenset({"qr.update", "qr", "qr.updated", "connection.qr", "qrcode.updated"})
STATUS_EVENTS = frozenset(
    {"session.status", "connection.update", "status", "session.update", "connection.status"}
)
# The most a QR code holds: version 40 at error level L (services/gateway/qr.py), byte mode,
# is 2953 bytes. The limit is on the QR's UTF-8 length (= characters for the ASCII QRs Baileys
# sends), which is never less than what segno encodes, so every QR accepted renders.
MAX_QR_CHARS = 2953


class PayloadError(Exception):
    """A known event with a missing or malformed field (answered with 400 naming it)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class QrReport(msgspec.Struct, frozen=True, kw_only=True):
    qr: str


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    code: int | None
    reason: str | None


class Unknown(msgspec.Struct, frozen=True, kw_only=True):
    name: str


Report = QrReport | StatusReport | Unknown


def _first(data: dict[str, Any], *keys: str) -> tuple[str, Any]:
    for key in keys:
        if data.get(key) is not None:
            return key, data[key]
    return keys[0], None


def _code(data: dict[str, Any]) -> int | None:
    key, value = _first(data, "code", "statusCode", "statusReason")
    if value is None:
        last = data.get("lastDisconnect")
        error = last.get("error") if isinstance(last, dict) else None
        output = error.get("output") if isinstance(error, dict) else None
        key, value = (
            "lastDisconnect.error.output.statusCode",
            (output.get("statusCode") if isinstance(output, dict) else None),
        )
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PayloadError(f"data.{key}", "must be an integer")
    try:
        code = int(value)
    except ValueError:
        raise PayloadError(f"data.{key}", "must be an integer") from None
    if not 0 <= code <= 9999:
        raise PayloadError(f"data.{key}", "out of range")
    return code


def _reason(data: dict[str, Any]) -> str | None:
    _, value = _first(data, "reason", "message", "error")
    if not isinstance(value, str):
        last = data.get("lastDisconnect")
        error = last.get("error") if isinstance(last, dict) else None
        value = error.get("message") if isinstance(error, dict) else None
    return value.replace("\x00", "")[:300] if isinstance(value, str) else None


def parse(body: bytes) -> tuple[str | None, Report]:
    """(session name if given, what the webhook reports). Raises PayloadError."""
    try:
        doc = msgspec.json.decode(body)
    # msgspec raises UnicodeDecodeError for bad UTF-8 inside a string, RecursionError for
    # nesting deeper than the interpreter's limit; both are the sender's fault, not ours.
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise PayloadError("body", "is not valid JSON") from None
    except RecursionError:
        raise PayloadError("body", "is nested too deeply") from None
    if not isinstance(doc, dict):
        raise PayloadError("body", "must be a JSON object")
    event = doc.get("event", doc.get("type"))
    if not isinstance(event, str) or not event:
        raise PayloadError("event", "must be a non-empty string")
    session = doc.get("session", doc.get("sessionId"))
    if session is not None and not isinstance(session, str):
        raise PayloadError("session", "must be a string")
    if event not in QR_EVENTS and event not in STATUS_EVENTS:
        return session, Unknown(name=event[:100])
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise PayloadError("data", "must be a JSON object")
    if event in QR_EVENTS:
        key, qr = _first(data, "qr", "qrCode", "code")
        if not isinstance(qr, str) or not qr.strip():
            raise PayloadError(f"data.{key}", "must be a non-empty string")
        if "\x00" in qr:
            raise PayloadError(f"data.{key}", "must not contain NUL characters")
        if len(qr) > MAX_QR_CHARS or len(qr.encode("utf-8", "surrogatepass")) > MAX_QR_CHARS:
            raise PayloadError(
                f"data.{key}", f"longer than a QR code holds ({MAX_QR_CHARS} bytes in UTF-8)"
            )
        return session, QrReport(qr=qr)
    key, status = _first(data, "status", "connection", "state")
    code = _code(data)
    if status is None and code is not None:
        status = "close"
    if not isinstance(status, str) or not status.strip() or len(status) > 64:
        raise PayloadError(f"data.{key}", "must be a non-empty string of at most 64 characters")
    if "\x00" in status:
        raise PayloadError(f"data.{key}", "must not contain NUL characters")
    return session, StatusReport(status=status, code=code, reason=_reason(data))
