"""What can go wrong when calling a Baileys server (any dialect), and what the worker does.

    BaileysError                 reason: the server's text, at most 300 chars, no control chars
    ├── RetryableError           -> nak(delay); on the last attempt: dead letter + failed + term()
    │     timeout, connection refused/reset (server_down), any other client error
    │     5xx (502/503/504 count as server_down), 429, 408, any other unexpected status
    │     2xx whose JSON body says "success": false, unless its text says otherwise
    └── PermanentError           -> dead letter + failed event + term() at once
          400/422 (bad name), 401/403 (bad API key), 404 (no such route: wrong URL)
          3xx: a redirect, never followed (it would carry the API key elsewhere)
          2xx + "success": false whose text says unauthorized/forbidden/invalid

A 404 is only an error where the route itself must exist (create); on ``GET`` or ``DELETE
/sessions/{name}`` it means "no such session", and on ``GET /sessions`` "no list route".
An undecodable command is terminated at once (``term()``), since no retry can fix it.
``services/session_worker/actions.py`` is the one place that maps an error to what JetStream
is told.
A 409 "already exists" on create is not an error: the session exists, which is what we wanted
(so is a 2xx + "success": false whose error says the session already exists).
"""

from __future__ import annotations

import re
import unicodedata

REASON_MAX_CHARS = 300
# Control and format characters (newlines, ANSI escapes, bidi overrides) never reach a reason.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})
_PERMANENT_TEXT = re.compile(r"unauthori[sz]ed|forbidden|invalid|not allowed|bad request", re.I)


def clean_reason(text: str, limit: int = REASON_MAX_CHARS) -> str:
    """``text`` on one line, without control characters, at most ``limit`` characters."""
    text = text[: limit * 4]  # bound the work before cleaning
    out = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in _UNPRINTABLE
    )
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 1] + "\u2026"


class BaileysError(Exception):
    """A call to the Baileys server did not do what was asked."""

    def __init__(self, reason: str, status: int | None = None, server_down: bool = False) -> None:
        reason = clean_reason(reason)
        super().__init__(reason)
        self.reason = reason
        self.status = status
        # Connection refused/reset or a gateway error: the server itself is unavailable,
        # which is what the circuit breaker counts (a slow or flaky answer is not).
        self.server_down = server_down


class RetryableError(BaileysError):
    """Worth another try later: the server was slow, down, or overloaded."""


class PermanentError(BaileysError):
    """No retry will help: the request or our credentials are wrong."""


def error_for_status(status: int, detail: str) -> BaileysError:
    """The error for a non-success HTTP status of the Baileys server (see the tree above)."""
    if 300 <= status < 400:
        return PermanentError(
            f"baileys answered {status}, a redirect, not followed (the API key is only sent to"
            f" the configured URL; set it to the final address): {detail}",
            status,
        )
    reason = f"baileys answered {status}: {detail}"
    if status in (400, 401, 403, 404, 422):
        return PermanentError(reason, status)
    return RetryableError(reason, status, server_down=status in (502, 503, 504))


def error_for_failure(status: int, detail: str) -> BaileysError:
    """The error for a 2xx whose body says ``"success": false``: retryable, unless the text
    says the request or the credentials are wrong."""
    reason = f"baileys answered {status} with success false: {detail}"
    if _PERMANENT_TEXT.search(detail):
        return PermanentError(reason, status)
    return RetryableError(reason, status)
