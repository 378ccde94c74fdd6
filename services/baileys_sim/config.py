"""Configuration of the Baileys HTTP server simulator.

``SimConfig`` is a frozen Struct; ``load_sim_config`` reads it from ``ZAPBUS_SIM_*`` variables
(plus ``ZAPBUS_BAILEYS_API_KEY``, shared with the session worker). A malformed variable raises
``ValueError`` naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

__all__ = ["SimConfig", "load_sim_config", "parse_delay"]


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulator behaves: timings, failure injection and the API key it expects."""

    host: str = "127.0.0.1"
    port: int = 3100
    # The server dialect it speaks (services/baileys_sim/dialects/)
    kind: str = "seed"
    api_key: str = "dev-baileys-key"
    # POST /sessions sleeps uniform(lo, hi) seconds before answering.
    create_delay: tuple[float, float] = (10.0, 30.0)
    # Probability a POST /sessions answers 500 without creating anything.
    fail_rate: float = 0.0
    # Probability a DELETE /sessions/{name} answers 500 without deleting.
    delete_fail_rate: float = 0.0
    # Probability the session is created but the answer waits ``hang_seconds`` more.
    timeout_rate: float = 0.0
    hang_seconds: float = 120.0
    qr_first_seconds: float = 60.0
    qr_next_seconds: float = 20.0
    # QR codes sent in all before the session ends with a 408 close.
    qr_max: int = 6
    # Probability each webhook is delivered twice.
    webhook_duplicate_rate: float = 0.0
    # When set, webhooks carry Standard Webhooks signature headers made with this secret.
    signing_secret: str = ""
    # Send a `webhook-id` per delivery (kept by duplicates and replays of that delivery).
    webhook_ids: bool = True
    # Offer GET /sessions (the list route); without it the route answers 404, as on servers
    # that have none.
    list_route: bool = True
    # When set, live sessions are kept in this JSON file (written on every change) and come
    # back when the simulator starts again, as on a server with persistent auth state: a
    # restart after SIGKILL still holds them.
    state_file: str = ""
    # WhatsApp cannot be reached: no session ever shows a QR; the server reports the loop of
    # closes it retries, gives up and drops the session (SimEvent "gave_up"). Rendered by the
    # fazer dialect only (reconnecting x10, then reconnect_loop_detected).
    whatsapp_unreachable: bool = False
    # The waha dialect answers as WAHA Core does: only the session named "default" (others:
    # 422 with Core's words, their GET 404), /api/server/version says "tier": "CORE", and
    # webhooks are not signed.
    waha_core: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.create_delay
        if not (_finite(lo) and _finite(hi) and 0.0 <= lo <= hi):
            raise ValueError(f"create_delay must be 0 <= lo <= hi, got {self.create_delay!r}")
        for name in ("fail_rate", "timeout_rate", "webhook_duplicate_rate", "delete_fail_rate"):
            rate = getattr(self, name)
            if not (_finite(rate) and 0.0 <= rate <= 1.0):
                raise ValueError(f"{name} must be within [0, 1], got {rate!r}")
        for name in ("hang_seconds", "qr_first_seconds", "qr_next_seconds"):
            seconds = getattr(self, name)
            if not (_finite(seconds) and seconds >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")
        if self.qr_max < 1:
            raise ValueError(f"qr_max must be >= 1, got {self.qr_max!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {self.port!r}")
        if not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.whatsapp_unreachable and self.kind not in _GIVES_UP:
            raise ValueError(
                "whatsapp_unreachable is simulated for the dialects "
                f"{', '.join(_GIVES_UP)} only, not {self.kind!r}"
            )


# Dialects whose simulator renders a server giving up on an unreachable WhatsApp.
_GIVES_UP = ("fazer",)


def _finite(value: float) -> bool:
    return math.isfinite(value)


_RANGE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*-\s*([0-9]+(?:\.[0-9]*)?)\s*$")


def parse_delay(text: str) -> tuple[float, float]:
    """Parse ``"10-30"`` into ``(10.0, 30.0)`` and ``"2"`` into ``(2.0, 2.0)``."""
    match = _RANGE.match(text)
    if match:
        lo, hi = float(match.group(1)), float(match.group(2))
    else:
        lo = hi = float(text)
    if not (_finite(lo) and _finite(hi) and 0.0 <= lo <= hi):
        raise ValueError(f"expected 'lo-hi' with 0 <= lo <= hi or one number, got {text!r}")
    return (lo, hi)


def _parse_float(text: str) -> float:
    value = float(text)
    if not _finite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _parse_nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


# variable -> (SimConfig field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "ZAPBUS_SIM_HOST": ("host", _parse_nonempty),
    "ZAPBUS_SIM_KIND": ("kind", _parse_nonempty),
    "ZAPBUS_SIM_PORT": ("port", int),
    "ZAPBUS_BAILEYS_API_KEY": ("api_key", _parse_nonempty),
    "ZAPBUS_SIM_CREATE_DELAY": ("create_delay", parse_delay),
    "ZAPBUS_SIM_FAIL_RATE": ("fail_rate", _parse_float),
    "ZAPBUS_SIM_TIMEOUT_RATE": ("timeout_rate", _parse_float),
    "ZAPBUS_SIM_DELETE_FAIL_RATE": ("delete_fail_rate", _parse_float),
    "ZAPBUS_SIM_HANG_SECONDS": ("hang_seconds", _parse_float),
    "ZAPBUS_SIM_QR_FIRST_SECONDS": ("qr_first_seconds", _parse_float),
    "ZAPBUS_SIM_QR_NEXT_SECONDS": ("qr_next_seconds", _parse_float),
    "ZAPBUS_SIM_QR_MAX": ("qr_max", int),
    "ZAPBUS_SIM_DUPLICATE_RATE": ("webhook_duplicate_rate", _parse_float),
    "ZAPBUS_SIM_SEED": ("seed", int),
    "ZAPBUS_SIM_SIGNING_SECRET": ("signing_secret", str),
    "ZAPBUS_SIM_WEBHOOK_IDS": ("webhook_ids", _parse_bool),
    "ZAPBUS_SIM_LIST_ROUTE": ("list_route", _parse_bool),
    "ZAPBUS_SIM_STATE_FILE": ("state_file", str),
    "ZAPBUS_SIM_WHATSAPP_UNREACHABLE": ("whatsapp_unreachable", _parse_bool),
    "ZAPBUS_SIM_WAHA_CORE": ("waha_core", _parse_bool),
}


def load_sim_config(env: Mapping[str, str]) -> SimConfig:
    """Build a SimConfig from ``env``; unset variables keep their defaults.

    Raises ``ValueError`` whose message names the offending variable.
    """
    values: dict[str, Any] = {}
    for var, (field, parse) in _VARIABLES.items():
        if var not in env:
            continue
        try:
            value = parse(env[var])
            SimConfig(**{field: value})  # range checks of this field alone
        except ValueError as exc:
            raise ValueError(f"bad value for {var}={env[var]!r}: {exc}") from exc
        values[field] = value
    return SimConfig(**values)
