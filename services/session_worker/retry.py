"""Retry policy of the session worker: attempts and growing delays with jitter."""

from __future__ import annotations

import random

import msgspec


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_attempts: int = 5
    base_seconds: float = 2.0
    max_seconds: float = 60.0
    jitter: float = 0.2  # +-20 %

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1))
        spread = raw * self.jitter
        jittered: float = raw + (rng or random).uniform(-spread, spread)
        return max(0.0, jittered)

    def is_last(self, attempt: int) -> bool:
        return attempt >= self.max_attempts
