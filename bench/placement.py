"""What placing a connection on a Baileys server costs, with many live connections in the pool.

``python -m bench.placement --live 50000 --servers 3 --placements 2000 --concurrency 1 50``
loads that many live connections spread over the servers into a throwaway schema, then places
new ones with ``placement.place`` (the worker's call: an advisory lock, the load of each
server, the choice, the inserts), sequentially and from concurrent tasks, and prints the
latency of one placement (p50, p99) and placements per second. Placements are serialized by
their lock, so the concurrent figure is the ceiling of the whole deployment, not of one
worker. ``--no-refresh`` leaves out the pool manager's fold of the counts' changes (every
second in production, ``zapbus/counts.py``): each placement then adds up every change made
since the run began.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench.harness import Ctx
from bench.stats import Section
from proto.commands import CreateSession
from services.session_worker.placement import Placed, PlacementPolicy, place
from zapbus import db
from zapbus.counts import FOLD
from zapbus.servers import ServerSpec


async def load(pool: asyncpg.Pool, live: int, servers: list[str], new: int) -> list[uuid.UUID]:
    """``live`` placed connections (spread over ``servers``), and ``new`` unplaced ones."""
    tenant = await pool.fetchval(
        "INSERT INTO tenants (id, name, api_key_hash) VALUES (gen_random_uuid(), 'bench',"
        " sha256('k'::bytea)) RETURNING id"
    )
    await pool.execute(
        """
        INSERT INTO connections (id, tenant_id, name, session_name, status, server, created_at,
            updated_at, status_changed_at)
        SELECT gen_random_uuid(), $1, 'c' || n, 'zb_' || n,
            CASE WHEN n % 4 = 0 THEN 'deleted' WHEN n % 4 = 1 THEN 'qr_ready' ELSE 'connected' END,
            ($2::text[])[1 + n % array_length($2::text[], 1)], now(), now(), now()
        FROM generate_series(1, $3) n
        """,
        tenant,
        servers,
        live * 4 // 3,  # a quarter ended: they do not count
    )
    ids = [uuid.uuid4() for _ in range(new)]
    await pool.executemany(
        "INSERT INTO connections (id, tenant_id, name, session_name, status, created_at,"
        " updated_at, status_changed_at) VALUES ($1, $2, 'new', $3, 'pending', now(), now(),"
        " now())",
        [(i, tenant, f"zb_{i.hex}_g1") for i in ids],
    )
    await pool.execute("ANALYZE connections")
    return ids


async def refresh(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    """What the pool manager does every tick: fold the counts' changes."""
    while not stop.is_set():
        await pool.execute(FOLD)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def measure(
    pool: asyncpg.Pool, ids: list[uuid.UUID], specs: tuple[ServerSpec, ...], concurrency: int
) -> tuple[list[float], float]:
    """(seconds per placement, wall seconds) placing every id with ``concurrency`` tasks."""
    queue = list(ids)
    times: list[float] = []

    async def worker() -> None:
        while queue:
            cid = queue.pop()
            cmd = CreateSession(
                command_id=uuid.uuid4(),
                connection_id=cid,
                tenant_id=uuid.UUID(int=0),
                generation=1,
                session_name=f"zb_{cid.hex}_g1",
                requested_at=datetime.now(UTC),
            )
            start = time.perf_counter()
            placed = await place(pool, cmd, specs, PlacementPolicy())
            times.append(time.perf_counter() - start)
            assert isinstance(placed, Placed), placed

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def placements(
    dsn: str, live: int, servers: int, placements: int, runs: list[int], counted: bool
) -> dict[str, Any]:
    """Load ``live`` connections into a throwaway schema, then time ``placements`` placements
    with each concurrency of ``runs``: ``{"runs": [(concurrency, p50 ms, p99 ms, per s)],
    "spread": {server: new placements}}``."""
    names = [f"b{n}" for n in range(1, servers + 1)]
    specs = tuple(ServerSpec(name=n, url=f"http://{n}:3000") for n in names)
    schema = f"place_{uuid.uuid4().hex[:8]}"
    await db.migrate(dsn, schema)
    pool = await db.create_pool(dsn, schema, max_size=max(runs) + 2)
    out: dict[str, Any] = {"runs": []}
    try:
        ids = await load(pool, live, names, placements * len(runs))
        await pool.executemany(
            "INSERT INTO baileys_servers (name, url) VALUES ($1, $2)",
            [(s.name, s.url) for s in specs],
        )
        stop = asyncio.Event()
        refresher = asyncio.create_task(refresh(pool, stop)) if counted else None
        for n, concurrency in enumerate(runs):
            batch = ids[n * placements : (n + 1) * placements]
            times, wall = await measure(pool, batch, specs, concurrency)
            out["runs"].append(
                (concurrency, _pct(times, 0.5), _pct(times, 0.99), len(times) / wall)
            )
        stop.set()
        if refresher is not None:
            await refresher
        spread = await pool.fetch(
            "SELECT server, count(*) AS n FROM placements GROUP BY server ORDER BY server"
        )
        out["spread"] = {r["server"]: r["n"] for r in spread}
    finally:
        await pool.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()
    return out


