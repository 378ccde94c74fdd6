"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign and verify.

The signed content is ``"{webhook-id}.{webhook-timestamp}.{body}"``, HMAC-SHA256 with the
secret, base64, sent as ``webhook-signature: v1,<signature>`` (several space-separated
signatures are allowed, for key rotation). A timestamp outside the tolerance is refused, so a
captured delivery cannot be replayed later. Secrets look like ``whsec_<base64>``; any other
string is used as is. The HMAC itself is the ``standardwebhooks`` package's (the reference
implementation); the replay window and the raw (non-``whsec_``) secrets are zapbus's own, which
the package's ``verify`` (a fixed 5-minute window, base64 secrets only) cannot take.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime

from standardwebhooks import Webhook

ID, TIMESTAMP, SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"


class SignatureError(Exception):
    """The delivery is unsigned, badly signed, or outside the replay window."""


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<signature>`` of a UTF-8 body (JSON always is), by the ``standardwebhooks``
    package, which the notifier signs with too."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return str(Webhook(_key(secret)).sign(msg_id, when, body.decode("utf-8")))


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {ID: msg_id, TIMESTAMP: str(timestamp), SIGNATURE: sign(secret, msg_id, timestamp, body)}


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance_seconds: float
) -> None:
    """Raise SignatureError unless one of the signatures matches and the time is fresh."""
    msg_id, stamp, given = headers.get(ID), headers.get(TIMESTAMP), headers.get(SIGNATURE)
    if not msg_id or not stamp or not given:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise SignatureError("webhook-timestamp must be Unix seconds")
    if abs(now - int(stamp)) > tolerance_seconds:
        raise SignatureError("webhook-timestamp outside the replay window")
    try:
        expected = sign(secret, msg_id, int(stamp), body).encode()
    except UnicodeDecodeError:
        raise SignatureError("the body is not UTF-8") from None
    for candidate in given.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no matching signature")
