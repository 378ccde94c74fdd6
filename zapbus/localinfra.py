"""Local NATS JetStream and PostgreSQL servers for development and tests.

``ensure_infra`` gives ``make run`` a NATS and a Postgres: the configured ones when they answer,
else throwaway servers it starts under a data directory. ``NatsServer`` and ``PostgresServer``
are also what fault tests use to get servers they may stop, kill and restart.

Lifecycle methods (``start``/``stop``/``restart``) are synchronous and block until the server
is ready (or gone); each has an async twin (``astart``/``astop``/``arestart``) that runs it in a
worker thread and then waits with a real client (``wait_ready``), for use inside an event loop.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import asyncpg
import nats

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
StopMode = Literal["smart", "fast", "immediate"]


class InfraError(RuntimeError):
    """A local server could not be found, started or stopped."""


def _say(msg: str) -> None:
    print(f"[localinfra] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:``port`` (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def nats_reachable(url: str, timeout: float = 2.0) -> bool:
    """True if a NATS server at ``url`` accepts a connection and JetStream answers."""

    async def _quiet(_: Exception) -> None:
        return None

    try:
        async with asyncio.timeout(timeout * 2 + 1):
            # nats-py 2.16 treats max_reconnect_attempts=0 as "retry the initial connect
            # forever"; 1 attempt with no wait fails fast on a closed port.
            nc = await nats.connect(
                url,
                connect_timeout=timeout,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                allow_reconnect=False,
                error_cb=_quiet,
            )
            try:
                await nc.jetstream(timeout=timeout).account_info()
            finally:
                await nc.close()
    except Exception:
        return False
    return True


async def postgres_reachable(dsn: str, timeout: float = 2.0) -> bool:
    """True if Postgres at ``dsn`` accepts a connection and answers ``SELECT 1``."""
    try:
        async with asyncio.timeout(timeout * 2 + 1):
            conn = await asyncpg.connect(dsn, timeout=timeout)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close(timeout=timeout)
    except Exception:
        return False
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _nats_js_ping(port: int, name: str, timeout: float) -> bool:
    """Speak just enough NATS protocol to check that the server on ``port`` is the one named
    ``name`` (not another one that holds the port) and that ``$JS.API.INFO`` answers."""
    hello = (
        b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
        b"SUB _zb_ready 1\r\nPUB $JS.API.INFO _zb_ready 0\r\n\r\nPING\r\n"
    )
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as s,
            s.makefile("rb") as f,
        ):
            info = f.readline()
            if not info.startswith(b"INFO") or f'"server_name":"{name}"'.encode() not in info:
                return False
            s.sendall(hello)
            while True:
                line = f.readline()
                if not line or line.startswith((b"-ERR", b"HMSG")):  # HMSG: 503 no responders
                    return False
                if line.startswith(b"MSG "):
                    return b'"error"' not in f.read(int(line.split()[-1]) + 2)
                if line.startswith(b"PING"):
                    s.sendall(b"PONG\r\n")
    except OSError:
        return False


def _missing(what: str, package: str) -> InfraError:
    return InfraError(
        f"{what} not found; install the Debian package '{package}' "
        f"(apt-get install {package}, or `make deps-system`)"
    )


class _Server:
    """What both servers share: a work dir, a port kept across restarts, a log, async waits."""

    def __init__(self, workdir: Path, port: int | None, log_name: str):
        self.workdir = Path(workdir).resolve()
        self.port = port if port is not None else free_port()
        self.log_path = self.workdir / log_name

    @property
    def url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    async def _probe(self) -> bool:
        raise NotImplementedError

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until a real client (nats-py / asyncpg) gets an answer from the server."""
        deadline = time.monotonic() + timeout
        while not await self._probe():
            if time.monotonic() > deadline:
                raise InfraError(f"{self.url} not ready; {self.log_path}:\n{_tail(self.log_path)}")
            await asyncio.sleep(0.1)

    async def astart(self, timeout: float = 60.0) -> None:
        """``start()`` in a worker thread, then ``wait_ready()``."""
        await asyncio.to_thread(self.start, timeout)
        await self.wait_ready(timeout)


