"""``python -m services.session_worker.reconcile_command [--dry-run]``: one reconciler sweep,
printed as a table of drift items (what ``zapbus reconcile`` runs, with the settings of the
environment it is given).

It runs the service's own ``Reconciler`` against every configured Baileys server, taking the
sweep lock like the workers' loop (it waits up to 30 s for a sweep in progress). Exit code 0
after a sweep, 1 when no sweep ran (no Baileys server answered, or the lock stayed held), 2 on
a configuration error or an unmigrated schema.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import aiohttp
from prometheus_client import CollectorRegistry

from services.session_worker.app import build_servers, reconcile_policy
from services.session_worker.reconciler import ReconcileMetrics, Reconciler
from zapbus import bus, db, oneshot
from zapbus.config import ConfigError, Settings, load_settings


async def reconcile(settings: Settings, dry_run: bool) -> int:
    """One sweep (repairing unless ``dry_run``); prints the drift found."""
    nc = await bus.connect(settings.nats_url, "zapbus-cli", oneshot.NATS_ATTEMPTS)
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=4)
    try:
        async with aiohttp.ClientSession() as http:
            reconciler = Reconciler(
                pool=pool,
                js=nc.jetstream(),
                names=settings.names,
                servers=build_servers(settings, http, None),
                metrics=ReconcileMetrics(CollectorRegistry()),
                interval_seconds=settings.reconcile_interval_seconds,
                policy=reconcile_policy(settings),
                leader_timeout_seconds=settings.leader_timeout_seconds,
            )
            drift = await reconciler.sweep(dry_run=dry_run, wait_for_lock=30.0)
    finally:
        await pool.close()
        await nc.close()
    if drift is None:
        print("no sweep: no Baileys server answered, or another sweep held the lock")
        return 1
    rows = [
        (
            i.kind,
            i.session_name,
            str(i.connection_id or "-"),
            str(i.generation or "-"),
            i.row_status or "-",
            i.server or "-",
            i.server_state or "-",
            ("would " if dry_run else "") + i.action if i.ripe else i.action,
        )
        for i in drift.items
    ]
    # ON: the Baileys server it was seen on; SERVER: the state that server reports
    header = ("KIND", "SESSION", "CONNECTION", "GEN", "ROW", "ON", "SERVER", "ACTION")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(rows)} drift item(s){' (dry run: nothing repaired)' if dry_run else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zapbus reconcile", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the drift, repair nothing")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"zapbus: {exc}", file=sys.stderr)
        return 2
    return oneshot.guarded(settings, lambda: asyncio.run(reconcile(settings, args.dry_run)))


if __name__ == "__main__":
    sys.exit(main())
