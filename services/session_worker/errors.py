"""What can go wrong when calling the Baileys server, and what JetStream does about it.

    BaileysError
    ├── RetryableError   timeout, refused/reset, 5xx, 429 -> nak(delay); on the last
    │                    attempt: dead letter + failed event + term()
    └── PermanentError   401/403 (bad API key), 400/422 (bad name) -> dead letter + term()

An undecodable command is terminated at once (``term()``), since no retry can fix it.
A 409 "already exists" on create is not an error: the session exists, which is what we wanted.
"""

from __future__ import annotations


class BaileysError(Exception):
    """A call to the Baileys server did not do what was asked."""

    def __init__(self, reason: str, status: int | None = None, server_down: bool = False) -> None:
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


def classify_status(status: int, detail: str) -> BaileysError:
    """The error for a non-success HTTP status of the Baileys server."""
    reason = f"baileys answered {status}: {detail}"[:300]
    if status in (400, 401, 403, 404, 422):
        return PermanentError(reason, status)
    return RetryableError(reason, status, server_down=status in (502, 503, 504))
