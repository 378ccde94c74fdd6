"""Calls to a Baileys server's JSON HTTP API, read defensively (every dialect uses this).

A 2xx whose JSON body says ``"success": false`` is a failure, redirects are never followed
(they would carry the API key to another address), and the server's text reaches a reason
bounded and cleaned (``errors.py``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from zapbus.dialects.base import ServerSession, SessionList
from zapbus.dialects.errors import (
    BaileysError,
    RetryableError,
    error_for_failure,
    error_for_status,
)

_any_json = msgspec.json.Decoder()
_NOT_JSON = object()
ALREADY_EXISTS = re.compile(r"already exist|exists already|already in use", re.I)
NOT_FOUND = re.compile(r"not found|does not exist|doesn't exist|no such session", re.I)
_NAME_FIELDS = ("name", "id", "session", "instanceName")
_STATE_FIELDS = ("status", "state", "connection", "connectionStatus")


class Answer(msgspec.Struct, frozen=True):
    status: int
    text: str
    body: Any  # the decoded JSON, or _NOT_JSON
    location: str

    @property
    def failed(self) -> bool:
        """The JSON body says ``"success": false`` (on a 2xx: a failure all the same)."""
        return isinstance(self.body, dict) and self.body.get("success") is False

    @property
    def detail(self) -> str:
        """What the server said went wrong: the JSON ``error`` (or ``message``), else the text."""
        if isinstance(self.body, dict):
            for key in ("error", "message"):
                value = self.body.get(key)
                if isinstance(value, dict):
                    value = value.get("message")
                if isinstance(value, str) and value.strip():
                    return value
            if self.failed:
                return "no error given"
        if 300 <= self.status < 400 and self.location:
            return f"to {self.location}"
        return self.text[:1200]

    def error(self) -> BaileysError:
        if self.failed and 200 <= self.status < 300:
            return error_for_failure(self.status, self.detail)
        return error_for_status(self.status, self.detail)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    json: Any = None,
) -> Answer:
    """One request; connection errors and time-outs become RetryableError."""
    path = url.split("://", 1)[-1].split("/", 1)[-1]
    try:
        async with http.request(
            method,
            url,
            json=json,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,  # a redirect would hand the API key to another address
        ) as resp:
            raw = await resp.read()
            location = resp.headers.get("Location", "")
            status = resp.status
    except TimeoutError as exc:
        raise RetryableError(f"timeout after {timeout.total:.0f} s on {method} /{path}") from exc
    except aiohttp.ClientError as exc:
        down = isinstance(exc, aiohttp.ClientConnectionError)
        raise RetryableError(f"{type(exc).__name__}: {exc}"[:300], server_down=down) from exc
    except asyncio.CancelledError:
        raise
    try:
        body = _any_json.decode(raw) if raw else _NOT_JSON
    except msgspec.DecodeError:
        body = _NOT_JSON
    return Answer(status, raw.decode("utf-8", "replace"), body, location)


def session_from(item: Any, name: str | None = None) -> ServerSession | None:
    """A session from one item of a list (or a single-session body), None if malformed."""
    if isinstance(item, str):
        return ServerSession(item) if item else None
    if not isinstance(item, dict):
        return None
    found = next((v for k in _NAME_FIELDS if isinstance(v := item.get(k), str) and v), name)
    if found is None:
        return None
    state = next((v for k in _STATE_FIELDS if isinstance(v := item.get(k), str)), None)
    return ServerSession(found, state)


def sessions_from(
    items: list[Any], read: Callable[[Any], ServerSession | None] | None = None
) -> SessionList:
    """The sessions of a list's ``items`` (each read by ``read``, ``session_from`` unless
    given), counting the items that could not be read."""
    reader = read or session_from
    found = [reader(item) for item in items]
    sessions = [s for s in found if s is not None]
    return SessionList(sessions, unreadable=len(found) - len(sessions))


def session_items(body: Any) -> list[Any] | None:
    """The list of sessions in a list body of any known shape, else None."""
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        return None
    for key in ("data", "sessions"):
        value = body.get(key)
        if isinstance(value, dict):  # {"data": {"sessions": [...]}}
            value = value.get("sessions")
        if isinstance(value, list):
            return value
    return None
