"""What every simulated dialect's routes share: answers, input checks, the registry."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypeGuard

import msgspec
from aiohttp import web
from yarl import URL

if TYPE_CHECKING:
    from services.baileys_sim.sessions import SessionRegistry

_NAME = re.compile(r"[A-Za-z0-9_+-]{1,100}")


def fail(status: int, error: str) -> web.Response:
    return web.json_response({"success": False, "error": error}, status=status)


def ok(data: Any = None, status: int = 200) -> web.Response:
    body: dict[str, Any] = {"success": True}
    if data is not None:
        body["data"] = data
    return web.json_response(body, status=status)


def registry_of(request: web.Request) -> SessionRegistry:
    from services.baileys_sim.keys import REGISTRY_KEY

    return request.app[REGISTRY_KEY]


async def read_json(request: web.Request) -> dict[str, Any] | None:
    try:
        return msgspec.json.decode(await request.read(), type=dict[str, Any])
    except msgspec.MsgspecError:
        return None


def valid_name(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def valid_webhook_url(value: object) -> TypeGuard[str]:
    if not isinstance(value, str):
        return False
    try:
        url = URL(value)
    except (TypeError, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)
