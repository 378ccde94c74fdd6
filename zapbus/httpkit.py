"""What every zapbus HTTP app shares: problem+json errors, health, readiness, metrics.

Every service (the consumers too) is an aiohttp app built by ``base_app``, so each has
``/healthz`` (the process runs), ``/readyz`` (its dependencies answer) and ``/metrics``
(Prometheus text from the app's own registry, so tests can run several apps in one process).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from zapbus.config import ConfigError, Settings, load_settings
from zapbus.logs import setup_logging

log = logging.getLogger("zapbus.http")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://zapbus.dev/problems/"

# Buckets that fit both millisecond handlers and 10-30 s Baileys calls.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    120.0,
)

# A dependency that is down (Postgres restarting, a dropped connection): answer 503 and let the
# client retry (with its Idempotency-Key), rather than a 500 that looks like a bug.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionFailureError,
)

ReadyCheck = Callable[[], Awaitable[bool] | bool]

registry_key = web.AppKey("registry", CollectorRegistry)
ready_checks_key = web.AppKey("ready_checks", dict[str, ReadyCheck])
service_name_key = web.AppKey("service_name", str)
# Fields a handler adds to its request's access-log line (the one line per request).
log_fields_key = web.RequestKey("log_fields", dict[str, object])
# Checks reported by /readyz but not required for readiness (e.g. the gateway keeps accepting
# requests into its outbox while NATS is away, so NATS must not take it out of rotation).
optional_checks_key = web.AppKey("optional_checks", set[str])
# Why the service cannot do its work though its dependencies answer (a Baileys server of the
# wrong kind), by part: each names the reason or None; /readyz is 503 with the reasons while
# any does.
not_ready_key = web.AppKey("not_ready", dict[str, Callable[[], str | None]])
# Why the process should be restarted (a loop that keeps crashing), by part; /healthz answers
# 503 while this is not empty.
unhealthy_key = web.AppKey("unhealthy", dict[str, str])

_json = msgspec.json.Encoder()


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


def problem(
    status: int, slug: str, title: str, detail: str | None = None, **extra: Any
) -> web.Response:
    """An RFC 9457 problem+json answer with a stable ``type``."""
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(body=_json.encode(body), status=status, content_type=PROBLEM_JSON)


class ProblemError(Exception):
    """Raised by handlers to answer with a problem+json."""

    def __init__(self, status: int, slug: str, title: str, detail: str | None = None, **extra: Any):
        super().__init__(detail or title)
        self.response = problem(status, slug, title, detail, **extra)


_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def _make_middleware(app: web.Application) -> Any:
    registry = app[registry_key]
    requests = Counter(
        "zapbus_http_requests_total",
        "HTTP requests handled, by route template, method and status code.",
        ["route", "method", "status"],
        registry=registry,
    )
    latency = Histogram(
        "zapbus_http_request_duration_seconds",
        "Time to handle an HTTP request, by route template.",
        ["route", "method"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.perf_counter()
        route = _route_label(request)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ProblemError as exc:
            status = exc.response.status
            return exc.response
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400 or exc.status not in _HTTP_SLUGS:
                raise
            slug, title = _HTTP_SLUGS[exc.status]
            detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
            resp = problem(exc.status, slug, title, detail)
            resp.headers.update({k: v for k, v in exc.headers.items() if k == "Allow"})
            return resp
        except UNAVAILABLE as exc:
            status = 503
            log.warning("dependency unavailable on %s %s: %r", request.method, route, exc)
            resp = problem(
                503,
                "unavailable",
                "Service unavailable",
                "a dependency (database or message bus) is unavailable; retry",
            )
            resp.headers["Retry-After"] = "1"
            return resp
        except Exception:
            log.exception("unhandled error on %s %s", request.method, route)
            return problem(500, "internal", "Internal error", "the error was logged")
        finally:
            elapsed = time.perf_counter() - start
            requests.labels(route, request.method, str(status)).inc()
            latency.labels(route, request.method).observe(elapsed)
            _access_log(request, route, status, elapsed)

    return middleware


_NUL = "\x00"
_NUL_DETAIL = "NUL characters (\\u0000, %00) are not accepted"


def _holds_nul(value: object) -> bool:
    """Whether a decoded JSON value holds a NUL in any string (keys included)."""
    if isinstance(value, str):
        return _NUL in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


@web.middleware
async def refuse_nul(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse NUL in the path (path parameters included), the query and the body's strings
    (keys included): PostgreSQL cannot store NUL in text and no API input has a use for it, so
    it is refused here, where every request of an API comes in, rather than by each handler
    and model. An API adds it after its authentication (a stranger's body is not read). A JSON
    string can only carry NUL escaped, so only a body holding the escape (or a raw NUL) is
    decoded to look. (The webhook service keeps its own rule: what a Baileys server sends is
    cleaned, not refused, and a bad URL token is a 401.)"""
    if _NUL in request.path:
        raise ProblemError(400, "invalid-path", "Invalid path", _NUL_DETAIL)
    for key, value in request.query.items():
        if _NUL in key or _NUL in value:
            raise ProblemError(400, "invalid-query", "Invalid query", _NUL_DETAIL, field=key)
    if request.can_read_body:
        body = await request.read()  # kept by aiohttp: the handler reads it again
        if b"\x00" in body:
            raise ProblemError(422, "invalid-body", "Invalid request body", _NUL_DETAIL)
        if b"\\u0000" in body:
            try:
                decoded = msgspec.json.decode(body)
            except msgspec.DecodeError:
                decoded = None  # not JSON: the handler says so
            if _holds_nul(decoded):
                raise ProblemError(422, "invalid-body", "Invalid request body", _NUL_DETAIL)
    return await handler(request)


