"""A small client of the Baileys server's HTTP API (``X-API-Key`` auth, JSON bodies).

Baileys servers differ in their answers, so every answer is read defensively: a 2xx whose JSON
body says ``"success": false`` is a failure, redirects are never followed (they would carry the
API key to another address), and the server's text reaches a reason bounded and cleaned.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from services.session_worker.errors import (
    BaileysError,
    RetryableError,
    error_for_failure,
    error_for_status,
)

_any_json = msgspec.json.Decoder()
_NOT_JSON = object()
_ALREADY_EXISTS = re.compile(r"already exist|exists already", re.I)
_NOT_FOUND = re.compile(r"not found|does not exist|doesn't exist|no such session", re.I)
_NAME_FIELDS = ("name", "id", "session")
_STATE_FIELDS = ("status", "state", "connection")


class CreateSessionRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    webhook_url: str


class CreateSessionResult(msgspec.Struct, frozen=True, kw_only=True):
    already_existed: bool


class ServerSession(msgspec.Struct, frozen=True):
    """A session as the Baileys server reports it; ``state`` in the server's own words."""

    name: str
    state: str | None = None


class _Answer(msgspec.Struct, frozen=True):
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


def _session_from(item: Any, name: str | None = None) -> ServerSession | None:
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


def _session_items(body: Any) -> list[Any] | None:
    """The list of sessions in a ``GET /sessions`` body of any known shape, else None."""
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


class BaileysClient:
    def __init__(
        self, http: aiohttp.ClientSession, base_url: str, api_key: str, timeout_seconds: float
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-API-Key": api_key}
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.short_timeout = aiohttp.ClientTimeout(total=min(10.0, timeout_seconds))

    async def _call(
        self, method: str, path: str, timeout: aiohttp.ClientTimeout, json: Any = None
    ) -> _Answer:
        try:
            async with self.http.request(
                method,
                self.base_url + path,
                json=json,
                headers=self.headers,
                timeout=timeout,
                allow_redirects=False,  # a redirect would hand the API key to another address
            ) as resp:
                raw = await resp.read()
                location = resp.headers.get("Location", "")
                status = resp.status
        except TimeoutError as exc:
            raise RetryableError(f"timeout after {timeout.total:.0f} s on {method} {path}") from exc
        except aiohttp.ClientError as exc:
            down = isinstance(exc, aiohttp.ClientConnectionError)
            raise RetryableError(f"{type(exc).__name__}: {exc}"[:300], server_down=down) from exc
        except asyncio.CancelledError:
            raise
        try:
            body = _any_json.decode(raw) if raw else _NOT_JSON
        except msgspec.DecodeError:
            body = _NOT_JSON
        return _Answer(status, raw.decode("utf-8", "replace"), body, location)

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        answer = await self._call(
            "POST", "/sessions", self.timeout, {"name": req.name, "webhookUrl": req.webhook_url}
        )
        if answer.status == 409:
            return CreateSessionResult(already_existed=True)
        if answer.failed and answer.status < 300 and _ALREADY_EXISTS.search(answer.detail):
            return CreateSessionResult(already_existed=True)
        if answer.status in (200, 201, 202) and not answer.failed:
            return CreateSessionResult(already_existed=False)
        raise answer.error()

    async def list_sessions(self) -> list[ServerSession] | None:
        """Every session the server holds; None when it has no list route (404 or 405).

        Items the server describes in a way we cannot read are skipped.
        """
        answer = await self._call("GET", "/sessions", self.short_timeout)
        if answer.status in (404, 405):
            return None
        if not 200 <= answer.status < 300 or answer.failed:
            raise answer.error()
        items = _session_items(answer.body)
        if items is None:
            raise RetryableError(
                f"baileys answered {answer.status} to GET /sessions with no list of sessions:"
                f" {answer.text[:200]}",
                answer.status,
            )
        return [s for item in items if (s := _session_from(item)) is not None]

    async def get_session(self, name: str) -> ServerSession | None:
        """The session called ``name``, with its state when the server says it; None if none."""
        answer = await self._call("GET", f"/sessions/{quote(name, safe='')}", self.short_timeout)
        if answer.status == 404 or (answer.failed and _NOT_FOUND.search(answer.detail)):
            return None
        if not 200 <= answer.status < 300 or answer.failed:
            raise answer.error()
        body = answer.body
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body = body["data"]
        found = _session_from(body, name) if isinstance(body, dict) else None
        return ServerSession(name, found.state if found else None)

    async def session_exists(self, name: str) -> bool:
        return await self.get_session(name) is not None

    async def delete_session(self, name: str) -> bool:
        """Delete a session; False when there was none."""
        answer = await self._call("DELETE", f"/sessions/{quote(name, safe='')}", self.short_timeout)
        if answer.status == 404 or (answer.failed and _NOT_FOUND.search(answer.detail)):
            return False
        if answer.status in (200, 202, 204) and not answer.failed:
            return True
        raise answer.error()

    async def healthy(self) -> bool:
        try:
            answer = await self._call("GET", "/health", self.short_timeout)
        except RetryableError:
            return False
        return answer.status == 200 and not answer.failed
