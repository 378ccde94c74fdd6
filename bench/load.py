"""The HTTP load generator, run in its own process (``harness.LoadProcess``).

Closed loop (capacity): ``clients`` coroutines each send the next request as soon as the last
one is answered. Open loop (latency): request ``i`` is due at ``t0 + i / rate`` whatever the
answers, and its latency counts from that due time, so a server that falls behind cannot hide
its queue. With a ``Listen`` spec the generator also LISTENs on a Postgres channel on which a
trigger announces each committed row (NOTIFY is delivered at commit), and measures request ->
committed row; every time is read on this process's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import asyncpg
import msgspec

from bench.stats import pct


class Target(Protocol):
    def request(self, i: int) -> tuple[str, bytes, dict[str, str], str | None]:
        """(url, body, headers, marker of the row it should commit or None) of request ``i``."""
        ...


@dataclass(frozen=True)
class CreateTarget:
    """``POST /v1/connections`` (the gateway, or the original design's app)."""

    url: str
    api_key: str

    def request(self, i: int) -> tuple[str, bytes, dict[str, str], str | None]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        return self.url, b'{"name":"bench"}', headers, None


# A QR payload is ~235 characters in Baileys (and in the simulator); keep bodies that size.
_QR_FILLER = "A" * 44 + "," + "B" * 44 + "," + "C" * 44 + "," + "D" * 88


@dataclass(frozen=True)
class WebhookTarget:
    """Baileys webhooks for many connections: three ``qr.update`` then one ``session.status``,
    each carrying a unique marker (the QR text, or the status reason)."""

    urls: tuple[str, ...]
    sessions: tuple[str, ...]
    tag: str

    def request(self, i: int) -> tuple[str, bytes, dict[str, str], str | None]:
        k = i % len(self.urls)
        marker = f"{self.tag}{i}"
        if i % 4 == 3:
            doc: dict[str, Any] = {
                "event": "session.status",
                "session": self.sessions[k],
                "data": {"status": "connecting", "reason": marker},
            }
        else:
            doc = {
                "event": "qr.update",
                "session": self.sessions[k],
                "data": {"qr": f"2@{marker},{_QR_FILLER}"},
            }
        return self.urls[k], msgspec.json.encode(doc), {"Content-Type": "application/json"}, marker


def marker_of(payload: str) -> str:
    """The marker in a NOTIFY payload (a QR text or a status reason)."""
    return payload.split(",", 1)[0].removeprefix("2@")


@dataclass(frozen=True)
class Listen:
    dsn: str
    channel: str


@dataclass(frozen=True)
class RowCount:
    """A cheap query whose value counts committed rows (e.g. ``max(seq)`` of a serial column):
    measures commits without triggers, for capacity runs."""

    dsn: str
    query: str


@dataclass
class _Commits:
    times: dict[str, float] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.times.setdefault(marker_of(payload), time.perf_counter())
        self.arrived.set()


def summarize(values: list[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99, max (seconds)."""
    return {
        "count": len(values),
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values) if values else math.nan,
    }


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> int | str:
    try:
        async with http.post(url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return type(exc).__name__


async def _drain(commits: _Commits, expected: set[str], wait_s: float) -> None:
    """Wait until every expected marker was committed, or ``wait_s`` passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while not expected.issubset(commits.times.keys()):
                commits.arrived.clear()
                await commits.arrived.wait()


async def _closed(
    target: Target, clients: int, duration: float, listen: Listen | None, rows: RowCount | None
) -> dict[str, Any]:
    commits = _Commits()
    listener = None
    if listen is not None:
        listener = await asyncpg.connect(listen.dsn)
        await listener.add_listener(listen.channel, commits.on_notify)
    counter_conn = await asyncpg.connect(rows.dsn) if rows is not None else None
    rows_at_start = int(await counter_conn.fetchval(rows.query)) if counter_conn and rows else 0
    counter = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    sent_at: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        t0 = time.perf_counter()
        end = t0 + duration

        async def client() -> None:
            while time.perf_counter() < end:
                url, body, headers, marker = target.request(next(counter))
                start = time.perf_counter()
                status = await _post(http, url, body, headers)
                if isinstance(status, int) and status < 300:
                    latencies.append(time.perf_counter() - start)
                    if marker is not None:
                        sent_at[marker] = start
                else:
                    errors[str(status)] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        t_end = time.perf_counter()
        rows_at_end = int(await counter_conn.fetchval(rows.query)) if counter_conn and rows else 0
    elapsed = t_end - t0
    out: dict[str, Any] = {
        "ok": len(latencies),
        "errors": dict(errors),
        "elapsed": elapsed,
        "rate": len(latencies) / elapsed,
        "http": summarize(latencies),
    }
    if listener is not None:
        await _drain(commits, set(sent_at), 30.0)
        await listener.close()
        done = [commits.times[m] for m in sent_at if m in commits.times]
        in_window = sum(1 for t in done if t <= t_end)
        out.update(
            committed=len(done),
            missing=len(sent_at) - len(done),
            committed_in_window=in_window,
            commit_rate=in_window / elapsed,
            drain_s=(max(done) - t_end) if done else math.nan,
            e2e=summarize([commits.times[m] - s for m, s in sent_at.items() if m in commits.times]),
        )
    if counter_conn is not None and rows is not None:
        deadline = time.perf_counter() + 30.0
        while True:
            total = int(await counter_conn.fetchval(rows.query)) - rows_at_start
            if total >= len(latencies) or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.02)
        await counter_conn.close()
        in_window = rows_at_end - rows_at_start
        out.update(
            committed=total,
            missing=len(latencies) - total,
            committed_in_window=in_window,
            commit_rate=in_window / elapsed,
            drain_s=time.perf_counter() - t_end,
        )
    return out


async def _open(
    target: Target, rate: float, duration: float, listen: Listen | None, timeout_s: float
) -> dict[str, Any]:
    commits = _Commits()
    listener = None
    if listen is not None:
        listener = await asyncpg.connect(listen.dsn)
        await listener.add_listener(listen.channel, commits.on_notify)
    n = max(1, int(rate * duration))
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    due_at: dict[str, float] = {}
    failed_latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as http:

        async def one(i: int, due: float) -> None:
            url, body, headers, marker = target.request(i)
            lags.append(time.perf_counter() - due)
            status = await _post(http, url, body, headers)
            took = time.perf_counter() - due
            if isinstance(status, int) and status < 300:
                latencies.append(took)
                if marker is not None:
                    due_at[marker] = due
            else:
                errors[str(status)] += 1
                failed_latencies.append(took)

        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        t_end = time.perf_counter()
    out: dict[str, Any] = {
        "sent": n,
        "rate": rate,
        "ok": len(latencies),
        "errors": dict(errors),
        "elapsed": t_end - t0,
        "http": summarize(latencies),
        "failed_http": summarize(failed_latencies),
        "all_http": summarize(latencies + failed_latencies),
        "send_lag": summarize(lags),
    }
    if listener is not None:
        await _drain(commits, set(due_at), 30.0)
        await listener.close()
        e2e = [commits.times[m] - d for m, d in due_at.items() if m in commits.times]
        out.update(committed=len(e2e), missing=len(due_at) - len(e2e), e2e=summarize(e2e))
    return out


def closed_loop(
    target: Target,
    clients: int,
    duration: float,
    listen: Listen | None = None,
    rows: RowCount | None = None,
) -> dict[str, Any]:
    """Capacity: ``clients`` concurrent senders for ``duration`` seconds."""
    return asyncio.run(_closed(target, clients, duration, listen, rows))


def open_loop(
    target: Target,
    rate: float,
    duration: float,
    listen: Listen | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Latency: ``rate`` requests per second on a fixed schedule for ``duration`` seconds."""
    return asyncio.run(_open(target, rate, duration, listen, timeout_s))


def getpid() -> int:
    import os

    return os.getpid()
