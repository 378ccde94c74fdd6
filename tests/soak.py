"""A seeded fault schedule over a real deployment, checked against the simulator's own truth.

``run_schedule(workdir, seed, steps)`` starts the four services as processes on throwaway NATS
and PostgreSQL servers (tests/faults.py), then plays ``steps`` operations drawn from
``random.Random(seed)``: creates, recreates, deletes, scans, logouts, reconnect cycles with
identical bodies, duplicated and reversed webhook replays, creates that time out after the
server made the session, a server restart that drops every session, failing creates and
deletes, worker SIGKILL, NATS restart, Postgres restart, DLQ replays. Then the faults stop and
it waits (bounded) for the invariants to hold:

1. at most one live server session per connection, and only of its current generation;
2. no live server session for a deleted or terminal row;
3. every accepted create ends terminal with a reason, or live and agreed by the server;
4. nothing left in the outbox, no command pending in the worker's consumer;
5. history holds every applied transition, in order (each applied row starts where the one
   before it ended, and the last ends where the row is).

The same seed draws the same schedule (timing on a real machine still varies; a failure prints
its seed and the schedule so it can be replayed with ``make soak SEED=... STEPS=...``).

    python -m tests.soak --seed 7 --steps 60       # one schedule
    python -m tests.soak --minutes 30               # random seeds until the time is up
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats

from services.baileys_sim.config import SimConfig
from services.session_worker.drift import parse_session_name
from tests.faults import ProcessStack, process_stack
from zapbus import dlq
from zapbus.config import Settings
from zapbus.connection import states

TERMINAL = {s.value for s in states.TERMINAL}
# What the simulator's session state may look like behind a live row (the server agrees).
AGREES = {
    "awaiting_qr": {"qr", "connecting"},
    "qr_ready": {"qr"},
    "pairing": {"connected"},
    "connected": {"connected"},
    "reconnecting": {"connecting", "qr"},
}

SIM = SimConfig(
    port=0,
    create_delay=(0.05, 0.4),
    qr_first_seconds=60,
    qr_next_seconds=20,
    hang_seconds=3.0,
    seed=0,
)
ENV = {
    "ZAPBUS_BAILEYS_TIMEOUT_SECONDS": "1",
    "ZAPBUS_CREATE_MAX_ATTEMPTS": "4",
    "ZAPBUS_RETRY_BASE_SECONDS": "0.2",
    "ZAPBUS_RETRY_MAX_SECONDS": "1",
    "ZAPBUS_ACK_WAIT_SECONDS": "3",
    "ZAPBUS_OUTBOX_POLL_SECONDS": "0.2",
    "ZAPBUS_WATCHDOG_DEADLINE_SECONDS": "6",
    "ZAPBUS_WATCHDOG_INTERVAL_SECONDS": "0.5",
    "ZAPBUS_RECONCILE_INTERVAL_SECONDS": "0.5",
    "ZAPBUS_RECONCILE_GRACE_SECONDS": "2",
    "ZAPBUS_BREAKER_PROBE_SECONDS": "0.3",
}
OPERATIONS = {
    "create": 8,
    "recreate": 3,
    "delete": 3,
    "scan": 6,
    "logout": 1,
    "reconnect_cycle": 3,
    "replay": 3,
    "timeouts_after_create": 1,
    "failing_server": 1,
    "failing_deletes": 1,
    "server_restart": 1,
    "worker_kill": 1,
    "nats_restart": 1,
    "postgres_restart": 1,
    "dlq_replay": 2,
}
# with a pool of servers (--pool 3): servers die and come back (failover in between)
POOL_OPERATIONS = {"server_death": 2, "server_return": 2}
POOL_ENV = {
    "ZAPBUS_BAILEYS_HEALTH_INTERVAL_SECONDS": "0.3",
    "ZAPBUS_BAILEYS_FAILOVER_AFTER_SECONDS": "1.5",
    "ZAPBUS_BAILEYS_FAILOVER_PER_SECOND": "20",
    "ZAPBUS_BAILEYS_REJOIN_AFTER_SECONDS": "2",
}


@dataclass
class Report:
    seed: int
    steps: int
    schedule: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    accepted: int = 0
    final: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.final.items()))
        head = f"seed {self.seed}: {self.steps} steps, {self.accepted} creates ({states})"
        if self.ok:
            return f"{head}: ok in {self.seconds:.0f} s"
        lines = [
            f"{head}: {len(self.violations)} VIOLATIONS (replay: make soak SEED={self.seed}"
            f" STEPS={self.steps})",
            *self.violations,
            "schedule:",
            *self.schedule,
        ]
        return "\n".join(lines)


class Driver:
    def __init__(
        self, stack: ProcessStack, rng: random.Random, report: Report, pool: bool = False
    ) -> None:
        self.stack = stack
        self.rng = rng
        self.report = report
        self.connections: list[dict[str, Any]] = []
        self.operations = {**OPERATIONS, **(POOL_OPERATIONS if pool else {})}

    # --- calls ---------------------------------------------------------------------------------

    async def _gateway(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """One request to the gateway, retried while it answers 503 / is unreachable."""
        end = time.monotonic() + 60
        while True:
            try:
                async with self.stack.http.request(
                    method,
                    f"{self.stack.gateway_url}{path}",
                    headers={**self.stack.auth(), **kw.pop("headers", {})},
                    **kw,
                ) as r:
                    if r.status not in (502, 503):
                        return r.status, await r.json(content_type=None)
            except (TimeoutError, OSError):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"{method} {path} never answered")
            await asyncio.sleep(0.1)

    async def _sim(
        self, method: str, path: str, server: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        """A call to one simulator (``server``; the first by default); nothing if it is down."""
        server = server or next(iter(self.stack.sim_urls))
        if server not in self.stack.sim_runners:
            return 0, None
        url = self.stack.sim_urls[server]
        async with self.stack.http.request(method, f"{url}{path}", **kw) as r:
            return r.status, await r.json(content_type=None)

    async def _all_sims(self, method: str, path: str, **kw: Any) -> None:
        for server in list(self.stack.sim_runners):
            await self._sim(method, path, server, **kw)

    def _pick(self) -> dict[str, Any] | None:
        live = [c for c in self.connections if not c.get("deleted")]
        return self.rng.choice(live) if live else None

    async def _session_of(self, connection: dict[str, Any]) -> tuple[str, str | None]:
        """The connection's session name and the server it is placed on."""
        status, body = await self._gateway("GET", f"/v1/connections/{connection['id']}")
        assert status == 200, body
        return str(body["session_name"]), body.get("server")

    # --- operations ----------------------------------------------------------------------------

    async def step(self, n: int) -> None:
        names, weights = zip(*self.operations.items(), strict=True)
        op = self.rng.choices(names, weights)[0]
        if not self.connections:
            op = "create"
        self.report.schedule.append(f"{n:3d} {op}")
        await getattr(self, f"op_{op}")()
        await asyncio.sleep(self.rng.uniform(0.05, 0.4))

    async def op_create(self) -> None:
        name = f"c{len(self.connections)}"
        status, body = await self._gateway(
            "POST",
            "/v1/connections",
            json={"name": name},
            headers={"Idempotency-Key": f"soak-{name}"},
        )
        assert status == 202, body
        self.connections.append({"id": body["id"]})
        self.report.accepted += 1

    async def op_recreate(self) -> None:
        if (c := self._pick()) is not None:
            status, body = await self._gateway("POST", f"/v1/connections/{c['id']}/recreate")
            assert status == 202, body

    async def op_delete(self) -> None:
        if (c := self._pick()) is not None:
            status, body = await self._gateway("DELETE", f"/v1/connections/{c['id']}")
            assert status == 202, body
            c["deleted"] = True

    async def op_scan(self) -> None:
        if (c := self._pick()) is not None:
            name, server = await self._session_of(c)
            await self._sim("POST", f"/_sim/sessions/{name}/scan", server)

    async def op_logout(self) -> None:
        if (c := self._pick()) is not None:
            name, server = await self._session_of(c)
            await self._sim("POST", f"/_sim/sessions/{name}/logout", server)

    async def op_reconnect_cycle(self) -> None:
        """close 428 / connected twice: identical bodies, each a real event."""
        if (c := self._pick()) is not None:
            name, server = await self._session_of(c)
            for _ in range(2):
                await self._sim("POST", f"/_sim/sessions/{name}/disconnect", server)
                await asyncio.sleep(0.05)
                await self._sim("POST", f"/_sim/sessions/{name}/reconnect", server)

    async def op_replay(self) -> None:
        if (c := self._pick()) is not None:
            mode = self.rng.choice(["duplicate", "reverse"])
            name, server = await self._session_of(c)
            await self._sim("POST", f"/_sim/sessions/{name}/replay", server, json={"mode": mode})

    async def _for_a_while(self, patch: dict[str, Any], undo: dict[str, Any]) -> None:
        await self._all_sims("PATCH", "/_sim/config", json=patch)
        for _ in range(self.rng.randint(1, 3)):
            await self.op_create()
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await self._all_sims("PATCH", "/_sim/config", json=undo)

    async def op_timeouts_after_create(self) -> None:
        await self._for_a_while({"timeout_rate": 0.7}, {"timeout_rate": 0.0})

    async def op_failing_server(self) -> None:
        await self._for_a_while({"fail_rate": 1.0}, {"fail_rate": 0.0})

    async def op_failing_deletes(self) -> None:
        await self._all_sims("PATCH", "/_sim/config", json={"delete_fail_rate": 1.0})
        await self.op_delete()
        await self.op_recreate()
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await self._all_sims("PATCH", "/_sim/config", json={"delete_fail_rate": 0.0})

    async def op_server_restart(self) -> None:
        """A server restarts and keeps nothing (every session vanishes silently)."""
        await self._sim("POST", "/_sim/restart", self.rng.choice(sorted(self.stack.sim_urls)))

    async def op_server_death(self) -> None:
        """A server of the pool dies (one at least stays up); for long enough, sometimes,
        that its connections fail over."""
        up = sorted(self.stack.sim_runners)
        if len(up) > 1:
            await self.stack.stop_sim(self.rng.choice(up))
            await asyncio.sleep(self.rng.uniform(0.2, 3.0))

    async def op_server_return(self) -> None:
        """A dead server comes back, holding the sessions it had."""
        down = sorted(set(self.stack.sim_urls) - set(self.stack.sim_runners))
        if down:
            await self.stack.start_sim(self.rng.choice(down))

    async def op_worker_kill(self) -> None:
        await self.stack.restart("session_worker")

    async def op_nats_restart(self) -> None:
        await self.stack.nats.arestart()

    async def op_postgres_restart(self) -> None:
        await self.stack.postgres.arestart(mode=self.rng.choice(["fast", "immediate"]))

    async def op_dlq_replay(self) -> None:
        settings = Settings(nats_url=self.stack.nats.url, database_url=self.stack.postgres.dsn)
        nc = await nats.connect(settings.nats_url)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            letters = await dlq.list_letters(nc.jetstream(), settings.names)
            if letters:
                pick = self.rng.choice(letters)
                try:
                    await dlq.replay(nc.jetstream(), pool, settings.names, pick.seq)
                except dlq.ReplayError:
                    pass  # the connection moved on: refused, as it should be
        finally:
            await pool.close()
            await nc.close()


