"""The ``zapbus`` command: run everything locally, migrate, manage tenants and keys."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from zapbus import db
from zapbus.config import ConfigError, Settings, load_settings
from zapbus.tenants import create_tenant, list_tenants, rotate_key


async def _migrate(settings: Settings) -> None:
    applied = await db.migrate(settings.database_url, settings.db_schema)
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


async def _tenant_create(settings: Settings, name: str) -> None:
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        tenant, key = await create_tenant(pool, name)
    finally:
        await pool.close()
    print(f"tenant {tenant.name} ({tenant.id})\napi key (shown once): {key}")


async def _tenant_list(settings: Settings) -> None:
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        rows = await list_tenants(pool)
    finally:
        await pool.close()
    for r in rows:
        print(
            f"{r['name']}\t{r['id']}\t{r['connections']} connections"
            f"\tsince {r['created_at']:%Y-%m-%d}"
        )


async def _key_rotate(settings: Settings, name: str) -> int:
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        key = await rotate_key(pool, name)
    finally:
        await pool.close()
    if key is None:
        print(f"no tenant named {name!r}", file=sys.stderr)
        return 1
    print(f"new api key for {name} (shown once; the old one no longer works): {key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zapbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start NATS/Postgres if needed, the services and the simulator")
    sub.add_parser("migrate", help="apply the database migrations")
    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    tenant.add_parser("create", help="create a tenant and print its API key").add_argument("name")
    tenant.add_parser("list", help="list tenants")
    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    key.add_parser("rotate", help="give a tenant a new API key").add_argument("name")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"zapbus: {exc}", file=sys.stderr)
        return 2
    match args.command, getattr(args, "action", None):
        case "run", _:
            from zapbus.devrun import run_dev

            return asyncio.run(run_dev(Path(".zapbus").absolute()))
        case "migrate", _:
            asyncio.run(_migrate(settings))
        case "tenant", "create":
            asyncio.run(_tenant_create(settings, args.name))
        case "tenant", "list":
            asyncio.run(_tenant_list(settings))
        case "key", "rotate":
            return asyncio.run(_key_rotate(settings, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
