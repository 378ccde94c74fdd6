"""The ``zapbus`` command: run everything locally, migrate, manage tenants and keys."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from zapbus import bus, db, dlq, oneshot, topology
from zapbus.config import ConfigError, Settings, load_settings
from zapbus.tenants import check_tenant_name, create_tenant, list_tenants, rotate_key
from zapbus.tools import servercli
from zapbus.tools.localinfra import read_state

RECONCILE_COMMAND = "services.session_worker.reconcile_command"


async def _migrate(settings: Settings) -> None:
    applied = await db.migrate(settings.database_url, settings.db_schema)
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    # The streams and consumers: declared here only, never by the services (zapbus/topology.py)
    declared = await topology.declare_with(settings)
    print(f"declared: {', '.join(declared)}")


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


async def _dlq_list(settings: Settings) -> int:
    nc = await bus.connect(settings.nats_url, "zapbus-cli", oneshot.NATS_ATTEMPTS)
    try:
        await bus.require_streams(nc.jetstream(), settings.names)
        letters = await dlq.list_letters(nc.jetstream(), settings.names)
    except bus.MissingStreams as exc:
        print(f"zapbus: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    if not letters:
        print("no dead letters")
    for item in letters:
        d = item.letter
        target = f"{d.command.connection_id} gen {d.command.generation}" if d.command else "-"
        kind = d.command.kind.replace("_", " ") if d.command else "unknown"
        print(
            f"{item.seq}\t{d.failed_at:%Y-%m-%d %H:%M:%S}\t{kind}\t{d.reason}\t{target}"
            f"\t{d.deliveries} deliveries\t{d.error}"
        )
    return 0


async def _dlq_replay(settings: Settings, seq: int) -> int:
    nc = await bus.connect(settings.nats_url, "zapbus-cli", oneshot.NATS_ATTEMPTS)
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        letter = await dlq.replay(nc.jetstream(), pool, settings.names, seq)
    except dlq.ReplayError as exc:
        print(f"cannot replay {seq}: {exc}", file=sys.stderr)
        return 1
    finally:
        await pool.close()
        await nc.close()
    assert letter.command is not None
    print(f"replayed {letter.command.kind} for connection {letter.command.connection_id}")
    return 0


async def _webhooks_failed(settings: Settings) -> int:
    from zapbus import endpoints

    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    try:
        rows = await endpoints.given_up(pool)
    finally:
        await pool.close()
    for r in rows:
        print(
            f"{r['webhook_id']}  {r['tenant']}  {r['event_type']}  {r['connection_id']}"
            f"  attempts={r['attempts']}  {r['url']}  {r['last_error'] or ''}"
        )
    return 0


async def _webhooks_replay(settings: Settings, ids: list[str]) -> int:
    from zapbus import endpoints

    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    status = 0
    try:
        for webhook_id in ids:
            outcome = await endpoints.replay(pool, webhook_id)
            print(f"{webhook_id}: {outcome}")
            status = status or (0 if outcome == "replayed" else 1)
    finally:
        await pool.close()
    return status


# settings that go together: one named in the shell replaces the state file's whole group
# (ZAPBUS_BAILEYS_URL in the shell with ZAPBUS_BAILEYS_URLS from the file would be "both set")
_GROUPS = (("ZAPBUS_BAILEYS_URL", "ZAPBUS_BAILEYS_URLS", "ZAPBUS_BAILEYS_API_KEYS"),)


def _over_state(found: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """The settings of the ``make run`` in this folder (``found``), under the shell's own."""
    kept = dict(found)
    for group in _GROUPS:
        if any(var in env for var in group):
            for var in group:
                kept.pop(var, None)
    return {**kept, **env}


def _sequence(text: str) -> int:
    """A dead letter's stream sequence: a whole number from 1 (argparse type)."""
    try:
        seq = int(text)
    except ValueError:
        seq = 0
    if seq < 1:
        raise argparse.ArgumentTypeError(f"a sequence is a whole number from 1, not {text!r}")
    return seq


