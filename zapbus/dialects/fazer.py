"""The ``fazer`` dialect: fazer-ai baileys-api v3 (github.com/fazer-ai/baileys-api).

HTTP: ``POST /connections/{phone} {"webhookUrl", "webhookVerifyToken"}`` and ``DELETE
/connections/{phone}``, header ``x-api-key``; the phone is E.164 with its ``+`` (URL-encoded in
the path). The server keys a connection by phone number, not by name: a create needs one, and
a ``POST`` for a phone it already holds re-points that connection (new webhook URL and token)
instead of refusing, so a create is always safe to repeat. It answers ``200`` with no body, and
``DELETE`` of an unknown phone ``404 "Phone number not found"``. It has no route that reads or
lists connections; ``GET /status`` answers without an API key.

Session names: zapbus names sessions ``zb_<connection>_g<generation>``; the phone behind a name
comes with the call (``phone_number=``, from the command), else from this worker's own creates
(``FazerDialect.phone_of``). A name with neither cannot be deleted (PermanentError naming it).

Webhooks: ``{"event", "data", "webhookVerifyToken"}``; the token must be this connection
generation's ``webhook_secret`` (else SignatureError: 401). Only ``connection.update`` reports
anything; its ``data`` is Baileys' connection state as fazer rewrites it:

- ``{"qr", "connection": "connecting", "qrDataUrl"}``: a QR (the ``connecting`` is fazer's);
- ``{"connection": "open"}``; ``{"connection": "reconnecting"}``, fazer's own word for every
  close it reconnects after (515 after a scan, 428, 440, 408 "Connection was lost" ...: the code
  is not sent);
- ``{"connection": "close", "lastDisconnect": {"error": {"output": {"statusCode", "payload":
  {"message"}}}}}``: only for closes it does not reconnect after (401, 408 "QR refs attempts
  ended");
- guard reports without ``connection``: ``{"error": "reconnect_loop_detected"}`` (more than 10
  reconnects in a row; fazer stops, auth state kept) and ``{"error": "wrong_phone_number"}``
  (the phone that linked is not the connection's number; fazer logs it out). They become status
  reports whose status is that word;
- every ``data`` carries the lease ``epoch`` in cluster mode. A delivery of a lower epoch than
  one seen lately for the same connection generation comes from a previous owner and is
  dropped (kept in history as ignored); the epoch also rides on ``FazerDelivery.epoch``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from zapbus.dialects.base import (
    CreateSessionRequest,
    CreateSessionResult,
    Dialect,
    ServerSession,
)
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.dialects.http import Answer, call
from zapbus.dialects.reports import (
    Delivery,
    PayloadError,
    Report,
    StatusReport,
    Unknown,
    connection_state,
    decode_object,
)
from zapbus.signing import SignatureError

# fazer's own check of the path parameter (src/controllers/connections/types.ts).
PHONE = re.compile(r"\+\d{5,15}")
MIN_TOKEN_CHARS = 6  # fazer refuses a shorter webhookVerifyToken (422)
GUARDS = {
    "reconnect_loop_detected": "the server gave up reconnecting after too many attempts in a row",
    "wrong_phone_number": "the phone that linked is not the number this connection was made for",
}
STALE_EPOCH = "connection.update:stale_epoch"
_PHONE_BOOK_SIZE = 100_000
_NO_READ_ROUTE = (
    "fazer baileys-api has no route that reads or lists connections: zapbus cannot observe"
    " its sessions (only its webhooks)"
)


class FazerDelivery(Delivery, frozen=True, kw_only=True):
    """A delivery with the lease epoch fazer stamps on ``connection.update`` (None if none)."""

    epoch: int | None = None


class EpochGuard:
    """The highest epoch seen lately per connection generation, in this process.

    fazer raises the epoch when another instance (or an explicit ``POST``) takes the
    connection over; deliveries still in flight from the previous owner carry the lower one.
    They arrive within its retry window (3 retries, 5 s x3 backoff: about a minute), so a
    higher epoch only fences lower ones for ``window`` seconds: a server whose lease store was
    wiped (epochs restart at 1) is heard again after that instead of never.
    """

    def __init__(self, window_seconds: float = 300.0, size: int = 10_000) -> None:
        self.window = window_seconds
        self.size = size
        self._seen: OrderedDict[bytes, tuple[int, float]] = OrderedDict()

    def stale(self, secret: str, epoch: int | None, now: float | None = None) -> bool:
        """Is ``epoch`` lower than one seen for this generation within the window? Records it
        otherwise."""
        if epoch is None:
            return False
        now = time.monotonic() if now is None else now
        key = hashlib.sha256(secret.encode()).digest()[:16]  # never keep the secret itself
        seen = self._seen.get(key)
        if seen is not None and epoch < seen[0] and now - seen[1] <= self.window:
            return True
        if seen is None or epoch >= seen[0] or now - seen[1] > self.window:
            self._seen[key] = (epoch, now)
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return False


EPOCHS = EpochGuard()


def checked_phone(value: str | None) -> str:
    """``value`` as fazer wants it in a path (``+`` and 5-15 digits), else PermanentError."""
    phone = (value or "").strip()
    if phone and not phone.startswith("+"):
        phone = "+" + phone
    if not PHONE.fullmatch(phone):
        raise PermanentError(
            "fazer keys connections by phone number: the create needs phone_number in E.164"
            f" (+ and 5 to 15 digits), got {value!r}"
        )
    return phone


class FazerDialect(Dialect):
    kind = "fazer"
    code_login = False  # baileys-api v3 has no pairing-code route
    observable = False  # no route reads a connection back: the reconciler stays off
    keys_by_phone = True  # one connection per phone number

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # session name -> phone, from this process's creates (newest last, bounded); and
        # phone -> the session name that claimed it last (a server connection serves one).
        self._phones: OrderedDict[str, str] = OrderedDict()
        self._holders: dict[str, str] = {}

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}

    async def _call(self, method: str, path: str, long: bool = False, json: Any = None) -> Answer:
        timeout = self.timeout if long else self.short_timeout
        return await call(self.http, method, self.base_url + path, self._headers(), timeout, json)

    def remember(self, name: str, phone: str) -> None:
        """``name`` is served by the server connection of ``phone`` (from now on)."""
        self._phones[name] = phone
        self._phones.move_to_end(name)
        self._holders[phone] = name
        while len(self._phones) > _PHONE_BOOK_SIZE:
            old, old_phone = self._phones.popitem(last=False)
            if self._holders.get(old_phone) == old:
                del self._holders[old_phone]

    def phone_of(self, name: str) -> str | None:
        return self._phones.get(name)

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        phone = checked_phone(req.phone_number)
        if req.login != "qr":
            raise PermanentError("fazer baileys-api cannot link by pairing code, only by QR")
        if len(req.webhook_secret) < MIN_TOKEN_CHARS:
            raise PermanentError(
                f"fazer needs a webhookVerifyToken of at least {MIN_TOKEN_CHARS} characters"
                " (the create carried no webhook_secret)"
            )
        answer = await self._call(
            "POST",
            f"/connections/{quote(phone, safe='')}",
            long=True,
            json={"webhookUrl": req.webhook_url, "webhookVerifyToken": req.webhook_secret},
        )
        if not 200 <= answer.status < 300 or answer.failed:
            # 409: in cluster mode another live instance owns it (a proxy re-routes): retried.
            raise answer.error()
        self.remember(req.name, phone)
        # fazer re-points a connection it already holds and says nothing about it.
        return CreateSessionResult(already_existed=False)

    async def session_exists(self, name: str) -> bool:
        # Asked before repeating a create that may have timed out. fazer cannot say, and a
        # repeated POST /connections/{phone} re-points the same connection: repeat it.
        return False

    async def get_session(self, name: str, phone_number: str | None = None) -> ServerSession | None:
        raise PermanentError(_NO_READ_ROUTE)

    async def list_sessions(self) -> list[ServerSession] | None:
        raise PermanentError(_NO_READ_ROUTE)

    async def delete_session_of(self, name: str, phone_number: str | None) -> bool:
        return await self.delete_session(name, phone_number)

    async def delete_session(self, name: str, phone_number: str | None = None) -> bool:
        """Log out and delete the server connection of ``name``'s phone. False when there was
        none (404: it gave up, or was logged out), or when a later generation of the same
        connection, created by this process, now uses that phone (deleting would end it:
        fazer holds one connection per phone). Whether another connection uses the phone is
        not known here: the worker asks Postgres first (``Fence.phone_serves_another``)."""
        known = self.phone_of(name)
        if phone_number is None and known is None:
            raise PermanentError(
                f"fazer keys connections by phone number and the phone of session {name} is not"
                " known here: pass phone_number"
            )
        phone = checked_phone(phone_number or known)
        holder = self._holders.get(phone)
        if holder is not None and _later_generation(holder, name):
            return False  # a later generation of this connection took the phone over
        answer = await self._call("DELETE", f"/connections/{quote(phone, safe='')}")
        if answer.status == 404:
            deleted = False
        elif 200 <= answer.status < 300 and not answer.failed:
            deleted = True
        else:
            raise answer.error()
        self._phones.pop(name, None)
        if self._holders.get(phone) == name:
            del self._holders[phone]
        return deleted

    async def healthy(self) -> bool:
        try:
            answer = await self._call("GET", "/status")
        except RetryableError:
            return False
        return answer.status == 200

    @classmethod
    def parse_webhook(cls, body: bytes, headers: Mapping[str, str], secret: str) -> Delivery:
        doc = decode_object(body)
        token = doc.get("webhookVerifyToken")
        if not secret or not isinstance(token, str):
            raise SignatureError("no webhookVerifyToken in the body")
        if not hmac.compare_digest(token.encode(), secret.encode()):
            raise SignatureError("webhookVerifyToken does not match this connection")
        event = doc.get("event")
        if not isinstance(event, str) or not event:
            raise PayloadError("event", "must be a non-empty string")
        if event != "connection.update":  # messages.upsert, presence.update ...
            return FazerDelivery(session=None, reports=[Unknown(name=event[:100])])
        data = doc.get("data")
        if not isinstance(data, dict):
            raise PayloadError("data", "must be a JSON object")
        epoch = _epoch(data.get("epoch"))
        if EPOCHS.stale(secret, epoch):
            return FazerDelivery(session=None, reports=[Unknown(name=STALE_EPOCH)], epoch=epoch)
        return FazerDelivery(session=None, reports=_reports(data), epoch=epoch)


def _later_generation(a: str, b: str) -> bool:
    """Is session ``a`` a later generation of ``b``'s connection (``zb_<connection>_g<n>``)?"""
    a_connection, _, a_generation = a.rpartition("_g")
    b_connection, _, b_generation = b.rpartition("_g")
    if a_connection != b_connection or not (a_generation.isdigit() and b_generation.isdigit()):
        return False
    return int(a_generation) > int(b_generation)


def _epoch(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise PayloadError("data.epoch", "must be a non-negative integer")
    return value


def _reports(data: dict[str, Any]) -> list[Report]:
    error = data.get("error")
    if isinstance(error, str) and data.get("connection") is None:
        if error in GUARDS:
            return [StatusReport(status=error, reason=f"{GUARDS[error]} ({error})")]
        return [Unknown(name=f"connection.update:{error}"[:100])]
    view = dict(data)
    view.pop("error", None)
    if view.get("qr") is not None and view.get("connection") == "connecting":
        del view["connection"]  # fazer adds it to every QR
    return connection_state(view) or [Unknown(name="connection.update")]