class NatsServer(_Server):
    """A nats-server with JetStream, its store and log in ``workdir``, on a fixed port.

    The port (``free_port()`` unless given) and store survive ``restart()``.
    """

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None):
        super().__init__(workdir, port, "nats.log")
        self.binary = binary or shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.name = f"zapbus-local-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Spawn the server; return once JetStream answers, else stop it and raise."""
        if self.running:
            return
        if not os.access(self.binary, os.X_OK):
            raise _missing(f"nats-server ({self.binary})", "nats-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = f"-a 127.0.0.1 -p {self.port} -js -n {self.name}".split()
        cmd = [self.binary, *args, "-sd", str(self.workdir / "store")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not _nats_js_ping(self.port, self.name, 1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop(kill=True)
                raise InfraError(
                    f"nats-server on port {self.port} not ready (exit code {code}); "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``), or SIGKILL at once if ``kill``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop (gracefully, or SIGKILL if ``kill``) and start again on the same port and store."""
        self.stop(kill=kill)
        self.start(timeout)

    async def _probe(self) -> bool:
        return await nats_reachable(self.url, timeout=1.0)

    async def astop(self, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill)

    async def arestart(self, kill: bool = False, timeout: float = 20.0) -> None:
        await self.astop(kill)
        await self.astart(timeout)


def find_pg_bindir() -> Path:
    """Directory of pg_ctl/initdb: from PATH (symlinks resolved), else the highest
    /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    if not dirs:
        raise _missing("pg_ctl (PostgreSQL server)", "postgresql")

    def version(p: str) -> tuple[int, ...]:  # /usr/lib/postgresql/<version>/bin/pg_ctl
        return tuple(int(x) for x in p.split("/")[4].split(".") if x.isdigit())

    return Path(max(dirs, key=version)).parent


class PostgresServer(_Server):
    """A PostgreSQL cluster in ``workdir/data`` (initdb on first start), on a fixed port.

    Trust auth, superuser ``postgres``, TCP on 127.0.0.1 only; log in ``workdir/postgres.log``.
    Running as root, the server runs as the ``postgres`` user (via runuser): ``workdir`` is
    chowned to it, and any parent directory it cannot traverse gets o+x (pytest's 0700
    ``/tmp/pytest-of-root`` for instance).
    """

    def __init__(self, workdir: Path, port: int | None = None):
        super().__init__(workdir, port, "postgres.log")
        self.data_dir = self.workdir / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return self.dsn

    async def _probe(self) -> bool:
        return await postgres_reachable(self.dsn, timeout=1.0)

    def _ctl(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``initdb``/``pg_ctl`` on the data dir, as the postgres user when we are root."""
        cmd = [str(find_pg_bindir() / tool), "-D", str(self.data_dir), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd, cwd=self.workdir, capture_output=True, text=True, timeout=timeout
        )

    def _prepare_dir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        shutil.chown(self.workdir, "postgres", "postgres")
        for parent in self.workdir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                _say(f"chmod o+x {parent} so the postgres user can reach {self.workdir}")
                parent.chmod(mode | stat.S_IXOTH)

    @property
    def running(self) -> bool:
        """A live postmaster owns the data dir (its postmaster.pid names a live process)."""
        try:
            os.kill(int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]), 0)
        except (OSError, ValueError):
            return False
        return True

    def start(self, timeout: float = 60.0) -> None:
        """initdb if needed, then ``pg_ctl start -w``; raise with the log tail on failure."""
        if self.running:
            return
        find_pg_bindir()  # a clear error when PostgreSQL is not installed
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            auth = ("-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C")
            r = self._ctl("initdb", *auth, timeout=timeout)
            if r.returncode != 0:
                raise InfraError(f"initdb failed in {self.data_dir}:\n{r.stdout}{r.stderr}")
        sock = shlex.quote(str(self.workdir)) if len(str(self.workdir)) < 90 else "''"
        opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1"
        wait = ("-w", "-t", str(int(timeout)))
        r = self._ctl(
            "pg_ctl", "-l", str(self.log_path), "-o", opts, *wait, "start", timeout=timeout + 10
        )
        if r.returncode != 0:
            raise InfraError(
                f"postgres on port {self.port} did not start:\n{r.stdout}{r.stderr}"
                f"{self.log_path}:\n{_tail(self.log_path)}"
            )

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """``pg_ctl stop -m mode -w``; ``immediate`` is a crash (WAL recovery on next start)."""
        if not self.running:
            return
        wait = ("-w", "-t", str(int(timeout)))
        r = self._ctl("pg_ctl", "-m", mode, *wait, "stop", timeout=timeout + 10)
        if r.returncode != 0 and self.running:
            raise InfraError(f"pg_ctl stop failed:\n{r.stdout}{r.stderr}")

    def restart(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop with ``mode`` and start again; same port, same data."""
        self.stop(mode, timeout)
        self.start(timeout)

    async def astop(self, mode: StopMode = "fast") -> None:
        await asyncio.to_thread(self.stop, mode)

    async def arestart(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        await self.astop(mode)
        await self.astart(timeout)


class Infra:
    """The URLs to use, and the servers ``ensure_infra`` started: ``nats``/``postgres``, None
    when an existing server is used. ``close()`` (or ``async with``) stops only those."""

    def __init__(self, nats_url: str, database_url: str, say: Callable[[str], None] = _say):
        self.nats_url, self.database_url, self._say = nats_url, database_url, say
        self.nats: NatsServer | None = None
        self.postgres: PostgresServer | None = None

    async def close(self) -> None:
        nats_srv, pg, self.nats, self.postgres = self.nats, self.postgres, None, None
        try:
            if nats_srv is not None:
                self._say(f"stopping local nats-server at {nats_srv.url}")
                await nats_srv.astop()
        finally:
            if pg is not None:
                self._say(f"stopping local postgres at {pg.dsn}")
                await pg.astop()

    async def __aenter__(self) -> Infra:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _local_port(url: str, default: int) -> int:
    """The URL's port if it names this host, else ``default``; a free port if that is taken."""
    parts = urlsplit(url)
    port = parts.port if parts.hostname in _LOCAL_HOSTS and parts.port else default
    return port if port_free(port) else free_port()


def _where(url: str) -> str:
    """``host:port/path`` of a URL, without user or password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}{parts.path}"


async def ensure_infra(
    nats_url: str | None,
    database_url: str | None,
    data_dir: Path,
    say: Callable[[str], None] = _say,
) -> Infra:
    """Use NATS/Postgres at the given URLs (or the defaults) if they answer, else start local
    servers in ``data_dir/nats`` and ``data_dir/pg`` (data kept between sessions) on the URL's
    port if it is local and free, else on a free port. ``say`` reports what was used/started."""
    nats_url = nats_url or DEFAULT_NATS_URL
    database_url = database_url or DEFAULT_DATABASE_URL
    infra = Infra(nats_url, database_url, say)
    try:
        if await nats_reachable(nats_url):
            say(f"using NATS at {nats_url}")
        else:
            srv = NatsServer(Path(data_dir) / "nats", _local_port(nats_url, 4222))
            say(
                f"NATS at {nats_url} not reachable; starting nats-server at {srv.url} "
                f"(store {srv.workdir}, log {srv.log_path})"
            )
            await srv.astart()
            infra.nats, infra.nats_url = srv, srv.url
        if await postgres_reachable(database_url):
            say(f"using Postgres at {_where(database_url)}")
        else:
            pg = PostgresServer(Path(data_dir) / "pg", _local_port(database_url, 5432))
            say(
                f"Postgres at {_where(database_url)} not reachable; "
                f"starting postgres at {pg.dsn} (data {pg.data_dir}, log {pg.log_path})"
            )
            if pg.running:  # left over from an earlier session: stop it, start on our port
                await pg.astop()
            await pg.astart()
            infra.postgres, infra.database_url = pg, pg.dsn
    except BaseException:
        await infra.close()
        raise
    return infra
