"""The ``zapbus`` command as an operator runs it: migrate, tenants, keys, dead letters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from proto.commands import (
    Command,
    CreateSession,
    DeadLetter,
    DeleteSession,
    RequestPairingCode,
    dead_letter_encoder,
)
from zapbus import bus
from zapbus.config import ConfigError, Settings, load_settings
from zapbus.tenants import create_tenant, tenant_for_key
from zapbus.tools.localinfra import Infra, free_port, write_state

ZAPBUS = str(Path(sys.executable).with_name("zapbus"))


def run(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ZAPBUS_DATABASE_URL": settings.database_url,
        "ZAPBUS_DB_SCHEMA": settings.db_schema,
        "ZAPBUS_NATS_URL": settings.nats_url,
        "ZAPBUS_NAMESPACE": settings.namespace,
    }
    return subprocess.run([ZAPBUS, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_migrate_twice_is_a_no_op(settings: Settings) -> None:
    out = run(settings, "migrate")
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout


async def test_tenant_create_list_and_key_rotation(settings: Settings, pool: asyncpg.Pool) -> None:
    created = run(settings, "tenant", "create", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.split("api key (shown once): ")[1].strip()
    assert await tenant_for_key(pool, key) is not None
    listed = run(settings, "tenant", "list")
    assert listed.stdout.startswith("acme\t")
    rotated = run(settings, "key", "rotate", "acme")
    new_key = rotated.stdout.rsplit(": ", 1)[1].strip()
    assert new_key != key
    assert await tenant_for_key(pool, key) is None
    assert await tenant_for_key(pool, new_key) is not None
    missing = run(settings, "key", "rotate", "nobody")
    assert missing.returncode == 1 and "no tenant named" in missing.stderr


async def test_dlq_list_when_empty_and_replay_of_unknown(settings: Settings) -> None:
    listed = run(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "no dead letters"
    replayed = run(settings, "dlq", "replay", "999")
    assert replayed.returncode == 1 and "no dead letter with sequence 999" in replayed.stderr


@pytest.mark.parametrize(
    "name", ["", "   ", "acme\nroot", "a\x1b[31mb", "bidi\u202eevil", "x\x00y"]
)
async def test_a_blank_tenant_name_or_one_with_control_characters_is_a_usage_error(
    settings: Settings, pool: asyncpg.Pool, name: str
) -> None:
    out = run(settings, "tenant", "create", name) if "\x00" not in name else None
    if out is not None:
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert "usage:" in out.stderr and "tenant name" in out.stderr
    assert await pool.fetchval("SELECT count(*) FROM tenants") == 0
    with pytest.raises(ValueError, match="tenant name"):
        await create_tenant(pool, name)


@pytest.mark.parametrize("seq", ["-5", "0", "five", "1.5"])
def test_dlq_replay_of_a_sequence_that_is_not_one_is_a_usage_error(
    settings: Settings, seq: str
) -> None:
    out = run(settings, "dlq", "replay", seq)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "usage:" in out.stderr and "Traceback" not in out.stderr
    assert "a sequence is a whole number from 1" in out.stderr


async def test_dlq_list_shows_each_letters_command_kind(settings: Settings) -> None:
    nc = await bus.connect(settings.nats_url, "test-dlq-kinds")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings.names)
    common: dict[str, Any] = {
        "connection_id": uuid.uuid4(),
        "tenant_id": uuid.uuid4(),
        "generation": 1,
        "session_name": "s",
        "requested_at": datetime.now(UTC),
    }
    commands: list[Command | None] = [
        CreateSession(command_id=uuid.uuid4(), **common),
        DeleteSession(command_id=uuid.uuid4(), **common),
        RequestPairingCode(command_id=uuid.uuid4(), phone_number="+5511987654321", **common),
        None,  # undecodable
    ]
    try:
        for n, cmd in enumerate(commands):
            letter = DeadLetter(
                command=cmd,
                raw="{}",
                subject="x",
                error="boom",
                reason="permanent" if cmd else "undecodable",
                deliveries=1,
                stream_seq=n,
                failed_at=datetime.now(UTC),
            )
            await js.publish(settings.names.dead_letter_subject, dead_letter_encoder.encode(letter))
    finally:
        await nc.close()
    listed = run(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    kinds = [line.split("\t")[2] for line in listed.stdout.strip().splitlines()]
    assert kinds == ["create", "delete", "pairing code", "unknown"]


def test_bad_configuration_names_the_variable() -> None:
    env = {**os.environ, "ZAPBUS_GATEWAY_PORT": "eighty"}
    out = subprocess.run([ZAPBUS, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "ZAPBUS_GATEWAY_PORT" in out.stderr


async def test_dlq_list_shows_every_letter_with_its_connection(settings: Settings) -> None:
    """More than a hundred letters, with gaps (replayed ones removed): every one is listed,
    its stream sequence first and its connection on the same line."""
    nc = await bus.connect(settings.nats_url, "test-dlq")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings.names)
    letters = {}
    try:
        for n in range(130):
            cmd = CreateSession(
                command_id=uuid.uuid4(),
                connection_id=uuid.uuid4(),
                tenant_id=uuid.uuid4(),
                generation=1,
                session_name=f"s{n}",
                requested_at=datetime.now(UTC),
            )
            letter = DeadLetter(
                command=cmd,
                raw="{}",
                subject="x",
                error=f"boom {n}",
                reason="exhausted",
                deliveries=5,
                stream_seq=n,
                failed_at=datetime.now(UTC),
            )
            ack = await js.publish(
                settings.names.dead_letter_subject, dead_letter_encoder.encode(letter)
            )
            letters[ack.seq] = cmd.connection_id
        for seq in list(letters)[10:20]:  # replayed: gone from the stream
            await js.delete_msg(settings.names.dead_letter_stream, seq)
            del letters[seq]
    finally:
        await nc.close()
    listed = run(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == len(letters) == 120
    for line, (seq, connection_id) in zip(lines, sorted(letters.items()), strict=True):
        assert line.split("\t")[0] == str(seq)
        assert str(connection_id) in line


async def test_a_database_without_tables_or_out_of_reach_is_said_plainly(
    settings: Settings,
) -> None:
    """No traceback: an unmigrated schema says to migrate; an unreachable database or NATS
    says which (without credentials), and the command ends instead of waiting forever."""
    empty = msgspec.structs.replace(settings, db_schema=f"zz_empty_{uuid.uuid4().hex[:8]}")
    for args in (["tenant", "list"], ["server", "list"], ["webhooks", "failed"]):
        out = run(empty, *args)
        assert out.returncode == 2, (args, out)
        assert "no zapbus tables" in out.stderr and "zapbus migrate" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    port = free_port()
    gone = msgspec.structs.replace(
        settings, database_url=f"postgresql://postgres:hush@127.0.0.1:{port}/postgres"
    )
    out = run(gone, "tenant", "create", "x")
    assert out.returncode == 1 and f"cannot use the database at postgresql://127.0.0.1:{port}" in (
        out.stderr
    ), out.stderr
    assert "hush" not in out.stderr and "Traceback" not in out.stderr
    # `zapbus reconcile` runs the session worker's command in a child process: same answers
    out = run(gone, "reconcile", "--dry-run")
    assert out.returncode == 1 and f"cannot use the database at postgresql://127.0.0.1:{port}" in (
        out.stderr
    ), out.stderr
    assert "hush" not in out.stderr and "Traceback" not in out.stderr
    no_nats = msgspec.structs.replace(settings, nats_url=f"nats://127.0.0.1:{port}")
    out = run(no_nats, "dlq", "list")
    assert out.returncode == 1 and "cannot use NATS at" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_the_cli_in_a_make_run_folder_uses_the_pool_make_run_was_given(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make run`` records the ZAPBUS_* settings it was started with (the pool among them), so
    ``zapbus server list`` in another shell lists that pool and its cap, not a default."""
    monkeypatch.setenv("ZAPBUS_BAILEYS_URLS", "a=http://127.0.0.1:1,b=http://127.0.0.1:2")
    monkeypatch.setenv("ZAPBUS_BAILEYS_API_KEY", "pool-key")
    monkeypatch.setenv("ZAPBUS_BAILEYS_MAX_SESSIONS", "7")
    monkeypatch.setenv("ZAPBUS_DB_SCHEMA", settings.db_schema)
    monkeypatch.delenv("ZAPBUS_BAILEYS_URL", raising=False)
    state = write_state(tmp_path / ".zapbus", Infra(settings.nats_url, settings.database_url))
    assert state.stat().st_mode & 0o077 == 0  # it holds the API key: its owner's only
    shell = {k: v for k, v in os.environ.items() if not k.startswith("ZAPBUS_")}
    out = subprocess.run(
        [ZAPBUS, "server", "list", "--json"],
        env=shell,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [(s["name"], s["max_sessions"]) for s in listed] == [("a", 7), ("b", 7)], listed
    # a server named in the shell replaces the recorded pool (not "both set")
    out = subprocess.run(
        [ZAPBUS, "server", "list", "--json"],
        env={**shell, "ZAPBUS_BAILEYS_URL": "http://127.0.0.1:3"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert [s["name"] for s in json.loads(out.stdout)] == ["127.0.0.1:3"], out.stdout


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("ZAPBUS_BAILEYS_MAX_CONCURRENT_CREATES", "-1", ">= 1"),  # a Semaphore's traceback
        ("ZAPBUS_BAILEYS_MAX_CONCURRENT_CREATES", "0", ">= 1"),  # every create waits forever
        ("ZAPBUS_WORKER_CONCURRENCY", "0", ">= 1"),
        ("ZAPBUS_DB_POOL_SIZE", "0", ">= 1"),
        ("ZAPBUS_BAILEYS_MAX_SESSIONS", "-1", ">= 0"),
        ("ZAPBUS_GATEWAY_PORT", "70000", "<= 65535"),
        ("ZAPBUS_BAILEYS_FAILOVER_AFTER_SECONDS", "nan", "finite"),
        ("ZAPBUS_BAILEYS_FAILOVER_AFTER_SECONDS", "inf", "finite"),
        ("ZAPBUS_BAILEYS_HEALTH_INTERVAL_SECONDS", "nan", "finite"),
        ("ZAPBUS_BAILEYS_FAILOVER_PER_SECOND", "nan", "finite"),
        ("ZAPBUS_DB_COMMAND_TIMEOUT_SECONDS", "-3", ">= 0"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_variable(
    var: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=f"in {var}: .*{re.escape(says)}"):
        load_settings({var: value})
