"""aiohttp app simulating the external Baileys HTTP server (sessions API + webhooks).

``/sessions...`` is the API the session worker talks to (``X-API-Key`` required). ``/_sim/...``
lets tests drive the simulated phone (scan, logout), replay webhooks and change behaviour.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from .config import SimConfig
from .dialects import sim_dialect
from .dialects.common import fail as _fail
from .dialects.common import ok as _ok
from .keys import CONFIG_KEY, DIALECT_KEY, HTTP_KEY, METRICS_KEY, REGISTRY_KEY
from .metrics import SimMetrics
from .sessions import SessionRegistry

__all__ = ["CONFIG_KEY", "HTTP_KEY", "METRICS_KEY", "REGISTRY_KEY", "create_app"]


class _ReplayBody(msgspec.Struct):
    mode: Literal["duplicate", "reverse"]


class _ConfigPatch(msgspec.Struct, forbid_unknown_fields=True):
    fail_rate: float | None = None
    timeout_rate: float | None = None
    create_delay: tuple[float, float] | None = None
    hang_seconds: float | None = None
    qr_first_seconds: float | None = None
    qr_next_seconds: float | None = None
    qr_max: int | None = None
    webhook_duplicate_rate: float | None = None
    webhook_ids: bool | None = None
    delete_fail_rate: float | None = None
    list_route: bool | None = None
    waha_core: bool | None = None


def _registry(request: web.Request) -> SessionRegistry:
    return request.app[REGISTRY_KEY]


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reject the dialect's API requests whose API key is not the configured key."""
    dialect = request.app[DIALECT_KEY]
    if dialect.protects(request.path):
        given = request.headers.get(dialect.api_key_header, "").encode()
        if not hmac.compare_digest(given, request.app[CONFIG_KEY].api_key.encode()):
            return _fail(401, "invalid api key")
    return await handler(request)


async def sim_scan(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/scan``: the phone scans the current QR code."""
    silent = request.query.get("silent") in ("1", "true")
    result = _registry(request).scan(request.match_info["name"], silent=silent)
    if result == "missing":
        return _fail(404, "session not found")
    if result == "not_showing_qr":
        return _fail(409, "session is not showing a qr code")
    return _ok()


async def sim_enter_code(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/enter-code``: the user types the pairing code."""
    result = _registry(request).enter_code(request.match_info["name"])
    if result == "missing":
        return _fail(404, "session not found")
    if result == "not_showing_qr":
        return _fail(409, "no pairing code was issued")
    return _ok()


async def sim_logout(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/logout``: the phone logs the session out."""
    if not _registry(request).logout(request.match_info["name"]):
        return _fail(404, "session not found")
    return _ok()


async def sim_restart(request: web.Request) -> web.Response:
    """``POST /_sim/restart``: the server restarts and loses every session, silently."""
    return _ok({"lost": _registry(request).restart()})


async def sim_disconnect(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/disconnect``: a 428 close of a connected session."""
    if not _registry(request).disconnect(request.match_info["name"]):
        return _fail(409, "session is not connected")
    return _ok()


async def sim_reconnect(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/reconnect``: a disconnected session connects again."""
    if not _registry(request).reconnect(request.match_info["name"]):
        return _fail(409, "session is not disconnected")
    return _ok()


async def sim_replay(request: web.Request) -> web.Response:
    """``POST /_sim/sessions/{name}/replay``: re-send recorded webhooks (duplicate|reverse)."""
    try:
        body = msgspec.json.decode(await request.read(), type=_ReplayBody)
    except msgspec.MsgspecError as exc:
        return _fail(400, f"invalid body: {exc}")
    resent = _registry(request).replay(request.match_info["name"], body.mode)
    if resent is None:
        return _fail(404, "session not found")
    return _ok({"resent": resent})


async def sim_stats(request: web.Request) -> web.Response:
    """``GET /_sim/stats``: creation counts, live names, webhook counters."""
    return web.json_response(_registry(request).stats())


async def sim_patch_config(request: web.Request) -> web.Response:
    """``PATCH /_sim/config``: change failure rates and timings at runtime."""
    registry = _registry(request)
    try:
        patch = msgspec.json.decode(await request.read(), type=_ConfigPatch)
        changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
        registry.config = SimConfig(**{**msgspec.structs.asdict(registry.config), **changes})
    except (msgspec.MsgspecError, ValueError) as exc:
        return _fail(400, f"invalid config: {exc}")
    public = msgspec.structs.asdict(registry.config)
    public.pop("api_key")
    return _ok(public)


async def health(request: web.Request) -> web.Response:
    """``GET /health``: liveness plus the number of live sessions."""
    return web.json_response({"status": "ok", "sessions": len(_registry(request).live)})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: plain liveness (and the pid, as zapbus's services answer)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text from this app's own registry."""
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    # no cap on connections, as Node's HTTP agent (Baileys servers' axios/fetch) has none:
    # aiohttp's default of 100 made 1,000 sessions' first QR webhooks queue behind each other
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        app[HTTP_KEY] = http
        yield


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = SessionRegistry(app[CONFIG_KEY], app[HTTP_KEY], app[METRICS_KEY], app[DIALECT_KEY])
    app[REGISTRY_KEY] = registry
    registry.restore()
    yield
    await registry.close()


async def _on_shutdown(app: web.Application) -> None:
    app[REGISTRY_KEY].begin_shutdown()


def create_app(config: SimConfig) -> web.Application:
    """Build the simulator app; sessions and the webhook client live in ``cleanup_ctx``."""
    app = web.Application(middlewares=[api_key_middleware])
    dialect = sim_dialect(config.kind)
    app[DIALECT_KEY] = dialect
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = SimMetrics()
    # Registry after the HTTP client: cleanup runs in reverse, so tasks stop before it closes.
    app.cleanup_ctx.append(_http_ctx)
    app.cleanup_ctx.append(_registry_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_routes(
        [
            web.get("/health", health),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            *dialect.routes(),
            web.post("/_sim/sessions/{name}/enter-code", sim_enter_code),
            web.post("/_sim/sessions/{name}/scan", sim_scan),
            web.post("/_sim/sessions/{name}/logout", sim_logout),
            web.post("/_sim/sessions/{name}/replay", sim_replay),
            web.post("/_sim/sessions/{name}/disconnect", sim_disconnect),
            web.post("/_sim/sessions/{name}/reconnect", sim_reconnect),
            web.post("/_sim/restart", sim_restart),
            web.get("/_sim/stats", sim_stats),
            web.patch("/_sim/config", sim_patch_config),
        ]
    )
    return app
