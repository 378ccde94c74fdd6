"""Postgres access shared by the services: the pool and the schema migrations.

Migrations are numbered SQL files in ``zapbus/migrations``; each runs once, in its own
transaction, recorded in ``schema_migrations``. Running them twice does nothing; two processes
migrating at once serialise on an advisory lock.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any

import asyncpg

from zapbus.config import Settings

log = logging.getLogger("zapbus.db")

# The errors that mean the database cannot answer now (gone, restarting, or past
# ZAPBUS_DB_COMMAND_TIMEOUT_SECONDS / the acquire timeout): a loop logs them and tries again.
UNAVAILABLE = (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError)

_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_LOCK_ID = 0x7A617062  # "zapb"


def _check_schema(schema: str) -> str:
    if not _SCHEMA.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return schema


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release: zapbus keeps no session state (no SET, no
    LISTEN, only transaction-scoped advisory locks; the leases of zapbus/leases.py undo
    theirs before they hand their connection back), and the reset was a full round trip on
    every release (~8-12 % of a service's CPU under load, bench/findings.md). asyncpg still
    rolls back a transaction left open."""


class TimedPool(asyncpg.Pool):  # type: ignore[misc]
    """A pool whose ``acquire()`` (and so ``fetch``/``execute``... on the pool) gives up after
    ``acquire_timeout`` seconds unless the caller passes its own timeout: with Postgres hung
    or every connection busy, a request fails with TimeoutError instead of waiting forever."""

    acquire_timeout: float | None = None

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


async def create_pool(
    dsn: str,
    schema: str = "public",
    *,
    command_timeout: float | None = None,
    acquire_timeout: float | None = None,
    idle_in_transaction_timeout: float | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose connections resolve zapbus's tables in ``schema``.

    ``command_timeout`` bounds every statement (asyncpg cancels it and raises TimeoutError);
    ``acquire_timeout`` bounds the wait for a pooled connection (see TimedPool);
    ``idle_in_transaction_timeout``: Postgres ends a session idle that long inside a
    transaction (a process frozen mid-transaction), so its locks do not outlive it.
    """
    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("max_size", 10)
    settings = {
        "search_path": _check_schema(schema),
        # SSD storage: without it, a young connection_events table with no statistics yet
        # is seq-scanned for every projector batch's duplicate check.
        "random_page_cost": "1.1",
    }
    if idle_in_transaction_timeout is not None:
        settings["idle_in_transaction_session_timeout"] = str(
            max(1, int(idle_in_transaction_timeout * 1000))
        )
    # asyncpg.create_pool(), with our Pool class (it takes none); these are its defaults.
    pool = TimedPool(
        dsn,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        server_settings=settings,
        reset=_keep_session,
        command_timeout=command_timeout,
        **kwargs,
    )
    pool.acquire_timeout = acquire_timeout
    await pool
    return pool


async def open_pool(settings: Settings, **kwargs: Any) -> asyncpg.Pool:
    """The pool of a service: its schema, size, statement and acquire timeouts."""
    kwargs.setdefault("max_size", settings.db_pool_size)
    return await create_pool(
        settings.database_url,
        settings.db_schema,
        command_timeout=settings.db_command_timeout_seconds,
        acquire_timeout=settings.db_acquire_timeout_seconds,
        idle_in_transaction_timeout=settings.leader_timeout_seconds,
        **kwargs,
    )


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped with zapbus, in order."""
    found = []
    for entry in resources.files("zapbus.migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(dsn: str, schema: str = "public") -> list[str]:
    """Apply the migrations not yet applied to ``schema``; return the names applied."""
    schema = _check_schema(schema)
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                log.info("applied migration %s to schema %s", name, schema)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied
