"""``GET /v1/connections/{id}/qr``: the current QR code as JSON, SVG or PNG (by ``Accept``)."""

from __future__ import annotations

import io

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


def render(qr: str, media: str) -> bytes:
    code = segno.make_qr(qr, error="l")
    out = io.BytesIO()
    if media == SVG:
        code.save(out, kind="svg", scale=6, border=2, xmldecl=False)
    else:
        code.save(out, kind="png", scale=8, border=2)
    return out.getvalue()
