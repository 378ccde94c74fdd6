"""A small client of the Baileys server's HTTP API (``X-API-Key`` auth, JSON bodies)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec

from services.session_worker.errors import RetryableError, classify_status


class CreateSessionRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    webhook_url: str


class CreateSessionResult(msgspec.Struct, frozen=True, kw_only=True):
    already_existed: bool


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
    ) -> tuple[int, str]:
        try:
            async with self.http.request(
                method, self.base_url + path, json=json, headers=self.headers, timeout=timeout
            ) as resp:
                return resp.status, (await resp.text())[:500]
        except TimeoutError as exc:
            raise RetryableError(f"timeout after {timeout.total:.0f} s on {method} {path}") from exc
        except aiohttp.ClientError as exc:
            down = isinstance(exc, aiohttp.ClientConnectionError)
            raise RetryableError(f"{type(exc).__name__}: {exc}"[:300], server_down=down) from exc
        except asyncio.CancelledError:
            raise

    async def create_session(self, req: CreateSessionRequest) -> CreateSessionResult:
        status, text = await self._call(
            "POST", "/sessions", self.timeout, {"name": req.name, "webhookUrl": req.webhook_url}
        )
        if status in (200, 201, 202):
            return CreateSessionResult(already_existed=False)
        if status == 409:
            return CreateSessionResult(already_existed=True)
        raise classify_status(status, text)

    async def session_exists(self, name: str) -> bool:
        status, text = await self._call("GET", f"/sessions/{name}", self.short_timeout)
        if status == 200:
            return True
        if status == 404:
            return False
        raise classify_status(status, text)

    async def delete_session(self, name: str) -> bool:
        """Delete a session; False when there was none."""
        status, text = await self._call("DELETE", f"/sessions/{name}", self.short_timeout)
        if status in (200, 202, 204):
            return True
        if status == 404:
            return False
        raise classify_status(status, text)

    async def healthy(self) -> bool:
        try:
            status, _ = await self._call("GET", "/health", self.short_timeout)
        except RetryableError:
            return False
        return status == 200
