"""``zapbus server list | drain NAME [--move] | undrain NAME``: the pool of Baileys servers.

``list`` shows each configured server's name, URL (without credentials), health, session
counts and drain flag, from what the session workers' pool manager last saw. ``drain`` stops
new placements on a server (``--move`` also moves its connections off it, one at a time, each
after the previous one is live again elsewhere); ``undrain`` ends both.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import asyncpg

from zapbus import db
from zapbus.config import Settings
from zapbus.counts import PLACED_COUNTS
from zapbus.servers import public_url


def _health(row: asyncpg.Record | None, now: datetime, rejoin: float, stale: float) -> str:
    if row is None or row["up"] is None or row["checked_at"] is None:
        return "unknown"
    ago = (now - row["checked_at"]).total_seconds()
    if ago > stale:  # no session worker has probed it lately
        return f"unknown (not probed for {int(ago)}s)"
    if row["up"] is False:
        since = row["down_since"]
        return f"down {int((now - since).total_seconds())}s" if since else "down"
    if row["up_since"] is not None and (now - row["up_since"]).total_seconds() < rejoin:
        return "up (rejoining)"
    return "up"


async def _pool(settings: Settings) -> asyncpg.Pool | None:
    try:
        return await db.create_pool(settings.database_url, settings.db_schema, max_size=1)
    except db.UNAVAILABLE as exc:
        where = public_url(settings.database_url)
        print(f"zapbus: cannot use the database at {where}: {exc}", file=sys.stderr)
        return None


async def server_list(settings: Settings, as_json: bool = False) -> int:
    pool = await _pool(settings)
    if pool is None:
        return 1
    try:
        seen = {r["name"]: r for r in await pool.fetch("SELECT * FROM baileys_servers")}
        placed = {r["server"]: r["n"] for r in await pool.fetch(PLACED_COUNTS)}
        now = datetime.now(UTC)
    finally:
        await pool.close()
    configured = {s.name: s.public_url for s in settings.servers}
    # servers no longer configured but still holding connections are shown too
    gone = {n: r["url"] for n, r in seen.items() if n not in configured and placed.get(n)}
    out = []
    for name, url in {**configured, **gone}.items():
        row = seen.get(name)
        health = _health(
            row,
            now,
            settings.baileys_rejoin_after_seconds,
            max(30.0, 6 * settings.baileys_health_interval_seconds),
        )
        out.append(
            {
                "name": name,
                "url": url,
                "configured": name in configured,
                "health": health if name in configured else "not configured",
                "sessions": row["sessions"] if row is not None and row["up"] else None,
                "placed": placed.get(name, 0),
                "max_sessions": settings.baileys_max_sessions or None,
                "drained": bool(row and row["drained"]),
                "moving": bool(row and row["move"]),
            }
        )
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    header = ("NAME", "URL", "HEALTH", "SESSIONS", "PLACED", "CAP", "DRAINED")
    rows = [
        (
            s["name"],
            s["url"],
            s["health"],
            "-" if s["sessions"] is None else str(s["sessions"]),
            str(s["placed"]),
            str(s["max_sessions"] or "-"),
            ("yes, moving" if s["moving"] else "yes") if s["drained"] else "no",
        )
        for s in out
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def server_drain(settings: Settings, name: str, drained: bool, move: bool = False) -> int:
    """Drain (``move``: and empty) or undrain one server. A plain drain leaves a move under
    way going; only undrain stops it."""
    names = [s.name for s in settings.servers]
    spec = next((s for s in settings.servers if s.name == name), None)
    pool = await _pool(settings)
    if pool is None:
        return 1
    try:
        # a server no longer configured can still be drained (to move its connections off)
        known = spec is not None or await pool.fetchval(
            "SELECT true FROM baileys_servers WHERE name = $1", name
        )
        if not known:
            print(
                f"zapbus: no Baileys server named {name!r}; configured: {', '.join(names)}",
                file=sys.stderr,
            )
            return 2
        await pool.execute(
            "INSERT INTO baileys_servers (name, url, drained, move) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (name) DO UPDATE SET drained = $3,"
            " move = CASE WHEN $3 THEN baileys_servers.move OR $4 ELSE false END,"
            " moving = CASE WHEN $3 THEN baileys_servers.moving END, updated_at = now()",
            name,
            spec.public_url if spec is not None else "",
            drained,
            move and drained,
        )
    finally:
        await pool.close()
    if not drained and spec is None:
        print(f"{name}: undrained (it is not configured: it takes no placements)")
    elif not drained:
        print(f"{name}: undrained, takes new placements again")
    elif move:
        print(f"{name}: drained; its connections move to other servers one at a time")
    else:
        print(f"{name}: drained, takes no new placements (its connections stay)")
    return 0
