"""The machine, the versions, and ``docs/benchmarks.md``."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import asyncpg

from bench.stats import Section
from zapbus.tools.localinfra import nats_server_version


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def _nats_server_version(nats_url: str) -> str:
    """What the server the benchmarks use announces (not a ``nats-server`` on PATH)."""
    return await nats_server_version(nats_url) or "unknown"


async def _postgres_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT version()"))
    finally:
        await conn.close()


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


async def environment(dsn: str, nats_url: str) -> list[tuple[str, str]]:
    pg = await _postgres_version(dsn)
    nats_v = await _nats_server_version(nats_url)
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{cpu_model()}, {os.cpu_count()} cores"),
        ("memory", f"{_memory_gib():.1f} GiB"),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("nats-server", nats_v),
        ("postgres", pg),
        *((pkg, metadata.version(pkg)) for pkg in ("nats-py", "asyncpg", "aiohttp", "msgspec")),
    ]


FINDINGS = Path(__file__).with_name("findings.md")


def findings() -> str:
    """The hand-written analysis of the misses (profiles, causes, recommended fixes)."""
    return FINDINGS.read_text() if FINDINGS.exists() else ""


def summary(sections: list[Section]) -> str:
    lines = ["| benchmark | target | measured | met |", "|---|---|---|---|"]
    for sec in sections:
        for t in sec.targets:
            lines.append(
                f"| {sec.title} | {t.text} | {t.measured} | {'yes' if t.met else '**no**'} |"
            )
    return "\n".join(lines)


def document(
    env: list[tuple[str, str]], sections: list[Section], setup: str, command: str, took_s: float
) -> str:
    parts = [
        "# Benchmarks",
        "",
        "## Targets",
        "",
        summary(sections),
        "",
        f"Written by `{command}` (bench/, issue 7) in {took_s / 60:.1f} min. Absolute figures on a "
        "shared 2-core VM are noisy; each figure that matters has a floor measured in the same "
        "run, and the ratio is the headline. Benchmarks print; `make test` asserts behaviour.",
        "",
        "Run `make bench` (all of them, ~10 min, rewrites this file), `python -m bench --quick` "
        "(~1 min smoke run of every step, prints only; `make test` runs it in "
        "`tests/test_bench.py`, so a benchmark that crashes fails the tests), `python -m bench "
        "create sync` (a subset of create, burst, webhook, projector, sync, placement, "
        "scale, controlplane: prints only; `--out FILE` writes), `--profile` (py-spy each service "
        "under load; summaries in the log directory printed at the start). Ctrl-C stops every "
        "process the run started.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env),
        "",
        "## Setup",
        "",
        setup,
        "",
        *(sec.markdown() for sec in sections),
        findings(),
    ]
    return "\n".join(parts).rstrip() + "\n"
