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

import asyncpg

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


async def run(
    dsn: str, live: int, servers: int, placements: int, runs: list[int], counted: bool
) -> None:
    names = [f"b{n}" for n in range(1, servers + 1)]
    specs = tuple(ServerSpec(name=n, url=f"http://{n}:3000") for n in names)
    schema = f"place_{uuid.uuid4().hex[:8]}"
    await db.migrate(dsn, schema)
    pool = await db.create_pool(dsn, schema, max_size=max(runs) + 2)
    try:
        ids = await load(pool, live, names, placements * len(runs))
        await pool.executemany(
            "INSERT INTO baileys_servers (name, url) VALUES ($1, $2)",
            [(s.name, s.url) for s in specs],
        )
        stop = asyncio.Event()
        refresher = asyncio.create_task(refresh(pool, stop)) if counted else None
        print(
            f"{live:,} live connections on {servers} servers; {placements} placements a run;"
            f" {'with' if counted else 'without'} the pool manager's fold of the counts"
        )
        print("concurrency  p50 ms  p99 ms  placements/s")
        for n, concurrency in enumerate(runs):
            batch = ids[n * placements : (n + 1) * placements]
            times, wall = await measure(pool, batch, specs, concurrency)
            print(
                f"{concurrency:11d}  {_pct(times, 0.5):6.2f}  {_pct(times, 0.99):6.2f}"
                f"  {len(times) / wall:12.0f}"
            )
        stop.set()
        if refresher is not None:
            await refresher
        spread = await pool.fetch(
            "SELECT server, count(*) AS n FROM placements GROUP BY server ORDER BY server"
        )
        print("new placements by server: " + ", ".join(f"{r['server']} {r['n']}" for r in spread))
    finally:
        await pool.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


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
    asyncio.run(
        run(
            args.database_url,
            args.live,
            args.servers,
            args.placements,
            args.concurrency,
            not args.no_refresh,
        )
    )


if __name__ == "__main__":
    main()
