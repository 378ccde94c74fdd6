"""``--profile``: py-spy a service while a benchmark drives it, and summarise where time went.

py-spy records with ``--nonblocking`` (the target is never paused) into collapsed stacks; the
summary lists the functions that are on the stack most often (inclusive) and the leaves (self).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"


class PySpy:
    def __init__(self, pid: int, out: Path) -> None:
        self.raw = out.with_suffix(".collapsed.txt")
        self.summary = out.with_suffix(".profile.txt")
        self.proc = subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "200",
                "--pid",
                str(pid),
                "--output",
                str(self.raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.summary.write_text(summarize(self.raw))
        return self.summary


def _frame(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    for root in ("site-packages", "main", "lib"):
        if root in parts:
            path = "/".join(parts[len(parts) - parts[::-1].index(root) :])
            break
    return f"{name} ({path})"


def summarize(raw: Path, top: int = 40) -> str:
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return "no samples\n"
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            _frame(f)
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        leaf[frames[-1]] += n
    out = [f"{total} samples (200/s, active CPU only)", "", "inclusive:"]
    out += [f"{100 * c / total:6.1f}%  {f}" for f, c in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{100 * c / total:6.1f}%  {f}" for f, c in leaf.most_common(top)]
    return "\n".join(out) + "\n"