_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def _access_log(request: web.Request, route: str, status: int, elapsed: float) -> None:
    """One line per request: the route template (never the path, which may hold a webhook
    token), the status, the time, and the connection it concerns."""
    level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
    if not log.isEnabledFor(level):
        return
    info = request.match_info
    connection_id = info.get("id") or info.get("connection_id")
    values: dict[str, object] = {
        "route": route,
        "method": request.method,
        "status": status,
        "ms": round(elapsed * 1000, 2),
    }
    if connection_id:
        values["connection_id"] = connection_id
    values.update(request.get(log_fields_key, {}))
    generation = info.get("generation", "")
    if generation.isascii() and generation.isdigit():
        values["generation"] = int(generation)
    log.log(level, "%s %s %d", request.method, route, status, extra={"fields": values})


def health_answer(**fields: object) -> dict[str, object]:
    """The body of a healthy ``/healthz``: status ok, ``fields``, and this process's pid, by
    which ``zapbus.tools.procs.ServiceProcess.wait_healthy`` tells its process's answer from
    another's."""
    return {"status": "ok", **fields, "pid": os.getpid()}


async def bare_healthz(_: web.Request) -> web.Response:
    """``GET /healthz`` of a plain aiohttp app (the benchmark's stand-ins)."""
    return web.json_response(health_answer())


def serve_bare(app: web.Application) -> None:
    """Run one of the benchmark's stand-ins on loopback at ``$BENCH_PORT``, no access log."""
    port = int(os.environ["BENCH_PORT"])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def healthz(request: web.Request) -> web.Response:
    service = request.app[service_name_key]
    if problems := request.app[unhealthy_key]:
        return json_response(
            {"status": "unhealthy", "service": service, "problems": problems}, status=503
        )
    return json_response(health_answer(service=service))


async def readyz(request: web.Request) -> web.Response:
    results: dict[str, bool] = {}
    for name, check in request.app[ready_checks_key].items():
        try:
            outcome = check()
            results[name] = bool(await outcome if not isinstance(outcome, bool) else outcome)
        except Exception:
            results[name] = False
    reasons = {name: why for name, says in request.app[not_ready_key].items() if (why := says())}
    results.update(dict.fromkeys(reasons, False))
    optional = request.app[optional_checks_key]
    ok = all(passed for name, passed in results.items() if name not in optional)
    body: dict[str, Any] = {"ready": ok, "checks": results}
    if reasons:
        body["reasons"] = reasons
    return json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[registry_key])
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def base_app(service: str, client_max_size: int = 1024**2) -> web.Application:
    """An app with the shared middleware and the health, readiness and metrics routes."""
    app = web.Application(client_max_size=client_max_size)
    app[service_name_key] = service
    app[registry_key] = CollectorRegistry()
    app[ready_checks_key] = {}
    app[optional_checks_key] = set()
    app[not_ready_key] = {}
    app[unhealthy_key] = {}
    app.middlewares.append(_make_middleware(app))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def serve(
    service: str,
    create_app: Callable[[Settings], web.Application],
    address: Callable[[Settings], tuple[str, int]],
) -> None:
    """A service's ``__main__``: read the settings, set up logging, run until SIGTERM.

    A bad or unsafe configuration (ConfigError) ends the process at once with exit code 2 and
    one line naming the variable; so does one found while starting (a NATS server older than
    zapbus needs)."""
    try:
        settings = load_settings()
        setup_logging(service, settings.log_format, settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    host, port = address(settings)
    try:
        run(app, host, port, settings.shutdown_grace_seconds, reuse_port=settings.reuse_port)
    except ConfigError as exc:  # found at start, e.g. a NATS server too old (bus.py)
        print(f"{service}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(
    app: web.Application, host: str, port: int, grace_seconds: float, reuse_port: bool = False
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly within ``grace_seconds``.
    ``reuse_port``: several processes may listen on one port (SO_REUSEPORT); the kernel
    spreads connections among them (e.g. webhook processes on a host with more cores)."""
    web.run_app(
        app,
        host=host,
        port=port,
        shutdown_timeout=grace_seconds,
        print=None,
        access_log=None,
        reuse_port=reuse_port or None,
    )
