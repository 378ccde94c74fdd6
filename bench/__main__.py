"""``python -m bench [--quick] [--out PATH] [create] [burst] [webhook] [projector] [sync]
[placement] [scale] [controlplane]``.

Runs the chosen benchmarks (all by default) one after the other, prints each table as it is
done, and writes every table to ``docs/benchmarks.md`` (a full run of all four) or to ``--out``.
A ``--quick`` run or a subset only prints, unless ``--out`` is given.

Ctrl-C (SIGINT), SIGTERM or SIGHUP cancels the run: on the way out each benchmark stops the
services, servers and load generator it started, then the NATS and Postgres started for the run
are stopped; whatever child still leads a process group of its own after that is killed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import burst, controlplane, create, placement, projector, scale, sync, webhook
from bench.cpu import child_pids, find_infra_pids
from bench.harness import Ctx, Scale
from bench.report import document, environment
from bench.stats import Section
from zapbus.tools.localinfra import ensure_infra

BENCHMARKS: dict[str, Callable[[Ctx], Awaitable[Section]]] = {
    "create": create.run,
    "burst": burst.run,
    "webhook": webhook.run,
    "projector": projector.run,
    "sync": sync.run,
    "placement": placement.run,
    "scale": scale.run,
    "controlplane": controlplane.run,
}

SETUP = """\
Everything runs on this one machine, on loopback: the shared nats-server and PostgreSQL (the
ones `make test` uses; database `test`), each zapbus service as its own process
(`python -m services.<name>`, configured by `ZAPBUS_*` variables, logging JSON at INFO to a
file as in production), the Baileys simulator as its own process (logging at WARNING: it
stands in for a server on another machine), and the load generator in a process of its own
(aiohttp client, or asyncpg/nats-py for the floors), so it never shares an event loop with
what it measures. On 2 cores the load generator, the services, NATS and Postgres compete for
the CPU; each section lists the CPU each process used. Every benchmark uses its own NATS
namespace and Postgres schema, deleted afterwards. Latency is measured open loop (a fixed send
schedule, latency counted from the scheduled send time); capacity closed loop. "Row committed"
is observed with LISTEN in the load generator: triggers that the benchmark adds to its own
schema NOTIFY on each projected row, and NOTIFY is delivered at commit. All times of one
measurement are read on the load generator's clock."""


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "names",
        nargs="*",
        metavar="BENCHMARK",
        help=f"which to run: {', '.join(BENCHMARKS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (~1 min)")
    p.add_argument("--out", type=Path, help="write the tables here (markdown)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the services under load (see bench/profile.py)",
    )
    # none: the NATS on the default port if it is nats-server >= 2.10, else one from the wheel
    p.add_argument("--nats-url", default=None)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


async def main(argv: list[str]) -> int:
    args = _args(argv)
    _cancel_on_signals()
    names = args.names or list(BENCHMARKS)
    scale = Scale.quick() if args.quick else Scale()
    out = args.out
    if out is None and not args.quick and names == list(BENCHMARKS):
        out = Path("docs/benchmarks.md")
    logs = Path(tempfile.mkdtemp(prefix="zapbus-bench-"))
    started = time.monotonic()
    async with await ensure_infra(args.nats_url, args.database_url, logs / "infra") as infra:
        pids = await find_infra_pids(infra.nats_url, infra.database_url)
        ctx = Ctx(
            infra.nats_url, infra.database_url, logs, scale, pids, args.profile, scale.quiet_s
        )
        ctx.say(f"service logs in {logs}")
        env = await environment(infra.database_url, infra.nats_url)
        sections = []
        for name in names:
            section = await BENCHMARKS[name](ctx)
            print(section.text(), flush=True)
            sections.append(section)
    took = time.monotonic() - started
    ctx.say(f"done in {took:.0f} s")
    if out is not None:
        command = "python -m bench " + " ".join(argv) if argv else "make bench"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document(env, sections, SETUP, command.strip(), took))
        ctx.say(f"wrote {out}")
    missed = [t.text for s in sections for t in s.targets if not t.met]
    ctx.say(f"targets missed: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""))
    return 0


_stopped_by: list[signal.Signals] = []


def _cancel_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP cancel the run (its main task), so that every ``async with``
    on the way out stops what it started. Another signal meanwhile does not cut that short."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(sig: signal.Signals) -> None:
        if not _stopped_by:
            print(f"[bench] {sig.name}: stopping what this run started", file=sys.stderr)
            task.cancel()
        _stopped_by.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)


def _kill_leftovers() -> None:
    """The last resort, however the run ended: SIGKILL each child process that still leads a
    process group of its own (services and servers do, so that a Ctrl-C does not reach them
    before the run stops them), with its group."""
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid != os.getpgrp():
                os.killpg(pid, signal.SIGKILL)


def run(argv: list[str]) -> int:
    """``python -m bench``: the exit code (128 + the signal's number if one stopped it)."""
    code: int | None = None
    try:
        try:
            code = asyncio.run(main(argv))
        except KeyboardInterrupt:
            # Ctrl-C pressed again once the loop had closed: closing it put back Python's own
            # SIGINT handler, which raises here (uncaught, the process would die by SIGINT)
            _stopped_by.append(signal.SIGINT)
        except asyncio.CancelledError:
            if not _stopped_by:
                raise
    finally:
        # nothing cuts the last clean-up short, however often the signal comes
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _kill_leftovers()
    return code if code is not None else 128 + _stopped_by[0]


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
