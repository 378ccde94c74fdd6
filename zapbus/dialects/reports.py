"""What a Baileys server's webhook can report, and the checks every dialect's parser shares.

Servers differ in envelopes and spellings; each dialect module turns its bodies into a
``Delivery`` of ``Report``s. What is shared lives here: tolerant readers of Baileys' own
connection state (``connection``, ``qr``, ``lastDisconnect.error.output.statusCode`` ...), of
disconnect codes (``515``, ``"515"``, ``515.0``), and the checks that keep every text storable.

Every text that leaves this module can be stored in Postgres, which refuses NUL characters in
``text``: a QR or status carrying one is refused, a reason loses them. (An event the database
cannot store would otherwise stop the projector on every redelivery.) A well-formed body whose
shape we do not know is never refused: it becomes ``Unknown`` and is kept in history as ignored.
"""

from __future__ import annotations

from typing import Any

import msgspec

# The most a QR code holds: version 40 at error level L (services/gateway/qr.py), byte mode,
# is 2953 bytes. The limit is on the QR's UTF-8 length (= characters for the ASCII QRs Baileys
# sends), which is never less than what segno encodes, so every QR accepted renders.
MAX_QR_CHARS = 2953
MAX_STATUS_CHARS = 64


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
    code: int | None = None
    reason: str | None = None
    # the linked WhatsApp account, when the server says it (on connected)
    account_phone: str | None = None
    account_name: str | None = None


class PairingCodeReport(msgspec.Struct, frozen=True, kw_only=True):
    """The server pushed a pairing code (code login)."""

    code: str


class QrToFetch(msgspec.Struct, frozen=True, kw_only=True):
    """The server shows a QR but does not send it: ask for it (``Dialect.fetch_qr``)."""


class Unknown(msgspec.Struct, frozen=True, kw_only=True):
    """A well-formed delivery that reports nothing zapbus uses (kept in history, ignored)."""

    name: str


Report = QrReport | StatusReport | PairingCodeReport | QrToFetch | Unknown


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One webhook delivery: the session it names (if any), what it reports, and the sender's
    own id for it (deliveries are de-duplicated by that id only, never by their body)."""

    session: str | None
    reports: list[Report]
    delivery_id: str | None = None


def decode_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, else PayloadError."""
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
    return doc


def first(data: dict[str, Any], *keys: str) -> tuple[str, Any]:
    """(key, value) of the first key present with a non-null value, else (keys[0], None)."""
    for key in keys:
        if data.get(key) is not None:
            return key, data[key]
    return keys[0], None


def dig(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def to_code(value: Any, field: str) -> int | None:
    """A disconnect code given as 515, "515", 515.0 or "515.0"; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PayloadError(field, "must be an integer")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise PayloadError(field, "must be an integer") from None
    if isinstance(number, float) and not number.is_integer():
        raise PayloadError(field, "must be an integer")
    code = int(number)
    if not 0 <= code <= 9999:
        raise PayloadError(field, "out of range")
    return code


def disconnect_code(data: dict[str, Any], prefix: str = "data") -> int | None:
    """The code of a status report in any of the usual places."""
    key, value = first(data, "code", "statusCode", "statusReason")
    if value is None:
        key, value = (
            "lastDisconnect.error.output.statusCode",
            dig(data, "lastDisconnect", "error", "output", "statusCode"),
        )
    return to_code(value, f"{prefix}.{key}")


def clean_text(value: Any, limit: int = 300) -> str | None:
    return value.replace("\x00", "")[:limit] if isinstance(value, str) else None


def disconnect_reason(data: dict[str, Any]) -> str | None:
    """The human text of a status report in any of the usual places."""
    _, value = first(data, "reason", "message", "error")
    if not isinstance(value, str):
        value = dig(data, "lastDisconnect", "error", "message")
    if not isinstance(value, str):
        value = dig(data, "lastDisconnect", "error", "output", "payload", "message")
    return clean_text(value)


def phone_of_jid(jid: Any) -> str | None:
    """ "+5511987654321" from a WhatsApp id: ``5511987654321@c.us``,
    ``5511987654321:12@s.whatsapp.net`` (a device suffix), or bare digits."""
    if not isinstance(jid, str):
        return None
    user = jid.split("@", 1)[0].split(":", 1)[0]
    return f"+{user}" if user.isdigit() and 8 <= len(user) <= 15 else None


def account_of(data: Any) -> tuple[str | None, str | None]:
    """(phone, name) of the linked account in the usual places: ``me`` ({id, name |
    pushName}), ``wuid`` / ``jid`` / ``wid`` and ``profileName`` / ``pushName``."""
    if not isinstance(data, dict):
        return None, None
    me = data.get("me")
    if isinstance(me, dict):
        phone = phone_of_jid(me.get("id"))
        _, name = first(me, "name", "pushName", "notify", "verifiedName")
        return phone, clean_text(name, 100)
    _, jid = first(data, "wuid", "jid", "wid", "ownerJid")
    _, name = first(data, "profileName", "pushName")
    return phone_of_jid(jid), clean_text(name, 100)


def checked_qr(value: Any, field: str) -> str:
    """A QR payload fit to store and to render, else PayloadError naming ``field``."""
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(field, "must be a non-empty string")
    if "\x00" in value:
        raise PayloadError(field, "must not contain NUL characters")
    if len(value) > MAX_QR_CHARS or len(value.encode("utf-8", "surrogatepass")) > MAX_QR_CHARS:
        raise PayloadError(field, f"longer than a QR code holds ({MAX_QR_CHARS} bytes in UTF-8)")
    return value


def checked_status(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STATUS_CHARS:
        raise PayloadError(
            field, f"must be a non-empty string of at most {MAX_STATUS_CHARS} characters"
        )
    if "\x00" in value:
        raise PayloadError(field, "must not contain NUL characters")
    return value


def connection_state(data: dict[str, Any], prefix: str = "data") -> list[Report]:
    """Reports in a Baileys ``connection.update`` (or a server's status body shaped like it):
    a QR, a status with its code and reason, or nothing zapbus uses (``isNewLogin``,
    ``receivedPendingNotifications`` alone)."""
    reports: list[Report] = []
    if data.get("qr") is not None:
        reports.append(QrReport(qr=checked_qr(data["qr"], f"{prefix}.qr")))
    key, status = first(data, "status", "connection", "state")
    code = disconnect_code(data, prefix)
    if status is None and code is not None:
        status = "close"
    if status is not None:
        status = checked_status(status, f"{prefix}.{key}")
        phone, name = account_of(data)
        reports.append(
            StatusReport(
                status=status,
                code=code,
                reason=disconnect_reason(data),
                account_phone=phone,
                account_name=name,
            )
        )
    return reports