async def check(stack: ProcessStack) -> tuple[list[str], Counter[str]]:
    """The invariants, against the simulator's record and the database. Empty when all hold."""
    problems: list[str] = []
    states: dict[str, str] = {}
    holder: dict[str, str] = {}  # session name -> the server holding it
    for server, url in stack.sim_urls.items():
        async with stack.http.get(f"{url}/_sim/stats") as r:
            for name, state in (await r.json())["states"].items():
                states[name] = state
                holder[name] = server
    pool = len(stack.sim_urls) > 1
    conn = await asyncpg.connect(stack.postgres.dsn)
    try:
        rows = {
            r["id"]: dict(r)
            for r in await conn.fetch(
                "SELECT id, generation, session_name, status, status_reason, server"
                " FROM connections"
            )
        }
        outbox = await conn.fetchval("SELECT count(*) FROM outbox")
        history = await conn.fetch(
            "SELECT connection_id, event_type, from_status, to_status FROM connection_events"
            " WHERE applied ORDER BY seq"
        )
    finally:
        await conn.close()
    per_connection: Counter[uuid.UUID] = Counter()
    for name, state in states.items():
        parsed = parse_session_name(name)
        if parsed is None:
            continue
        cid, generation = parsed
        per_connection[cid] += 1
        row = rows.get(cid)
        if row is None:
            problems.append(f"1: live session {name} has no connection")
        elif generation != row["generation"]:
            problems.append(
                f"1: live session {name} of superseded generation ({row['generation']})"
            )
        elif row["status"] in TERMINAL:
            problems.append(f"2: live session {name} ({state}) behind a {row['status']} row")
        elif pool and holder[name] != row["server"]:
            problems.append(f"1: live session {name} on {holder[name]}, placed on {row['server']}")
    problems += [f"1: {n} live sessions for {cid}" for cid, n in per_connection.items() if n > 1]
    final: Counter[str] = Counter()
    for cid, row in rows.items():
        final[row["status"]] += 1
        state = states.get(row["session_name"])
        if row["status"] in TERMINAL:
            if not row["status_reason"]:
                problems.append(f"3: {cid} is {row['status']} without a reason")
        elif row["status"] in AGREES:
            if state not in AGREES[row["status"]]:
                problems.append(f"3: {cid} is {row['status']} but the server says {state}")
        else:
            problems.append(f"3: {cid} still {row['status']}")
    if outbox:
        problems.append(f"4: {outbox} messages left in the outbox")
    nc = await nats.connect(stack.nats.url)
    try:
        names = Settings().names
        info = await nc.jetstream().consumer_info(names.commands_stream, names.worker_consumer)
        if info.num_pending or info.num_ack_pending:
            problems.append(
                f"4: worker consumer has {info.num_pending} pending,"
                f" {info.num_ack_pending} unacknowledged"
            )
    finally:
        await nc.close()
    last: dict[uuid.UUID, str] = {}
    for h in history:
        cid = h["connection_id"]
        if cid in last and h["from_status"] != last[cid]:
            problems.append(
                f"5: {cid} history: {h['event_type']} from {h['from_status']}"
                f" after a transition to {last[cid]}"
            )
        last[cid] = h["to_status"]
    for cid, row in rows.items():
        if last.get(cid) != row["status"]:
            problems.append(f"5: {cid} history ends in {last.get(cid)}, row is {row['status']}")
    return problems, final


