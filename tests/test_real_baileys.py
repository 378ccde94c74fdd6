"""End to end against real Baileys (npm ``baileys`` 7.x), not the simulator.

``tests/real_baileys/server.mjs`` is a small seed-dialect server around real Baileys sockets;
the test setup installs it (``npm ci``, once, cached in ``tests/real_baileys/node_modules``) and
starts it on the stack's Baileys port. WhatsApp is unreachable here (and made so where it is
not: see ``_whatsapp_url``), so Baileys' own socket closes before any QR, again and again: the
webhooks zapbus receives are Baileys' real ``connection.update`` payloads with its real
disconnect codes. The test follows one connection through zapbus: created, shown as
``reconnecting`` with Baileys' own words, its history carrying the real code, then deleted
(the Baileys session is gone and its reconnect loop stops).

Skipped only where ``node`` or ``npm`` is absent (or the npm registry cannot be reached to
install Baileys).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, start_stack, wait_for
from zapbus.config import Settings

SERVER_DIR = Path(__file__).parent / "real_baileys"
NODE = shutil.which("node")
NPM = shutil.which("npm")
# What a failed `npm ci` prints when it cannot reach the registry (as opposed to a real error).
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="real Baileys needs Node.js 20+ with npm on PATH (node or npm not found): "
    "tests/real_baileys/server.mjs cannot run here",
)


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=SERVER_DIR, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def baileys_server() -> Iterator[Path]:
    """``tests/real_baileys`` with its dependencies installed from package-lock.json.

    Installed once: a stamp in node_modules records the lock file's hash and the Node version,
    and a file lock keeps concurrent test runs in this tree from installing at the same time.
    """
    assert NODE is not None and NPM is not None
    version = _run(NODE, "--version", timeout=10).stdout.strip()
    major = int(version.lstrip("v").split(".")[0] or 0)
    if major < 20:
        pytest.fail(f"real Baileys 7.x needs Node.js 20 or later; {NODE} is {version}")
    lock = (SERVER_DIR / "package-lock.json").read_bytes()
    wanted = f"{hashlib.sha256(lock).hexdigest()} node {version}\n"
    stamp = SERVER_DIR / "node_modules" / ".zapbus-installed"
    lock_path = Path(tempfile.gettempdir()) / "zapbus-real-baileys-npm.lock"
    with lock_path.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not stamp.is_file() or stamp.read_text() != wanted:
            done = _run(NPM, "ci", "--no-audit", "--no-fund", timeout=300)
            if done.returncode != 0:
                out = (done.stdout + done.stderr).strip()[-2000:]
                if any(code in out for code in _OFFLINE):
                    pytest.skip(f"npm could not reach the registry to install baileys:\n{out}")
                pytest.fail(f"npm ci in {SERVER_DIR} failed ({done.returncode}):\n{out}")
            stamp.write_text(wanted)
    yield SERVER_DIR


async def _whatsapp_url() -> str | None:
    """The WebSocket URL Baileys should use: its default (real WhatsApp) where that does not
    resolve, as here; elsewhere a name that never resolves (RFC 6761 ``.invalid``), so that
    Baileys fails the same real way on every machine."""
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(
                "web.whatsapp.com", 443, type=socket.SOCK_STREAM
            ),
            5,
        )
    except (OSError, TimeoutError):
        return None
    return "wss://web.whatsapp.invalid/ws/chat"


@contextlib.asynccontextmanager
async def _node_server(
    server_dir: Path, stack: Stack, log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """server.mjs on the stack's Baileys port, with the stack's Baileys API key."""
    assert NODE is not None
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(stack.sim_port),
        "SEED_API_KEY": stack.settings.baileys_api_key,
        "RECONNECT_DELAY_MS": "1000",
    }
    if (url := await _whatsapp_url()) is not None:
        env["WA_WEBSOCKET_URL"] = url
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            NODE,
            "server.mjs",
            cwd=server_dir,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
        except TimeoutError:
            line = b""
        assert line, f"server.mjs did not start:\n{_tail(log_path)}"
        assert json.loads(line) == {"listening": stack.sim_port}
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text()[-3000:]


def _deliveries(log_path: Path, session: str) -> list[dict[str, Any]]:
    """The webhooks server.mjs delivered for ``session``, as sent (it logs each one)."""
    found = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "webhook delivered" and entry.get("session") == session:
                if entry.get("status", 200) < 500:  # a 5xx is tried again: counted then
                    found.append(entry["body"])
    return found


def _closes(deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["data"] for d in deliveries if d["data"].get("connection") == "close"]


async def _baileys(stack: Stack, path: str) -> tuple[int, Any]:
    """``GET path`` on server.mjs, straight (not through zapbus)."""
    async with stack.http.get(
        f"{stack.sim_url}{path}", headers={"X-API-Key": stack.settings.baileys_api_key}
    ) as r:
        return r.status, await r.json(content_type=None)


async def _wait_reconnecting(
    stack: Stack, connection_id: str, log_path: Path, session: str, timeout: float
) -> Any:
    """The row once ``reconnecting``; at the deadline, fail showing where it stayed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, row = await stack.get(connection_id)
        assert status == 200, row
        if row["status"] == "reconnecting":
            return row
        if asyncio.get_running_loop().time() > deadline:
            closes = _closes(_deliveries(log_path, session))
            raise AssertionError(
                f"after {timeout}s the connection is {row['status']!r} (status_reason"
                f" {row['status_reason']!r}), not 'reconnecting' with Baileys' reason;"
                f" {len(closes)} close(s) delivered, the first: {closes[:1]}"
            )
        await asyncio.sleep(0.05)


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history?limit=500",
        headers=stack.auth(),
    ) as r:
        assert r.status == 200, await r.text()
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def test_real_baileys_unreachable_whatsapp_shows_the_reason_and_deletes(
    settings: Settings, baileys_server: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    async with (
        # The watchdog's deadline is short here, so the loop of closes ends the row within
        # the test, as it would after minutes in production.
        start_stack(
            settings,
            sim=None,
            watchdog_deadline_seconds=6.0,
            watchdog_interval_seconds=0.5,
            reconcile_interval_seconds=3600,
        ) as stack,
        _node_server(baileys_server, stack, log_path),
    ):
        created = await stack.create("real-baileys")
        session = created["session_name"]
        await stack.wait_status(created["id"], "awaiting_qr", "reconnecting", timeout=20)
        status, held = await _baileys(stack, f"/sessions/{session}")
        assert status == 200 and held["data"]["name"] == session, held

        # Baileys cannot reach WhatsApp: its socket closes before any QR, and zapbus says so
        # at once with Baileys' own words instead of a silent awaiting_qr.
        row = await _wait_reconnecting(stack, created["id"], log_path, session, timeout=30)
        closes = _closes(_deliveries(log_path, session))
        assert closes, f"no close was delivered:\n{_tail(log_path)}"
        first = closes[0]["lastDisconnect"]["error"]
        message, code = first["message"], first["output"]["statusCode"]
        assert isinstance(message, str) and message, first
        assert isinstance(code, int), first
        assert row["status_reason"] == message
        assert row["qr"] is None
        assert not any(d["data"].get("qr") for d in _deliveries(log_path, session))

        # The server reconnects like real ones do: close, connecting, close ... each one a
        # real webhook, kept in history with Baileys' code; the row stays reconnecting.
        async def second_close() -> bool:
            return len(_closes(_deliveries(log_path, session))) >= 2

        await wait_for("a second close (the reconnect loop)", second_close, timeout=15)

        async def closes_in_history() -> list[dict[str, Any]] | None:
            history = await _history(stack, created["id"])
            seen = [h for h in history if h["code"] == code]
            return history if len(seen) >= 2 else None

        history = await wait_for("two closes in history", closes_in_history, timeout=15)
        print("first real close:", json.dumps(closes[0]))  # shown when the test fails
        print("history:", json.dumps(history, indent=1))
        applied = [h for h in history if h["code"] == code and h["applied"]]
        assert applied, history
        assert applied[0]["to_status"] == "reconnecting"
        assert applied[0]["reason"] == message
        status, now = await stack.get(created["id"])
        assert status == 200 and now["status"] == "reconnecting", now
        assert now["status_reason"] == message

        # Still no QR past the watchdog's deadline: failed, and why, in words and as a code.
        ended = await stack.wait_status(created["id"], "failed", timeout=20)
        assert ended["reason_code"] == "whatsapp_unreachable", ended
        assert message in ended["status_reason"], ended

        # Delete: the row is deleted, the Baileys session is ended and its loop stops.
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{created['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202, await r.text()
        await stack.wait_status(created["id"], "deleted", timeout=15)

        async def session_gone() -> bool:
            status, _ = await _baileys(stack, f"/sessions/{session}")
            return status == 404

        await wait_for(f"session {session} gone from the Baileys server", session_gone, 15)
        assert await _baileys(stack, "/sessions") == (200, {"success": True, "data": []})
        # Webhooks of events before the delete may still be on their way (server.mjs delivers
        # them in order, with retries): wait until none arrives for a second.
        delivered = -1
        for _ in range(5):
            if (now_delivered := len(_deliveries(log_path, session))) == delivered:
                break
            delivered = now_delivered
            await asyncio.sleep(1.0)
        await asyncio.sleep(2.5)  # more than the 1 s reconnect delay plus a connect attempt
        assert len(_deliveries(log_path, session)) == delivered, "the reconnect loop went on"
