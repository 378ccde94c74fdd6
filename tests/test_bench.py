"""The benchmarks are part of the product: each runs here in its quickest form, as a process of
its own against real NATS and Postgres as ``make bench`` runs it, and must end cleanly having
printed its figures. A signal mid-run (Ctrl-C, SIGTERM) stops every process the run started.

``python -m bench --quick`` takes ~1 min on a quiet 2-core machine; the deadlines are sized for
a loaded one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from zapbus.tools.localinfra import Infra, free_port

ROOT = Path(__file__).resolve().parents[1]
MARK = "ZAPBUS_BENCH_TEST_RUN"  # every process a run starts inherits it
FIGURE = re.compile(r"^-?[\d,]*\d(\.\d+)?$")


def _bench(*args: str, tmp: Path, timeout: float = 500) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the repository, its temporary files (the bench's logs) in
    ``tmp``; it must exit 0 without a traceback. Past ``timeout`` it gets a SIGTERM, which
    stops what it started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, errs = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, errs = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, errs)
    said = f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    assert r.returncode == 0, said
    assert "Traceback" not in r.stderr, said
    return r


def _tables(section: str) -> list[list[str]]:
    """The body rows of a section's markdown tables, as lists of cells."""
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row] for row in rows if row[0].strip() not in ("measure", "target")]


@pytest.mark.timeout(600)  # ~1 min alone; much longer beside other work on 2 cores
def test_every_benchmark_runs_quick_and_prints_its_figures(infra: Infra, workdir: Path) -> None:
    t0 = time.monotonic()
    r = _bench(
        "bench",
        "--quick",
        "--nats-url",
        infra.nats_url,
        "--database-url",
        infra.database_url,
        tmp=workdir,
    )
    sections = re.split(r"^## ", r.stdout, flags=re.M)[1:]
    assert len(sections) == len(BENCHMARKS), r.stdout
    for section in sections:
        title = section.splitlines()[0]
        figures = [cell for row in _tables(section) for cell in row[1:] if FIGURE.match(cell)]
        assert len(figures) >= 3, f"{title}: no figures in\n{section}"
    assert "targets missed:" in r.stderr
    print(f"python -m bench --quick: {time.monotonic() - t0:.0f} s")


def test_the_placement_and_query_plan_benchmarks_run(infra: Infra, workdir: Path) -> None:
    dsn = ["--database-url", infra.database_url]
    place = ["--live", "500", "--placements", "20", "--concurrency", "1", "4"]
    r = _bench("bench.placement", *place, *dsn, tmp=workdir)
    assert re.search(r"^\s+4\s+[\d.]+\s+[\d.]+\s+\d+$", r.stdout, re.M), r.stdout
    assert "new placements by server:" in r.stdout
    r = _bench("bench.plans", "--history", "25000", *dsn, tmp=workdir)
    assert re.search(r"^history page: [\d.]+ ms$", r.stdout, re.M), r.stdout
    assert "sequential scans:" in r.stdout


def _marked(mark: str) -> list[str]:
    """The live processes (pid and command line) whose environment carries ``MARK=mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARK}={mark}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, f"bench exited with {proc.returncode}:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{path.read_text()}"
        time.sleep(0.1)


RUNNING = ("nats-server", "postgres", "services.gateway", "multiprocessing")
# the three nodes of the scale benchmark's cluster (their config files), besides the rest
CLUSTER = (*RUNNING, *(f"nats-scale-cluster/n{i}/nats.conf" for i in (1, 2, 3)))
# how: the signal, the benchmark, the line of the run after which the signal comes, what runs
# then, how many presses
SIGNALS = {
    "ctrl-c": (signal.SIGINT, "create", "create: gateway capacity", RUNNING, 2),
    "ctrl-c-while-postgres-starts": (
        signal.SIGINT,
        "create",
        "started nats-server",
        ("nats-server",),
        1,
    ),
    "sigterm": (signal.SIGTERM, "create", "create: gateway capacity", RUNNING, 1),
    "ctrl-c-on-a-cluster": (
        signal.SIGINT,
        "scale",
        "scale (3-node cluster): gateway capacity",
        CLUSTER,
        1,
    ),
}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", list(SIGNALS))
def test_a_signal_mid_run_stops_every_process_the_run_started(how: str, workdir: Path) -> None:
    """The run starts its own nats-server and PostgreSQL (nothing answers on the ports it is
    given), the gateway, and the load generator. Ctrl-C reaches its whole process group, as
    from a terminal (pressed again while the run stops, or while PostgreSQL is starting);
    SIGTERM reaches only the bench process, as from ``kill``. On a cluster run, Ctrl-C
    comes while the three nodes of the scale benchmark's cluster run beside the rest."""
    sig, benchmark, after, running, presses = SIGNALS[how]
    mark = uuid.uuid4().hex
    # TMPDIR: the run's logs and servers' data go under workdir, removed after the test
    env = {**os.environ, MARK: mark, "TMPDIR": str(workdir)}
    err = workdir / "bench.err"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench",
                "--quick",
                benchmark,
                "--nats-url",
                f"nats://127.0.0.1:{free_port()}",
                "--database-url",
                f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        _wait_for_line(err, after, proc, timeout=180)
        started = _marked(mark)
        for what in running:
            assert any(what in p for p in started), f"no {what} among {started}"
        for _ in range(presses):
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            time.sleep(0.3)  # pressed again as the run stops, as when stopping seems slow
        code = proc.wait(timeout=120)
        # multiprocessing's resource tracker ends by itself once the bench process is gone;
        # services and servers would never
        deadline = time.monotonic() + 15
        while (left := _marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running after the bench exited:\n{left}\n{err.read_text()}"
        assert code == 128 + sig, err.read_text()
        assert "Traceback" not in err.read_text(), err.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _marked(mark):  # leave nothing behind, whatever failed
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_the_document_opens_with_the_targets_table() -> None:
    """docs/benchmarks.md leads with what was promised and what was met (issue 21 #6)."""
    from bench.report import document
    from bench.stats import Section, Target

    sec = Section(title="burst", setup="", header=["a"], targets=[Target("<= 2x", "1.5x", True)])
    doc = document([("date", "today")], [sec], "the setup", "make bench", 60.0)
    lines = doc.splitlines()
    assert lines[0] == "# Benchmarks"
    first_heading = next(line for line in lines[1:] if line.startswith("## "))
    assert first_heading == "## Targets", doc
    assert doc.index("| burst | <= 2x | 1.5x | yes |") < doc.index("## Setup")