async def run_schedule(
    workdir: Path, seed: int, steps: int, settle_seconds: float = 90.0, pool: int = 1
) -> Report:
    """``pool``: how many Baileys servers (with 2 or more, servers die and come back)."""
    report = Report(seed=seed, steps=steps)
    rng = random.Random(seed)
    # Half the schedules get a sender without delivery ids and with duplicated deliveries:
    # replays and copies then reach the state machine instead of JetStream's dedupe.
    bare = rng.random() < 0.5
    sim = msgspec.structs.replace(
        SIM, seed=seed, webhook_ids=not bare, webhook_duplicate_rate=0.2 if bare else 0.0
    )
    report.schedule.append(f"sender: {'no webhook-id, 20 % duplicated' if bare else 'webhook-id'}")
    if pool > 1:
        report.schedule.append(f"a pool of {pool} servers")
    start = time.monotonic()
    env = {**ENV, **(POOL_ENV if pool > 1 else {})}
    async with process_stack(workdir, sim, env, sims=pool) as stack:
        driver = Driver(stack, rng, report, pool=pool > 1)
        for n in range(steps):
            await driver.step(n)
        # The faults stop (dead servers come back); now everything must converge.
        for server in stack.sim_urls:
            await stack.start_sim(server)
        await driver._all_sims(
            "PATCH",
            "/_sim/config",
            json={"fail_rate": 0.0, "timeout_rate": 0.0, "delete_fail_rate": 0.0},
        )
        end = time.monotonic() + settle_seconds
        while True:
            problems, final = await check(stack)
            if not problems or time.monotonic() > end:
                break
            await asyncio.sleep(0.5)
        report.violations = problems
        report.final = final
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seed", type=int, help="run this one schedule")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=0, help="random seeds for this long")
    parser.add_argument("--pool", type=int, default=1, help="Baileys servers (deaths if > 1)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    runs = failures = total_steps = 0
    while True:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
        work = Path(tempfile.mkdtemp(prefix="zapbus-soak-"))
        try:
            report = asyncio.run(run_schedule(work, seed, args.steps, pool=args.pool))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs += 1
        total_steps += args.steps
        failures += not report.ok
        print(report.summary(), flush=True)
        if args.seed is not None or time.monotonic() > deadline:
            break
    print(f"{runs} schedules, {total_steps} steps, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
