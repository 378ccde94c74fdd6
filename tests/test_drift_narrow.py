"""``drift.narrow``: a sweep reads in full only the rows that can drift, and finds what it
would find reading every row (issue 21 #5)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.session_worker.drift import (
    Drift,
    Observed,
    ReconcilePolicy,
    RowView,
    compute,
    narrow,
)
from zapbus.connection.states import WANTED_LIVE, Status

NOW = datetime(2026, 12, 6, tzinfo=UTC)
POLICY = ReconcilePolicy(grace_seconds=30)
WORDS = [None, "connected", "connecting", "close", "logged_out", "qr", "open"]


def _row(rng: random.Random, servers: list[str]) -> RowView:
    cid = uuid.uuid4()
    generation = rng.randint(1, 3)
    old = NOW - timedelta(minutes=10)
    return RowView(
        id=cid,
        tenant_id=uuid.uuid4(),
        generation=generation,
        session_name=f"zb_{cid.hex}_g{generation}",
        status=rng.choice(list(Status)),
        updated_at=rng.choice([old, NOW]),
        status_changed_at=rng.choice([old, NOW + timedelta(seconds=1)]),
        misses=rng.choice([0, 0, 0, 1, 2]),
        recreates=rng.choice([0, 0, 3]),
        server=rng.choice([*servers, None]),
    )


def _fleet(seed: int, servers: list[str]) -> tuple[dict[uuid.UUID, RowView], Observed]:
    """Rows of every kind and what the first server lists: most wanted sessions, some
    missing, older generations, other servers' sessions, unknown and foreign names."""
    rng = random.Random(seed)
    rows = {r.id: r for r in (_row(rng, servers) for _ in range(300))}
    listed: dict[str, str | None] = {}
    for row in rows.values():
        roll = rng.random()
        if roll < 0.6:
            listed[row.session_name] = rng.choice(WORDS)
        elif roll < 0.7 and row.generation > 1:
            listed[f"zb_{row.id.hex}_g{row.generation - 1}"] = rng.choice(WORDS)
    for _ in range(5):
        listed[f"zb_{uuid.uuid4().hex}_g1"] = None  # no such connection
    listed["someone-elses"] = "connected"
    return rows, Observed(
        sessions=listed,
        at=NOW,
        complete=rng.random() < 0.8,
        probed=frozenset(
            rng.sample(sorted(listed), len(listed) // 2)
            + [r.session_name for r in rows.values() if rng.random() < 0.5]
        ),
    )


def _wanted(rows: dict[uuid.UUID, RowView], server: str, default: str | None) -> dict[str, Status]:
    """What the reconciler reads from ``connections_wanted`` for ``server``."""
    return {
        r.session_name: r.status
        for r in rows.values()
        if r.status in WANTED_LIVE and (r.server or default) == server
    }


def _same(a: Drift, b: Drift) -> None:
    def key(d: Drift) -> list[tuple[str, str]]:
        return sorted((i.kind, i.session_name) for i in d.items)

    assert key(a) == key(b)
    assert sorted(a.items, key=lambda i: (i.kind, i.session_name)) == sorted(
        b.items, key=lambda i: (i.kind, i.session_name)
    )
    assert a.misses == b.misses


@pytest.mark.parametrize("pool_of_one", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_the_narrowed_rows_drift_as_every_row_does(seed: int, pool_of_one: bool) -> None:
    servers = ["a"] if pool_of_one else ["a", "b"]
    default = "a" if pool_of_one else None
    rows, observed = _fleet(seed, servers)
    deleting = {
        name: NOW - timedelta(seconds=s)
        for name, s in zip(sorted(observed.sessions)[:20], range(0, 100, 5), strict=False)
    }
    every = compute(rows, observed, deleting, NOW, POLICY, server="a", default_server=default)
    assert every.items, "the fleet has drift of every kind"
    missed = [r.id for r in rows.values() if r.misses]
    ids, seen = narrow(_wanted(rows, "a", default), observed, missed)
    assert len(ids) < len(rows)
    read = {i: rows[i] for i in ids if i in rows}
    some = compute(read, seen, deleting, NOW, POLICY, server="a", default_server=default)
    _same(every, some)


def test_a_fleet_at_rest_reads_no_row_in_full() -> None:
    rng = random.Random(7)
    rows = {r.id: r for r in (_row(rng, ["a"]) for _ in range(1000))}
    rows = {i: r for i, r in rows.items() if r.misses == 0}
    wanted = _wanted(rows, "a", "a")
    words = {Status.CONNECTED: "connected"}
    observed = Observed(
        sessions={name: words.get(status) for name, status in wanted.items()},
        at=NOW,
        complete=True,
    )
    ids, seen = narrow(wanted, observed)
    assert ids == set() and seen.sessions == {}
    assert not compute(rows, observed, {}, NOW, POLICY, server="a", default_server="a").items


def test_narrow_names_each_kind_of_drift() -> None:
    def conn(status: Status, generation: int = 1) -> tuple[uuid.UUID, str]:
        cid = uuid.uuid4()
        return cid, f"zb_{cid.hex}_g{generation}"

    fine, fine_name = conn(Status.CONNECTED)
    lost, lost_name = conn(Status.QR_READY)
    contradicted, contradicted_name = conn(Status.CONNECTED)
    orphan, _ = conn(Status.CONNECTED, 2)
    unknown = uuid.uuid4()
    missed, missed_name = conn(Status.CONNECTED)
    wanted = {
        fine_name: Status.CONNECTED,
        lost_name: Status.QR_READY,
        contradicted_name: Status.CONNECTED,
        missed_name: Status.CONNECTED,
        f"zb_{orphan.hex}_g2": Status.CONNECTED,
    }
    observed = Observed(
        sessions={
            fine_name: "connected",
            contradicted_name: "logged_out",
            f"zb_{orphan.hex}_g1": "connected",  # superseded, still listed
            f"zb_{orphan.hex}_g2": "connected",
            f"zb_{unknown.hex}_g1": None,
            missed_name: "connected",
            "not-ours": None,
        },
        at=NOW,
        complete=True,
    )
    ids, seen = narrow(wanted, observed, [missed])
    assert ids == {lost, contradicted, orphan, unknown, missed}
    # every session of a connection read in full is kept, and only those
    assert set(seen.sessions) == {
        contradicted_name,
        f"zb_{orphan.hex}_g1",
        f"zb_{orphan.hex}_g2",
        f"zb_{unknown.hex}_g1",
        missed_name,
    }
    assert fine not in ids
