"""Delivery order does not matter: any shuffle, with duplicates, of one generation's events ends
where the clean, in-order delivery ends, and no step on the way moves backwards.

A *history* is what one generation really goes through: create attempts (each failed one
retried), the session created, a ``connecting`` status, N QR codes (received 20 s apart), maybe
the scan (515, then maybe ``connected``), maybe an ending (401, 440, 403, or 408 "QR refs attempts
ended" when nobody scanned), maybe the deletion. ``reconnecting`` is left out on purpose: it is a
cycle (connected -> reconnecting -> connected), so its meaning depends on arrival order, which
the row cannot know; the unit tests cover it.

What must hold for the final row of any delivery, against the in-order one:

* status, status_reason and attempts are equal;
* a QR is on the row exactly when it is ``qr_ready``, and then it is the newest QR of the history,
  its expiry is its receipt time plus the lifetime of the ``qr_seq``-th QR, and
  ``1 <= qr_seq <= N`` (qr_seq counts the QRs *applied*: one overtaken by a newer QR is never
  shown, so a shuffle may count fewer than the in-order N).

The refresh cap (``max_refreshes``) counts QRs shown, so whether a shuffle reaches it depends on
the order; the equality property keeps N within the cap, and the step-by-step property, which
goes past it, checks that nothing ever moves backwards or shows a QR that a newer one overtook.

The transitions the system forces (``machine.force``: time-outs, re-creates, moves, replays,
the gateway's recreate and delete) are checked against the graph written out by hand, and on
every row the events can reach: what the events do after a forced move keeps the graph.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.events import (
    CreateRetrying,
    CreateStarted,
    Event,
    QrUpdated,
    SessionCreated,
    SessionDeleted,
    StatusReported,
)
from proto.states import RANK, TERMINAL, Status
from zapbus.connection.machine import (
    FORCED_TARGET,
    Forced,
    IllegalTransition,
    QrPolicy,
    Row,
    apply,
    force,
    may_force,
)
from zapbus.connection.vocabulary import MOVE_REASONS, REASON_CODES

POLICY = QrPolicy(first_ttl_seconds=60, next_ttl_seconds=20, max_refreshes=4)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CID = uuid.uuid4()
ENDINGS = {
    "logout": ("close", 401, "loggedOut", Status.LOGGED_OUT),
    "loop": ("close", None, "reconnect_loop_detected", Status.FAILED),
    "forbidden": ("close", 403, "forbidden", Status.FAILED),
    "refs_ended": ("close", 408, "QR refs attempts ended", Status.QR_EXPIRED),
}


@dataclass
class History:
    events: list[Event] = field(default_factory=list)
    qrs: list[QrUpdated] = field(default_factory=list)
    attempts: int = 1
    scanned: bool = False
    connected: bool = False
    ending: str | None = None
    deleted: bool = False

    def add(self, cls: type[Any], **kw: Any) -> Any:
        t = T0 + timedelta(seconds=20 * len(self.events))
        event = cls(event_id=uuid.uuid4(), connection_id=CID, generation=1, occurred_at=t, **kw)
        self.events.append(event)
        return event

    def expected(self) -> tuple[Status, str | None]:
        """Status and reason after a clean delivery, worked out without ``apply``."""
        # session.deleted is history only: the row keeps its state (the tenant's delete is
        # the gateway's own transition, not an event).
        if len(self.qrs) > POLICY.max_refreshes:
            return Status.QR_EXPIRED, "qr refresh limit reached"
        if self.ending:
            _, _, reason, status = ENDINGS[self.ending]
            return status, reason
        if self.connected:
            return Status.CONNECTED, None
        return (Status.PAIRING, None) if self.scanned else (Status.QR_READY, None)


@st.composite
def histories(draw: st.DrawFn, max_qrs: int) -> History:
    h = History(attempts=draw(st.integers(1, 3)))
    for attempt in range(1, h.attempts):
        h.add(CreateStarted, attempt=attempt)
        h.add(CreateRetrying, attempt=attempt, reason=f"HTTP 50{attempt}", retry_in_seconds=1.0)
    h.add(CreateStarted, attempt=h.attempts)
    h.add(SessionCreated, attempt=h.attempts)
    h.add(StatusReported, status="connecting")
    for i in range(draw(st.integers(1, max_qrs))):
        h.qrs.append(h.add(QrUpdated, qr=f"2@qr{i}"))
    h.scanned = draw(st.booleans())
    if h.scanned:
        h.add(StatusReported, status="close", code=515, reason="restartRequired")
        h.connected = draw(st.booleans())
        if h.connected:
            h.add(StatusReported, status="connected")
    endings = [None, "logout", "loop", "forbidden"] + ([] if h.scanned else ["refs_ended"])
    h.ending = draw(st.sampled_from(endings))
    if h.ending:
        word, code, reason, _ = ENDINGS[h.ending]
        h.add(StatusReported, status=word, code=code, reason=reason)
    h.deleted = draw(st.booleans())
    if h.deleted:
        h.add(SessionDeleted)
    return h


@st.composite
def deliveries(draw: st.DrawFn, max_qrs: int) -> tuple[History, list[Event]]:
    """A history and one delivery of it: every event at least once, any order, duplicates."""
    h = draw(histories(max_qrs))
    again = draw(st.lists(st.sampled_from(h.events), max_size=len(h.events)))
    return h, draw(st.permutations(h.events + again))


def fold(events: list[Event]) -> Row:
    r = Row(status=Status.PENDING, generation=1)
    for event in events:
        r = apply(r, event, POLICY).row
    return r


def ttl(qr_seq: int) -> timedelta:
    return timedelta(seconds=POLICY.first_ttl_seconds if qr_seq == 1 else POLICY.next_ttl_seconds)


def check_qr_fields(r: Row, newest: QrUpdated | None, qr_count: int) -> None:
    assert (r.qr is not None) == (r.status == Status.QR_READY), r
    assert (r.qr_expires_at is not None) == (r.qr is not None), r
    assert 0 <= r.qr_seq <= min(qr_count, POLICY.max_refreshes), r
    if r.qr is not None:
        assert newest is not None and r.qr == newest.qr, (r, newest)
        assert r.qr_expires_at == newest.occurred_at + ttl(r.qr_seq), r
        assert r.qr_seq >= 1


@settings(max_examples=500, deadline=None)
@given(deliveries(max_qrs=POLICY.max_refreshes))
def test_any_delivery_order_ends_like_the_clean_one(case: tuple[History, list[Event]]) -> None:
    h, delivered = case
    clean = fold(h.events)
    assert (clean.status, clean.status_reason) == h.expected()
    assert clean.attempts == h.attempts
    assert clean.qr_seq == len(h.qrs)  # in order, every QR is applied

    final = fold(delivered)
    assert (final.status, final.status_reason) == (clean.status, clean.status_reason)
    assert (final.attempts, final.generation) == (clean.attempts, clean.generation)
    assert final.qr == clean.qr
    assert final.qr_seq <= clean.qr_seq
    check_qr_fields(final, h.qrs[-1], len(h.qrs))


def _progress(status: Status) -> int:
    return 9 if status in TERMINAL else RANK[status]


@settings(max_examples=500, deadline=None)
@given(deliveries(max_qrs=POLICY.max_refreshes + 3))
def test_no_step_moves_backwards_or_shows_an_overtaken_qr(
    case: tuple[History, list[Event]],
) -> None:
    h, delivered = case
    assert (fold(h.events).status, fold(h.events).status_reason) == h.expected()

    r = Row(status=Status.PENDING, generation=1)
    seen: list[QrUpdated] = []
    for event in delivered:
        out = apply(r, event, POLICY)
        new = out.row
        assert out.applied == (new != r)
        if isinstance(event, QrUpdated):
            seen.append(event)
        assert _progress(new.status) >= _progress(r.status), (r.status, event, new.status)
        if r.status in TERMINAL:
            assert new.status in (r.status, Status.DELETED)
        assert new.attempts >= r.attempts
        newest = max(seen, key=lambda q: (q.occurred_at, q.qr), default=None)
        check_qr_fields(new, newest, len({q.qr for q in seen}))
        r = new


# -- transitions the system forces (machine.force) ---------------------------------------------
#
# The oracle below is the graph written out by hand: a forced move goes where its kind says,
# from the states its rule allows, and nothing ever leaves ``deleted``.

ALLOWED_FROM: dict[Forced, frozenset[Status | None]] = {
    Forced.CREATE: frozenset({None}),
    Forced.RESTART: frozenset(Status) - {Status.DELETED},
    Forced.RERUN: frozenset(Status) - {Status.DELETED},
    Forced.RECREATE: frozenset(
        {
            Status.AWAITING_QR,
            Status.QR_READY,
            Status.CODE_READY,
            Status.PAIRING,
            Status.CONNECTED,
            Status.RECONNECTING,
        }
    ),
    Forced.FAIL: frozenset(Status) - TERMINAL,
    Forced.DELETE: frozenset(Status) - {Status.DELETED},
}
REASON_CODE_OR_NONE = st.sampled_from([None, *sorted(REASON_CODES)])


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([None, *Status]),
    st.sampled_from(Forced),
    REASON_CODE_OR_NONE,
    REASON_CODE_OR_NONE,
)
def test_a_forced_move_goes_where_the_graph_allows_or_raises(
    current: Status | None, kind: Forced, given_code: str | None, row_code: str | None
) -> None:
    if current not in ALLOWED_FROM[kind]:
        assert not may_force(current, kind)
        with pytest.raises(IllegalTransition):
            force(current, kind, given_code, row_code)
        return
    move = force(current, kind, given_code, row_code)
    assert move.status == FORCED_TARGET[kind]
    assert current != Status.DELETED  # nothing leaves deleted
    if given_code is not None:
        assert move.reason_code == given_code
    elif kind == Forced.RERUN and row_code in MOVE_REASONS:
        assert move.reason_code == row_code  # a moved connection must still be linked again
    else:
        assert move.reason_code is None  # cleared with the state it explained


def _forward(old: Status, new: Status) -> bool:
    """Along the graph: never back in rank, except out of ``reconnecting`` (a cycle), which
    leads back to linking or linked (or ends)."""
    if old == Status.RECONNECTING:
        back = {Status.QR_READY, Status.CODE_READY, Status.PAIRING, Status.CONNECTED}
        return new in back | TERMINAL | {old}
    return _progress(new) >= _progress(old)


def forced_row(r: Row, kind: Forced, code: str | None) -> Row:
    """The row as ``writer.transition`` and its callers leave it after ``kind``."""
    move = force(r.status, kind, code, r.reason_code)
    changes: dict[str, Any] = {"attempts": 0} if kind != Forced.DELETE else {}
    if kind == Forced.RESTART:
        changes |= {"generation": r.generation + 1, "qr_seq": 0, "server": None}
    return msgspec.structs.replace(
        r,
        status=move.status,
        reason_code=move.reason_code,
        status_reason=None,
        qr=None,
        qr_expires_at=None,
        pairing_code=None,
        pairing_code_expires_at=None,
        **changes,
    )


@settings(max_examples=500, deadline=None)
@given(
    deliveries(max_qrs=POLICY.max_refreshes),
    st.data(),
    st.sampled_from([k for k in Forced if k != Forced.CREATE]),
    REASON_CODE_OR_NONE,
)
def test_forced_moves_on_any_reachable_row_keep_the_graph(
    case: tuple[History, list[Event]], data: st.DataObject, kind: Forced, code: str | None
) -> None:
    """Any row the events can reach, forced any way the graph allows, then every event of the
    history delivered again (late copies): a forced end stays the end, a new generation
    ignores the old one's events, and from a forced re-run nothing moves backwards."""
    h, delivered = case
    cut = data.draw(st.integers(0, len(delivered)))
    r = fold(delivered[:cut])
    if not may_force(r.status, kind):
        with pytest.raises(IllegalTransition):
            force(r.status, kind, code, r.reason_code)
        return
    r = forced_row(r, kind, code)
    assert r.qr is None and r.pairing_code is None  # no forced state shows either
    later = delivered[cut:] + data.draw(st.permutations(h.events))
    for event in later:
        out = apply(r, event, POLICY)
        new = out.row
        if kind in (Forced.FAIL, Forced.DELETE):
            assert new.status == r.status, (kind, event)  # an end stays the end
        elif kind == Forced.RESTART:
            assert not out.applied and new == r, event  # the old generation is fenced
        else:
            assert _forward(r.status, new.status), (r.status, event, new.status)
            assert (new.qr is not None) == (new.status == Status.QR_READY), new
        r = new