async def run(ctx: Ctx) -> Section:
    """``make bench``'s section 6: placements with few and with many live connections."""
    s = ctx.scale
    sec = Section(
        "6. Placing a connection on a pool of Baileys servers",
        f"`placement.place` (the session worker's call before each create: the placement "
        f"lock, each server's load, the choice, the inserts) in a throwaway schema holding "
        f"live connections spread over 3 servers (a quarter more ended ones, which do not "
        f"count), with the pool manager's fold of the counts every second beside it; "
        f"{s.placement_n} placements one at a time, then {s.placement_n} from 50 concurrent "
        f"tasks, in this process (no services). Placements are serialized by their lock, so "
        f"the concurrent figure is the ceiling of a whole deployment. `python -m "
        f"bench.placement` runs it alone with other sizes.",
        [
            "live connections",
            "p50 (ms), 1 task",
            "p99 (ms), 1 task",
            "placements/s, 1 task",
            "p50 (ms), 50 tasks",
            "placements/s, 50 tasks",
            "new placements by server",
        ],
    )
    p50s: list[float] = []
    for live in s.placement_live:
        ctx.say(f"placement: {live:,} live connections, {s.placement_n} placements a run")
        await ctx.quiet()
        r = await placements(ctx.database_url, live, 3, s.placement_n, [1, 50], True)
        (_, p50, p99, rate), (_, p50_many, _, rate_many) = r["runs"]
        p50s.append(p50)
        sec.row(
            f"{live:,}",
            f"{p50:.2f}",
            f"{p99:.2f}",
            f"{rate:.0f}",
            f"{p50_many:.1f}",
            f"{rate_many:.0f}",
            " / ".join(str(n) for n in r["spread"].values()),
        )
    growth = p50s[-1] / p50s[0]
    sec.notes.append(
        f"p50 of one placement with {s.placement_live[-1]:,} live connections is "
        f"{growth:.2f}x that with {s.placement_live[0]:,}: the load of each server is read "
        f"from the counts (migration 016), not counted over its connections."
    )
    return sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=50_000)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--placements", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--no-refresh", action="store_true", help="no pool manager's count")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "ZAPBUS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    counted = not args.no_refresh
    print(
        f"{args.live:,} live connections on {args.servers} servers; {args.placements} placements"
        f" a run; {'with' if counted else 'without'} the pool manager's fold of the counts"
    )
    out = asyncio.run(
        placements(
            args.database_url,
            args.live,
            args.servers,
            args.placements,
            args.concurrency,
            counted,
        )
    )
    print("concurrency  p50 ms  p99 ms  placements/s")
    for concurrency, p50, p99, rate in out["runs"]:
        print(f"{concurrency:11d}  {p50:6.2f}  {p99:6.2f}  {rate:12.0f}")
    print("new placements by server: " + ", ".join(f"{k} {n}" for k, n in out["spread"].items()))


if __name__ == "__main__":
    main()
