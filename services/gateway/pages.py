"""The gateway's HTML pages and the security headers of every answer.

``/`` is the tenant's page (it needs the API key); ``/connect/{token}`` is the standalone page
for the person who scans: it shows one connection's QR code or pairing code, live, with the
client token of its URL and nothing else. Both speak English and Brazilian Portuguese: the
server picks by ``Accept-Language`` (``<html lang>``), the page translates itself
(``static/i18n.js``) and has a switch.

Every answer of the gateway carries ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer`` (the token travels in the ``/connect`` URL); HTML pages a
Content-Security-Policy without inline script and with ``frame-ancestors 'none'`` (a QR code
that links a WhatsApp account must not be framed by another site), anything else one that
allows nothing at all.
"""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from services.gateway import client_tokens
from services.gateway.auth import token_signing_key

STATIC = Path(__file__).with_name("static")
LANGUAGES = ("en", "pt-BR")
DEFAULT_LANGUAGE = "en"

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:;"
    " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'"


def language(accept_language: str) -> str:
    """``pt-BR`` when Accept-Language prefers any Portuguese to English, else ``en``."""
    best: tuple[float, int, str] | None = None
    for position, part in enumerate(accept_language.split(",")):
        tag, *params = (p.strip() for p in part.split(";"))
        primary = tag.split("-")[0].lower()
        if primary not in ("pt", "en"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        candidate = (q, -position, "pt-BR" if primary == "pt" else "en")
        if best is None or candidate > best:
            best = candidate
    return best[2] if best else DEFAULT_LANGUAGE


def _template(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


_TEMPLATES = {name: _template(name) for name in ("index.html", "connect.html")}


def _page(request: web.Request, name: str, status: int = 200, **data: str) -> web.Response:
    lang = language(request.headers.get("Accept-Language", ""))
    text = _TEMPLATES[name].replace('<html lang="en">', f'<html lang="{lang}">', 1)
    for key, value in data.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Vary": "Accept-Language",
            "Content-Language": lang,
        },
    )


async def index(request: web.Request) -> web.Response:
    return _page(request, "index.html")


async def connect(request: web.Request) -> web.Response:
    """The page for the person who scans. A forged link is a 404 and an expired one a 410,
    each a page that says so (in the visitor's language); the token is checked again by
    every API call the page makes."""
    token = request.match_info["token"]
    try:
        claims = client_tokens.verify(request.app[token_signing_key], token)
    except client_tokens.ExpiredToken:
        return _page(request, "connect.html", 410, connection_id="", link="expired")
    except client_tokens.InvalidToken:
        return _page(request, "connect.html", 404, connection_id="", link="invalid")
    return _page(request, "connect.html", connection_id=str(claims.connection_id), link="ok")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every answer, errors and streams included."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    is_page = headers.get("Content-Type", "").startswith("text/html")
    headers.setdefault("Content-Security-Policy", PAGE_CSP if is_page else OTHER_CSP)
    if is_page:
        headers.setdefault("X-Frame-Options", "DENY")


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/", index)
    app.router.add_get("/connect/{token}", connect)
