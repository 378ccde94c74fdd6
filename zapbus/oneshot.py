"""One-shot commands: run one coroutine to its end with plain error messages, or run a
service's own command as a child process.

A command a service owns (``zapbus reconcile`` is the session worker's sweep) runs as
``python -m services.<name>.<command>`` in a child process, so the ``zapbus`` tools never
import a service (the boundaries of tests/test_boundaries.py); ``guarded`` gives that child and
the ``zapbus`` command the same answers for an unmigrated schema or an unreachable server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping

import asyncpg
import nats.errors

from zapbus import bus, db
from zapbus.config import Settings
from zapbus.servers import public_url

# a command gives up on an unreachable NATS after these reconnects (a few seconds)
NATS_ATTEMPTS = 3


def guarded(settings: Settings, command: Callable[[], int]) -> int:
    """Run ``command`` (which runs its own event loop); its exit code, or 2 (no zapbus tables)
    or 1 (database or NATS out of reach) with one line on stderr that names where, without
    credentials: no traceback."""
    try:
        return command()
    except asyncpg.UndefinedTableError:
        print(
            f"zapbus: the database at {public_url(settings.database_url)} has no zapbus tables"
            f" in schema {settings.db_schema!r}: run `zapbus migrate` first",
            file=sys.stderr,
        )
        return 2
    except nats.errors.Error as exc:
        where = ", ".join(public_url(u) for u in bus.server_urls(settings.nats_url))
        print(f"zapbus: cannot use NATS at {where}: {exc}", file=sys.stderr)
        return 1
    except db.UNAVAILABLE as exc:
        where = public_url(settings.database_url)
        print(f"zapbus: cannot use the database at {where}: {exc}", file=sys.stderr)
        return 1


def run_module(module: str, args: list[str], env: Mapping[str, str]) -> int:
    """``python -m module args`` with this interpreter and ``env``, its output on ours; its
    exit code."""
    return subprocess.run([sys.executable, "-m", module, *args], env=dict(env)).returncode
