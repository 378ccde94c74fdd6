"""``GET /v1/connections/{id}/qr``: the current QR code as JSON, SVG or PNG (by ``Accept``).

Drawing the largest QR code takes ~150 ms of pure-Python CPU, so images are rendered on a small
thread pool (QrRenderer), never on the event loop, with a bounded number in flight.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import segno

JSON = "application/json"
SVG = "image/svg+xml"
PNG = "image/png"
OFFERED = (JSON, SVG, PNG)


def negotiate(accept: str) -> str | None:
    """The best of JSON/SVG/PNG for an ``Accept`` header; None if none is acceptable."""
    if not accept.strip():
        return JSON
    best: tuple[float, int, str] | None = None
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for rank, offered in enumerate(OFFERED):
            kind = offered.partition("/")[0]
            if media in (offered, f"{kind}/*", "*/*") and q > 0:
                exact = 1 if media == offered else 0
                candidate = (q, exact * 10 - rank, offered)
                if best is None or candidate > best:
                    best = candidate
    return best[2] if best else None


# The error-correction level: "L" holds the most data (2953 bytes in the largest code, which
# is what zapbus/dialects/reports.py MAX_QR_CHARS allows), and screens need no more.
ERROR_LEVEL = "l"


def render(qr: str, media: str) -> bytes:
    """The QR code as SVG or PNG bytes (CPU-bound: call through QrRenderer)."""
    code = segno.make_qr(qr, error=ERROR_LEVEL)
    out = io.BytesIO()
    if media == SVG:
        code.save(out, kind="svg", scale=6, border=2, xmldecl=False)
    else:
        code.save(out, kind="png", scale=8, border=2)
    return out.getvalue()


class QrRenderer:
    """Renders QR images on ``threads`` worker threads, off the event loop; at most
    ``max_in_flight`` renders are queued or running, later callers wait their turn."""

    def __init__(
        self,
        threads: int = 2,
        max_in_flight: int = 8,
        draw: Callable[[str, str], bytes] | None = None,
    ) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="zapbus-qr")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._draw = draw or render

    async def render(self, qr: str, media: str) -> bytes:
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._draw, qr, media)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
