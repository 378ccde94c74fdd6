"""Percentiles, and the ``Section`` a benchmark returns: a table, its notes and its targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    if math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass
class Target:
    """One target of the issue, checked against this run."""

    text: str
    measured: str
    met: bool


@dataclass
class Section:
    """What one benchmark reports: a markdown table, notes on the setup, and targets."""

    title: str
    setup: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def target(self, text: str, measured: str, met: bool) -> None:
        self.targets.append(Target(text, measured, met))

    def table(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", self.setup, "", self.table(), ""]
        if self.targets:
            parts += ["| target | measured | met |", "|---|---|---|"]
            parts += [
                f"| {t.text} | {t.measured} | {'yes' if t.met else '**no**'} |"
                for t in self.targets
            ]
            parts.append("")
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts).rstrip() + "\n"

    def text(self) -> str:
        """For the terminal: the same markdown, which reads well as plain text."""
        return self.markdown()
