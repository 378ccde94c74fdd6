"""The whole zapbus flow in one event loop, on real loopback ports, for end-to-end tests.

Every service is built by its production ``create_app`` and served by aiohttp's ``AppRunner``;
only the Baileys server is the project's simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgspec
from aiohttp import web
from nats.js.errors import NotFoundError

from proto.changes import ConnectionChanged, change_decoder
from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from services.gateway.app import create_app as create_gateway
from services.notifier.app import create_app as create_notifier
from services.projector.app import create_app as create_projector
from services.session_worker.app import create_app as create_worker
from services.webhook.app import create_app as create_webhook
from zapbus import bus, db, topology
from zapbus.config import Settings
from zapbus.tenants import create_tenant
from zapbus.tools.localinfra import free_port

T = TypeVar("T")

FAST_SIM = SimConfig(port=0, create_delay=(0.02, 0.1), qr_first_seconds=60, qr_next_seconds=20)


async def wait_for(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout: float = 60.0, every: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(every)


class CountingPool:
    """A real asyncpg pool that counts the statements made through it (``fetch``,
    ``fetchrow``, ``fetchval``, ``execute``, and each ``acquire``d connection as one)."""

    COUNTED = frozenset({"fetch", "fetchrow", "fetchval", "execute", "acquire"})

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.pool, name)
        if name in self.COUNTED:
            self.statements += 1
        return attr


@dataclass
class Stack:
    settings: Settings
    gateway_url: str
    webhook_url: str
    sim_url: str
    sim_port: int
    worker_url: str
    projector_url: str
    api_key: str
    tenant_id: uuid.UUID
    http: aiohttp.ClientSession
    pool: asyncpg.Pool
    apps: dict[str, web.Application]
    # name -> the AppRunner serving it; a test may stop one and put its replacement here
    runners: dict[str, web.AppRunner]
    notifier_url: str = ""

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    async def create(self, name: str = "sales", **kw: Any) -> dict[str, Any]:
        hdrs = {**self.auth(), **kw.pop("headers", {})}
        async with self.http.post(
            f"{self.gateway_url}/v1/connections", json={"name": name}, headers=hdrs, **kw
        ) as r:
            assert r.status == 202, await r.text()
            body: dict[str, Any] = await r.json()
            return body

    async def get(self, connection_id: str, key: str | None = None) -> tuple[int, Any]:
        async with self.http.get(
            f"{self.gateway_url}/v1/connections/{connection_id}", headers=self.auth(key)
        ) as r:
            return r.status, await r.json(content_type=None)

    async def wait_released(self, connection_id: str, timeout: float = 60.0) -> None:
        """Wait until no worker holds the row (``held_until`` cleared): a worker releases its
        hold at its next beat after the work ended, so a test comparing the whole row before
        and after something waits for this first."""

        async def released() -> bool:
            sql = "SELECT held_until IS NULL FROM connections WHERE id = $1"
            return bool(await self.pool.fetchval(sql, uuid.UUID(connection_id)))

        await wait_for(f"connection {connection_id} released by the worker", released, timeout)

    async def wait_status(self, connection_id: str, *statuses: str, timeout: float = 60.0) -> Any:
        async def probe() -> Any:
            status, body = await self.get(connection_id)
            return body if status == 200 and body["status"] in statuses else None

        return await wait_for(f"connection {connection_id} in {statuses}", probe, timeout)

    async def sim(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, f"{self.sim_url}{path}", **kw) as r:
            assert r.status < 300, f"{method} {path}: {r.status} {await r.text()}"
            return await r.json(content_type=None)


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@contextlib.asynccontextmanager
async def start_stack(
    settings: Settings, sim: SimConfig | None = FAST_SIM, **overrides: Any
) -> AsyncIterator[Stack]:
    """Start the stack; with ``sim=None`` no simulator runs on ``stack.sim_url`` (yet)."""
    ports = {
        name: free_port()
        for name in ("sim", "webhook", "gateway", "worker", "projector", "notifier")
    }
    settings = msgspec.structs.replace(
        settings,
        webhook_port=ports["webhook"],
        webhook_public_url=f"http://127.0.0.1:{ports['webhook']}",
        baileys_url=f"http://127.0.0.1:{ports['sim']}",
        baileys_api_key=(sim or FAST_SIM).api_key,
        baileys_timeout_seconds=overrides.pop("baileys_timeout_seconds", 3.0),
        retry_base_seconds=overrides.pop("retry_base_seconds", 0.1),
        retry_max_seconds=overrides.pop("retry_max_seconds", 0.5),
        ack_wait_seconds=overrides.pop("ack_wait_seconds", 5.0),
        outbox_poll_seconds=0.2,
        # webhook receivers in tests listen on loopback
        notify_allow_private=overrides.pop("notify_allow_private", True),
        **overrides,
    )
    # The stack's own settings (ack_wait, attempts ...) shape the consumers: declare them as
    # `zapbus migrate` would with these settings (the services only bind).
    await topology.declare_with(settings)
    apps = {
        "webhook": create_webhook(settings),
        "projector": create_projector(settings),
        "worker": create_worker(settings),
        "gateway": create_gateway(settings),
        "notifier": create_notifier(settings),
    }
    if sim is not None:
        apps["sim"] = create_sim(msgspec.structs.replace(sim, port=ports["sim"]))
    runners: dict[str, web.AppRunner] = {}
    pool = await db.create_pool(settings.database_url, settings.db_schema, max_size=4)
    http = aiohttp.ClientSession()
    try:
        for name, app in apps.items():
            runners[name] = await serve(app, ports[name])
        _, key = await create_tenant(pool, f"tenant-{uuid.uuid4().hex[:6]}")
        tenant_id = await pool.fetchval("SELECT id FROM tenants ORDER BY created_at DESC LIMIT 1")
        yield Stack(
            settings=settings,
            gateway_url=f"http://127.0.0.1:{ports['gateway']}",
            webhook_url=f"http://127.0.0.1:{ports['webhook']}",
            sim_url=f"http://127.0.0.1:{ports['sim']}",
            sim_port=ports["sim"],
            worker_url=f"http://127.0.0.1:{ports['worker']}",
            projector_url=f"http://127.0.0.1:{ports['projector']}",
            api_key=key,
            tenant_id=tenant_id,
            http=http,
            pool=pool,
            apps=apps,
            runners=runners,
            notifier_url=f"http://127.0.0.1:{ports['notifier']}",
        )
    finally:
        await http.close()
        for runner in reversed(list(runners.values())):
            await runner.cleanup()
        await pool.close()


async def changes_of(settings: Settings, connection_id: str) -> list[ConnectionChanged]:
    """The connection's changes on the changes stream (what webhooks and SSE are made of),
    oldest first."""
    nc = await bus.connect(settings.nats_url, "zapbus-test-changes")
    try:
        js, names, seq = nc.jetstream(), settings.names, 1
        subject = names.change_subject(uuid.UUID(connection_id))
        found: list[ConnectionChanged] = []
        while True:
            try:
                msg = await js.get_msg(names.changes_stream, seq, subject, next=True)
            except NotFoundError:
                return found
            assert msg.data is not None and msg.seq is not None
            found.append(change_decoder.decode(msg.data))
            seq = msg.seq + 1
    finally:
        await nc.close()


async def changes_when(
    settings: Settings,
    connection_id: str,
    what: str,
    done: Callable[[list[ConnectionChanged]], bool],
    timeout: float = 30.0,
) -> list[ConnectionChanged]:
    """The connection's changes once ``done`` holds for them: the outbox relays a change a
    little after its row was committed, so a row read may be ahead of the stream."""

    async def probe() -> list[ConnectionChanged] | None:
        found = await changes_of(settings, connection_id)
        return found if done(found) else None

    return await wait_for(what, probe, timeout=timeout, every=0.1)


def versions_grow(changes: list[ConnectionChanged]) -> bool:
    """Every change of the row bumped its version: each change's is above the one before."""
    versions = [c.version or 0 for c in changes]
    return all(a < b for a, b in itertools.pairwise(versions))
