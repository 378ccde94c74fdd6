"""One process standing in for many Baileys servers (the control-plane benchmark).

Each server is a path prefix, ``http://127.0.0.1:<port>/<server>``, speaking the seed dialect
(``GET /health``, ``GET /sessions``, ``GET/DELETE /sessions/{name}``, ``POST /sessions``)
from memory: a list is encoded once and kept until the server's sessions change, so listing
100,000 sessions costs this process next to nothing and the benchmark measures zapbus, not the
stand-in. ``POST /_load`` ``{server: [[name, state], ...]}`` replaces what the servers hold.
``python -m bench.standin`` with ``BENCH_PORT``; its logs at WARNING like the simulator's.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from zapbus.httpkit import bare_healthz, serve_bare

_encode = msgspec.json.encode


class Servers:
    """Session name -> state word, per server; each server's list body cached."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, str | None]] = {}
        self._bodies: dict[str, bytes] = {}

    def of(self, server: str) -> dict[str, str | None]:
        return self.sessions.setdefault(server, {})

    def changed(self, server: str) -> None:
        self._bodies.pop(server, None)

    def listing(self, server: str) -> bytes:
        body = self._bodies.get(server)
        if body is None:
            items = [{"name": n, "status": s} for n, s in self.of(server).items()]
            body = self._bodies[server] = _encode({"success": True, "data": items})
        return body


servers_key = web.AppKey("servers", Servers)


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def load(request: web.Request) -> web.Response:
    servers = request.app[servers_key]
    doc = msgspec.json.decode(await request.read(), type=dict[str, list[tuple[str, str | None]]])
    for server, sessions in doc.items():
        servers.sessions[server] = dict(sessions)
        servers.changed(server)
    return _json(_encode({"success": True, "data": {k: len(v) for k, v in doc.items()}}))


async def health(request: web.Request) -> web.Response:
    held = len(request.app[servers_key].of(request.match_info["server"]))
    return _json(_encode({"status": "ok", "sessions": held}))


async def list_sessions(request: web.Request) -> web.Response:
    return _json(request.app[servers_key].listing(request.match_info["server"]))


async def create(request: web.Request) -> web.Response:
    servers = request.app[servers_key]
    server = request.match_info["server"]
    doc = msgspec.json.decode(await request.read())
    name = str(doc.get("name", ""))
    held = servers.of(server)
    if name in held:
        return _json(_encode({"success": False, "error": "session already exists"}), 409)
    held[name] = "connecting"
    servers.changed(server)
    return _json(_encode({"success": True, "data": {"name": name}}), 201)


async def get_session(request: web.Request) -> web.Response:
    held = request.app[servers_key].of(request.match_info["server"])
    name = request.match_info["name"]
    if name not in held:
        return _json(_encode({"success": False, "error": "session not found"}), 404)
    return _json(_encode({"success": True, "data": {"name": name, "status": held[name]}}))


async def delete_session(request: web.Request) -> web.Response:
    servers = request.app[servers_key]
    server = request.match_info["server"]
    if servers.of(server).pop(request.match_info["name"], None) is None:
        return _json(_encode({"success": False, "error": "session not found"}), 404)
    servers.changed(server)
    return _json(_encode({"success": True}))


def create_app() -> web.Application:
    app = web.Application(client_max_size=1 << 30)  # a _load of 100,000 sessions
    app[servers_key] = Servers()
    app.router.add_get("/healthz", bare_healthz)
    app.router.add_post("/_load", load)
    app.router.add_get("/{server}/health", health)
    app.router.add_get("/{server}/sessions", list_sessions)
    app.router.add_post("/{server}/sessions", create)
    app.router.add_get("/{server}/sessions/{name}", get_session)
    app.router.add_delete("/{server}/sessions/{name}", delete_session)
    return app


if __name__ == "__main__":
    serve_bare(create_app())
