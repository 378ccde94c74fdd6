"""CPU and memory accounting from ``/proc``: what each process of a benchmark used, what the
rest of the machine used meanwhile ("other"), peak RSS, and waiting for a quiet machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM`` = peak RSS, ``VmRSS``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time a process has used so far; with ``children``, plus that of its
    children that have exited (Postgres backends that closed are counted by the postmaster)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def child_pids(ppid: int) -> list[int]:
    """The pids of the processes whose parent is ``ppid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == ppid:
                    found.append(int(entry.name))
    return found


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class InfraPids:
    """The nats-server and the postmaster the benchmarks talk to (other tests may run others)."""

    nats: int | None
    postmaster: int | None


def _proc_parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _nats_pid(port: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() != "nats-server":
                    continue
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if port.encode() in args or f"-p={port}".encode() in args:
                    return int(entry.name)
    return None


async def find_infra_pids(nats_url: str, database_url: str) -> InfraPids:
    port = str(nats_url.rsplit(":", 1)[-1]).strip("/")
    nats_pid = _nats_pid(port)
    postmaster = None
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(database_url)
        try:
            postmaster = _proc_parent(int(await conn.fetchval("SELECT pg_backend_pid()")))
        finally:
            await conn.close()
    return InfraPids(nats_pid, postmaster)


class CpuMeter:
    """CPU used between ``start()`` and ``stop()`` (100 % = one core) by each named process, by
    nats-server, by Postgres (postmaster, backends, and backends that exited), and by everything
    else on the machine ("other": not this benchmark, e.g. tests someone else runs)."""

    def __init__(self, pids: Mapping[str, int], infra: InfraPids | None = None) -> None:
        self.pids = dict(pids)
        self.infra = infra or InfraPids(None, None)
        self._t0 = 0.0
        self._before: dict[str, float] = {}
        self.percent: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        groups: dict[str, list[tuple[int, bool]]] = {k: [(v, False)] for k, v in self.pids.items()}
        if self.infra.nats is not None:
            groups["nats-server"] = [(self.infra.nats, False)]
        if self.infra.postmaster is not None:
            pm = self.infra.postmaster
            groups["postgres"] = [(pm, True)] + [(c, False) for c in child_pids(pm)]
        out: dict[str, float] = {}
        for name, pids in groups.items():
            total = 0.0
            for pid, children in pids:
                with contextlib.suppress(OSError, IndexError):
                    total += cpu_seconds(pid, children=children)
            out[name] = total
        out["other"] = _machine_busy() - sum(out.values())
        return out

    def start(self) -> None:
        self._before = self._sample()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        wall = time.monotonic() - self._t0
        self.percent = {
            k: 100 * (after[k] - self._before.get(k, 0.0)) / wall for k in after if wall > 0
        }
        return self.percent

    def summary(self) -> str:
        return ", ".join(f"{k} {max(0.0, v):.0f}%" for k, v in self.percent.items())


async def wait_quiet(
    say: Callable[[str], None], max_wait_s: float = 20.0, busy_limit: float = 0.5
) -> float:
    """Wait (at most ``max_wait_s``) until the machine is nearly idle: busy less than
    ``busy_limit`` cores over 1 s. Returns the last 1 s busy figure (cores)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = _machine_busy(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (_machine_busy() - b0) / (time.monotonic() - t0)
        if busy < busy_limit:
            return busy
        if time.monotonic() > deadline:
            say(f"  machine still busy ({busy:.1f} cores in use by others); going on")
            return busy
