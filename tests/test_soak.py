"""A few fixed seeds of the fault-schedule soak (tests/soak.py) in every run of the suite.

Longer and random runs: ``make soak SEED=... STEPS=...`` or ``make soak MINUTES=30``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import run_schedule

SEEDS = (1, 2, 3)
# a pool of three servers, with server deaths and returns in the schedule
POOL_SEEDS = (5,)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
async def test_fault_schedule_converges_to_the_invariants(workdir: Path, seed: int) -> None:
    report = await run_schedule(workdir, seed, steps=40)
    print(report.summary())
    assert report.ok, report.summary()
    assert report.accepted > 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", POOL_SEEDS)
async def test_fault_schedule_over_a_pool_converges_to_the_invariants(
    workdir: Path, seed: int
) -> None:
    report = await run_schedule(workdir, seed, steps=40, pool=3)
    print(report.summary())
    assert report.ok, report.summary()
    assert any("server_death" in step for step in report.schedule)
