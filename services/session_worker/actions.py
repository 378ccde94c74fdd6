"""The one map of a failed call to what the worker does about it: try again later, or give up.

The errors themselves, and the tree of which is retryable and which permanent, are drawn in
``zapbus/dialects/errors.py``. Flows ask ``action_for`` and turn the answer into an outcome
(``outcome.py``); nothing else decides whether a failed call is retried.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.session_worker.retry import RetryPolicy
from zapbus.dialects.errors import BaileysError, PermanentError, clean_reason


@dataclass(frozen=True, kw_only=True)
class Retry:
    """Worth another delivery after ``delay`` seconds (create.retrying, nak)."""

    delay: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Fail:
    """Given up: dead letter, create.failed (with ``code``) and term."""

    reason: str
    why: str  # "permanent" (refused for good) or "exhausted" (the last attempt failed)
    code: str  # the reason code a failed create's row gets

    @property
    def permanent(self) -> bool:
        return self.why == "permanent"


Action = Retry | Fail


def action_for(error: BaileysError, attempt: int, retry: RetryPolicy) -> Action:
    """What to do after ``error`` on attempt number ``attempt`` (1-based)."""
    if isinstance(error, PermanentError):
        code = "bad_credentials" if error.status in (401, 403) else "server_refused"
        return Fail(reason=clean_reason(error.reason), why="permanent", code=code)
    if retry.is_last(attempt):
        reason = clean_reason(f"gave up after {attempt} attempts: {error.reason}")
        return Fail(reason=reason, why="exhausted", code="gave_up")
    return Retry(delay=retry.delay(attempt), reason=error.reason)
