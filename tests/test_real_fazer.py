"""End to end against the real fazer-ai/baileys-api (bun, its packages from npm, Redis).

Its source is not in this repository: the test takes it from ``ZAPBUS_FAZER_SOURCE`` (a
checkout, or a bare git directory whose HEAD is used) or from the search tool's mirror
(``/work/.mirror/fazer-ai+baileys-api/repo``). Bun comes from ``ZAPBUS_BUN``, PATH, or npm
(``bun@1.4.5``). Both are installed once into a cache folder in the temp directory, under a
file lock (concurrent runs wait for one install): the source's ``bun.lock`` is set aside (a
locked package is gone from the registry) and its devDependencies emptied, then ``bun install
--production``. A Redis of its own runs on a free port. WhatsApp is unreachable for it on
every machine: ``tests/real_fazer/no_whatsapp.ts`` (preloaded) makes WhatsApp's names fail to
resolve, as they do here anyway.

So the server does what fazer does when WhatsApp cannot be reached: ten ``{"connection":
"reconnecting"}`` without a code, then ``{"error": "reconnect_loop_detected"}``, and it drops
the connection (its DELETE then answers 404), all within about a second of the create. The
test follows zapbus (``login`` by phone, the default QR login) through issue 19's items:

1. that give-up ends the row ``failed`` / ``whatsapp_unreachable`` with fazer's words;
2. two creates at once for one phone: one is 202, the other 409 ``phone-in-use``, and the
   server got one POST; a create without ``phone_number`` is 422;
3. the user's delete of a connection fazer gave up on reaches the server (``DELETE
   /connections/{phone}``, answered 404: success), even after a later connection used that
   phone.

Skipped only where the source, bun (or npm to fetch it) or ``redis-server`` cannot be had.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.stack import Stack, start_stack, wait_for
from zapbus.config import Settings
from zapbus.tools.localinfra import free_port

MIRROR = Path("/work/.mirror/fazer-ai+baileys-api/repo")
BUN_VERSION = "1.4.5"
PRELOAD = Path(__file__).parent / "real_fazer" / "no_whatsapp.ts"
CACHE = Path(tempfile.gettempdir()) / "zapbus-real-fazer"
REDIS = shutil.which("redis-server")
# What a failed install prints when it cannot reach the registry (not a real error).
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH")


def _source() -> Path | None:
    """The fazer-ai/baileys-api source: ``ZAPBUS_FAZER_SOURCE`` or the mirror, if present."""
    given = os.environ.get("ZAPBUS_FAZER_SOURCE")
    path = Path(given) if given else MIRROR
    return path if path.exists() else None


SOURCE = _source()
_LOOKED_AT = os.environ.get("ZAPBUS_FAZER_SOURCE") or MIRROR

pytestmark = [
    pytest.mark.skipif(
        SOURCE is None,
        reason="the fazer-ai/baileys-api source is not here: set ZAPBUS_FAZER_SOURCE to a"
        f" checkout or a git directory of it (looked at {_LOOKED_AT})",
    ),
    pytest.mark.skipif(
        REDIS is None, reason="the real fazer needs Redis: redis-server is not on PATH"
    ),
]


def _run(*args: str, cwd: Path | None = None, timeout: float = 300, **kw: Any) -> str:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip()[-2000:]
        if any(code in out for code in _OFFLINE):
            pytest.skip(f"the npm registry cannot be reached ({' '.join(args[:2])}):\n{out}")
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{out}")
    return str(done.stdout)


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _revision(source: Path) -> str:
    """What identifies the source's content (its commit where it has one)."""
    git = shutil.which("git")
    if git is not None:
        flag = "--git-dir" if _is_git_dir(source) else "-C"
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            done = subprocess.run(
                [git, flag, str(source), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode == 0 and not (source / "package.json").is_file():
                return done.stdout.strip()
    package = source / "package.json"
    if not package.is_file():
        pytest.skip(f"{source} is neither a git directory nor a checkout (no package.json)")
    return hashlib.sha256(package.read_bytes()).hexdigest()


def _bun() -> Path:
    """A bun binary: ``ZAPBUS_BUN``, PATH, or ``bun@1.4.5`` from npm into the cache."""
    if given := os.environ.get("ZAPBUS_BUN"):
        return Path(given)
    if found := shutil.which("bun"):
        return Path(found)
    binary = CACHE / f"bun-{BUN_VERSION}" / "node_modules" / ".bin" / "bun"
    if binary.is_file():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("bun cannot be had: no bun on PATH, ZAPBUS_BUN unset and no npm to fetch it")
    prefix = binary.parents[2]
    _run(npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"bun@{BUN_VERSION}")
    if not binary.is_file():
        pytest.skip(f"npm installed bun@{BUN_VERSION} but {binary} is missing")
    return binary


def _unpack(source: Path, into: Path) -> None:
    """The source tree into ``into``: ``git archive HEAD`` of a git dir, else a copy."""
    if _is_git_dir(source):
        git = shutil.which("git")
        if git is None:
            pytest.skip(f"{source} is a git directory and git is not on PATH")
        archive = subprocess.run(
            [git, "--git-dir", str(source), "archive", "--format=tar", "HEAD"],
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    else:
        shutil.copytree(
            source, into, ignore=shutil.ignore_patterns("node_modules", ".git"), dirs_exist_ok=True
        )


@pytest.fixture(scope="session")
def fazer_server() -> Iterator[tuple[Path, Path]]:
    """(bun, the server's folder with its packages installed), installed once per source."""
    assert SOURCE is not None
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "install.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        bun = _bun()
        version = _run(str(bun), "--version", timeout=30).strip()
        revision = _revision(SOURCE)
        folder = CACHE / f"server-{revision[:16]}"
        stamp = folder / ".zapbus-installed"
        wanted = f"{revision} bun {version}\n"
        if not stamp.is_file() or stamp.read_text() != wanted:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            _unpack(SOURCE, folder)
            lock = folder / "bun.lock"
            if lock.exists():
                lock.rename(folder / "bun.lock.upstream")
            package = json.loads((folder / "package.json").read_text())
            package["devDependencies"] = {}
            (folder / "package.json").write_text(json.dumps(package, indent=2))
            _run(str(bun), "install", "--production", cwd=folder)
            stamp.write_text(wanted)
    yield bun, folder


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _redis(folder: Path) -> AsyncIterator[str]:
    """A Redis of its own on a free port, keeping nothing on disk."""
    assert REDIS is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        REDIS,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def answers() -> bool:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return True
            return False

        await wait_for("redis-server listening", answers, timeout=20)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        await _stop(proc)


@contextlib.asynccontextmanager
async def _fazer(
    bun: Path, folder: Path, stack: Stack, redis_url: str, log_path: Path
) -> AsyncIterator[None]:
    """The real server on the stack's Baileys port, knowing the stack's Baileys API key."""
    port = stack.sim_port
    env = {
        **os.environ,
        "NODE_ENV": "production",
        "PORT": str(port),
        "REDIS_URL": redis_url,
        "CORS_ORIGIN": f"localhost:{port}",
        "MEDIA_CLEANUP_ENABLED": "false",
        "LOG_LEVEL": "info",
    }
    _run(
        str(bun),
        "scripts/manage-api-keys.ts",
        "create",
        "user",
        stack.settings.baileys_api_key,
        cwd=folder,
        timeout=60,
        env=env,
    )
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(bun),
            "--preload",
            str(PRELOAD),
            "src/index.ts",
            cwd=folder,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:

        async def up() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"fazer exited ({proc.returncode}):\n{_tail(log_path)}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                async with stack.http.get(f"{stack.sim_url}/status") as r:
                    return r.status == 200
            return False

        await wait_for("the real fazer answering GET /status", up, timeout=60, every=0.2)
        yield
    finally:
        await _stop(proc)


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def _requests(log_path: Path, method: str, phone: str) -> list[int]:
    """The statuses fazer answered ``method /connections/{phone}`` with (it logs each one)."""
    path = f"/connections/{quote(phone, safe='')} ["
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            msg = json.loads(line).get("msg", "")
            if msg.startswith(f"{method} ") and path in msg:
                found.append(int(msg.rsplit("[", 1)[1].rstrip("]")))
    return found


async def _create(stack: Stack, phone: str | None, name: str) -> tuple[int, Any]:
    body: dict[str, Any] = {"name": name}
    if phone is not None:
        body["phone_number"] = phone
    async with stack.http.post(
        f"{stack.gateway_url}/v1/connections", json=body, headers=stack.auth()
    ) as r:
        return r.status, await r.json(content_type=None)


async def _delete(stack: Stack, connection_id: str) -> None:
    async with stack.http.delete(
        f"{stack.gateway_url}/v1/connections/{connection_id}", headers=stack.auth()
    ) as r:
        assert r.status == 202, await r.text()


async def _failed(stack: Stack, connection_id: str, log_path: Path) -> Any:
    try:
        return await stack.wait_status(connection_id, "failed", timeout=45)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nfazer's log:\n{_tail(log_path)}") from None


async def test_real_fazer_gives_up_holds_one_connection_per_phone_and_deletes(
    settings: Settings, fazer_server: tuple[Path, Path], tmp_path: Path
) -> None:
    bun, folder = fazer_server
    log_path = tmp_path / "fazer.log"
    phone = "+5511987654321"
    async with (
        start_stack(settings, sim=None, baileys_kind="fazer") as stack,
        _redis(tmp_path) as redis_url,
        _fazer(bun, folder, stack, redis_url, log_path),
    ):
        # 1. fazer cannot reach WhatsApp: it hides every close as "reconnecting" and gives
        # up. No QR was ever shown, no 440 seen: whatsapp_unreachable, in fazer's words.
        status, first = await _create(stack, phone, "first")
        assert status == 202, first
        ended = await _failed(stack, first["id"], log_path)
        assert ended["reason_code"] == "whatsapp_unreachable", ended
        assert "reconnect_loop_detected" in ended["status_reason"], ended
        assert ended["qr_seq"] == 0
        assert _requests(log_path, "POST", phone) == [200]

        # 2. one connection per phone: without a phone 422; two creates at once for one
        # phone, one passes and the server gets one POST.
        status, problem = await _create(stack, None, "no-phone")
        assert status == 422 and problem["field"] == "phone_number", problem
        other = "+5521912345678"
        answers = await asyncio.gather(
            _create(stack, other, "racer-a"), _create(stack, other, "racer-b")
        )
        assert sorted(status for status, _ in answers) == [202, 409], answers
        (refused,) = [body for status, body in answers if status == 409]
        assert refused["type"].endswith("phone-in-use"), refused
        (won,) = [body for status, body in answers if status == 202]
        await _failed(stack, won["id"], log_path)
        assert _requests(log_path, "POST", other) == [200]

        # 3. a later connection on the first phone (the first one has ended), which fazer
        # gives up on too; then the user deletes the first: its DELETE reaches fazer, whose
        # 404 (it forgot the phone when it gave up) is success.
        status, second = await _create(stack, phone, "second")
        assert status == 202, second
        await _failed(stack, second["id"], log_path)
        assert _requests(log_path, "POST", phone) == [200, 200]
        assert _requests(log_path, "DELETE", phone) == []
        await _delete(stack, first["id"])

        async def deleted_on_the_server() -> list[int]:
            return _requests(log_path, "DELETE", phone)

        assert await wait_for("fazer's DELETE of the first", deleted_on_the_server, 30) == [404]
        await stack.wait_status(first["id"], "deleted")

        async def untracked() -> bool:
            left = await stack.pool.fetchval(
                "SELECT count(*) FROM session_deletes WHERE connection_id = $1",
                uuid.UUID(first["id"]),
            )
            return bool(left == 0)

        await wait_for("the first's delete done (404 is success)", untracked, 30)
        await _delete(stack, second["id"])
        assert await wait_for(
            "fazer's DELETE of the second",
            lambda: _async(len(_requests(log_path, "DELETE", phone)) == 2),
            30,
        )


async def _async(value: Any) -> Any:
    return value
