"""Webhook delivery of the simulator: one sender loop per session, in order, with retries."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import NamedTuple

import aiohttp

from zapbus.signing import signed_headers

from .metrics import SimMetrics

__all__ = ["OutQueue", "Outgoing", "WebhookSender"]

log = logging.getLogger("zapbus.baileys_sim")

WEBHOOK_RETRIES = 5  # retries after the first failed attempt
WEBHOOK_BACKOFF_SECONDS = 0.1  # doubled after each retry: 0.1, 0.2, 0.4, ...
WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
_JSON_HEADERS = {"Content-Type": "application/json"}


class Outgoing(NamedTuple):
    """One queued webhook: the JSON body, how long to wait before sending it, and its delivery
    id (``webhook-id``): a duplicate or replay of one delivery keeps it, as a real sender's
    retries do, while a new event with an identical body gets its own."""

    body: bytes
    delay: float = 0.0
    msg_id: str = ""
    headers: dict[str, str] = {}  # noqa: RUF012 (never mutated; a dialect's own signature)


OutQueue = asyncio.Queue[Outgoing | None]  # None: the sender stops after what is queued


class WebhookSender:
    """POSTs webhook bodies with one shared client session and counts the outcomes."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        metrics: SimMetrics,
        rng: random.Random,
        duplicate_rate: Callable[[], float],
        signing_secret: Callable[[], str] = lambda: "",
    ) -> None:
        self.sent = 0
        self.failed = 0
        self._http = http
        self._metrics = metrics
        self._rng = rng
        self._duplicate_rate = duplicate_rate
        self._signing_secret = signing_secret

    async def run(self, url: str, queue: OutQueue) -> None:
        """Send the queue's webhooks one at a time, in order, until a ``None`` arrives."""
        while (item := await queue.get()) is not None:
            if item.delay > 0:
                await asyncio.sleep(item.delay)
            copies = 2 if self._rng.random() < self._duplicate_rate() else 1
            for _ in range(copies):
                await self.deliver(url, item.body, item.msg_id, item.headers)

    def _headers(self, body: bytes, msg_id: str) -> dict[str, str]:
        secret = self._signing_secret()
        if not secret:
            return {**_JSON_HEADERS, "webhook-id": msg_id} if msg_id else _JSON_HEADERS
        msg_id = msg_id or "msg_" + hashlib.sha256(body).hexdigest()[:24]
        return {**_JSON_HEADERS, **signed_headers(secret, msg_id, int(time.time()), body)}

    async def deliver(
        self, url: str, body: bytes, msg_id: str = "", extra: dict[str, str] | None = None
    ) -> bool:
        """POST ``body`` to ``url``, retrying non-2xx answers and connection errors."""
        reason = ""
        attempts = WEBHOOK_RETRIES + 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(WEBHOOK_BACKOFF_SECONDS * 2 ** (attempt - 1))
            try:
                async with self._http.post(
                    url,
                    data=body,
                    headers={**self._headers(body, msg_id), **(extra or {})},
                    timeout=WEBHOOK_TIMEOUT,
                ) as resp:
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        self._metrics.webhooks_sent.inc()
                        return True
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                reason = repr(exc)
            self._metrics.webhook_attempts_failed.inc()
            log.debug("webhook to %s failed (attempt %d): %s", url, attempt + 1, reason)
        self.failed += 1
        self._metrics.webhooks_failed.inc()
        log.warning("webhook to %s given up after %d attempts: %s", url, attempts, reason)
        return False