def _tenant_name(text: str) -> str:
    """A tenant name: not blank, no control characters (argparse type)."""
    try:
        return check_tenant_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zapbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start NATS/Postgres if needed, the services and the simulator")
    sub.add_parser(
        "migrate", help="apply the database migrations; declare the JetStream streams and consumers"
    )
    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    tenant.add_parser("create", help="create a tenant and print its API key").add_argument(
        "name", type=_tenant_name
    )
    tenant.add_parser("list", help="list tenants")
    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    key.add_parser("rotate", help="give a tenant a new API key").add_argument("name")
    letters = sub.add_parser("dlq", help="dead letters").add_subparsers(
        dest="action", required=True
    )
    letters.add_parser("list", help="list dead letters")
    letters.add_parser("replay", help="queue a dead letter's command again").add_argument(
        "seq", type=_sequence, help="the dead letter's sequence, as `dlq list` shows it"
    )
    hooks = sub.add_parser("webhooks", help="webhook deliveries").add_subparsers(
        dest="action", required=True
    )
    hooks.add_parser("failed", help="list deliveries given up on (newest first)")
    hooks.add_parser("replay", help="send given-up deliveries again").add_argument(
        "webhook_id", nargs="+", help="a webhook-id, as `webhooks failed` shows it"
    )
    reconcile = sub.add_parser(
        "reconcile", help="compare the Baileys server's sessions with the connections; repair"
    )
    reconcile.add_argument("--dry-run", action="store_true", help="print the drift, repair nothing")
    server = sub.add_parser("server", help="the pool of Baileys servers").add_subparsers(
        dest="action", required=True
    )
    server.add_parser("list", help="each server's URL, health, sessions, drain flag").add_argument(
        "--json", action="store_true", help="as JSON"
    )
    drain = server.add_parser("drain", help="stop new placements on a server")
    drain.add_argument("name")
    drain.add_argument(
        "--move",
        action="store_true",
        help="also move its connections to other servers, one at a time",
    )
    server.add_parser("undrain", help="let a drained server take placements again").add_argument(
        "name"
    )
    args = parser.parse_args(argv)
    # the servers a `make run` in this folder uses, unless ZAPBUS_* variables say otherwise
    found = {} if args.command == "run" else read_state(Path(".zapbus"))
    try:
        settings = load_settings(_over_state(found, os.environ))
    except ConfigError as exc:
        print(f"zapbus: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        from zapbus.tools.devrun import run_dev

        return asyncio.run(run_dev(Path(".zapbus").absolute()))
    env = _over_state(found, os.environ)
    return oneshot.guarded(settings, lambda: _dispatch(args, settings, env))


def _dispatch(args: argparse.Namespace, settings: Settings, env: Mapping[str, str]) -> int:
    match args.command, getattr(args, "action", None):
        case "migrate", _:
            asyncio.run(_migrate(settings))
        case "tenant", "create":
            asyncio.run(_tenant_create(settings, args.name))
        case "tenant", "list":
            asyncio.run(_tenant_list(settings))
        case "key", "rotate":
            return asyncio.run(_key_rotate(settings, args.name))
        case "dlq", "list":
            return asyncio.run(_dlq_list(settings))
        case "dlq", "replay":
            return asyncio.run(_dlq_replay(settings, args.seq))
        case "webhooks", "failed":
            return asyncio.run(_webhooks_failed(settings))
        case "webhooks", "replay":
            return asyncio.run(_webhooks_replay(settings, args.webhook_id))
        case "reconcile", _:
            # the session worker's sweep, run by its own command: zapbus imports no service
            dry_run = ["--dry-run"] if args.dry_run else []
            return oneshot.run_module(RECONCILE_COMMAND, dry_run, env)
        case "server", "list":
            return asyncio.run(servercli.server_list(settings, args.json))
        case "server", "drain":
            return asyncio.run(servercli.server_drain(settings, args.name, True, args.move))
        case "server", "undrain":
            return asyncio.run(servercli.server_drain(settings, args.name, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
