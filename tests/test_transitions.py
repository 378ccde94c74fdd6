"""The state machine, table by table: ``state_for_report`` and ``apply`` from every state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proto.events import (
    CreateFailed,
    CreateRetrying,
    CreateStarted,
    Event,
    PairingCodeShown,
    QrUpdated,
    SessionCreated,
    SessionDeleted,
    StatusReported,
    event_type,
)
from proto.states import TERMINAL, Status
from zapbus.connection.machine import QrPolicy, Row, apply
from zapbus.connection.vocabulary import REASON_CODES, state_for_report

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CID = uuid.uuid4()
POLICY = QrPolicy(first_ttl_seconds=60, next_ttl_seconds=20, max_refreshes=3)
QRS_END = "QR refs attempts ended"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(cls: type[Any], t: float = 0.0, generation: int = 1, **kw: Any) -> Event:
    event: Event = cls(
        event_id=uuid.uuid4(), connection_id=CID, generation=generation, occurred_at=at(t), **kw
    )
    return event


def started(attempt: int = 1) -> Event:
    return ev(CreateStarted, attempt=attempt)


def created(attempt: int = 1) -> Event:
    return ev(SessionCreated, attempt=attempt)


def retrying(attempt: int = 1) -> Event:
    return ev(CreateRetrying, attempt=attempt, reason="HTTP 502", retry_in_seconds=1.0)


def failed() -> Event:
    return ev(CreateFailed, attempt=1, reason="HTTP 400")


def qr(text: str = "2@new", t: float = 100.0) -> Event:
    return ev(QrUpdated, t, qr=text)


def st(word: str, code: int | None = None, reason: str | None = None, t: float = 100.0) -> Event:
    return ev(StatusReported, t, status=word, code=code, reason=reason)


def code(text: str = "ABCD1234", t: float = 100.0) -> Event:
    return ev(PairingCodeShown, t, code=text)


def row(status: Status, **kw: Any) -> Row:
    """A plausible row in ``status``: qr_ready shows a QR received at T0, and so on."""
    if status == Status.CODE_READY:
        kw = {"login": "code", "pairing_code": "WXYZ9876", "pairing_code_expires_at": at(180), **kw}
    if status == Status.QR_READY:
        kw = {"qr": "2@old", "qr_seq": 1, "qr_expires_at": at(60), **kw}
    elif status not in (Status.PENDING, Status.CREATING, Status.AWAITING_QR):
        kw = {"qr_seq": 1, **kw}
    kw = {"attempts": 0 if status == Status.PENDING else 1, **kw}
    return Row(status=status, generation=1, **kw)


S = Status
CLASSIFY = [
    ("close", 515, "restartRequired", S.PAIRING),
    ("connected", 515, None, S.PAIRING),
    ("close", 401, "loggedOut", S.LOGGED_OUT),
    ("close", 408, QRS_END, S.QR_EXPIRED),
    ("close", 408, "qr refs attempts ended", S.QR_EXPIRED),
    ("close", 408, "Connection was lost", S.RECONNECTING),
    ("close", 408, None, S.RECONNECTING),
    ("close", 428, "connectionClosed", S.RECONNECTING),
    ("close", 503, "unavailableService", S.RECONNECTING),
    ("close", 440, "connectionReplaced", S.CONFLICT),
    ("close", 403, "forbidden", S.FAILED),
    ("close", 411, "multideviceMismatch", S.FAILED),
    ("close", 500, "badSession", S.FAILED),
    *[(w, None, None, S.CONNECTED) for w in ("connected", "open", " OPEN ", "online", "ready")],
    ("authenticated", None, None, S.CONNECTED),
    *[(w, None, None, S.RECONNECTING) for w in ("close", "closed", "disconnected", "reconnecting")],
    *[(w, None, None, S.AWAITING_QR) for w in ("connecting", "starting", "initializing", "qr")],
    *[(w, None, None, S.PAIRING) for w in ("pairing", "paired", "restart-required")],
    *[(w, None, None, S.LOGGED_OUT) for w in ("logged_out", "logout", "Logged Out")],
    ("conflict", None, None, S.CONFLICT),
    ("banana", None, None, None),
    ("", None, None, None),
    ("weird", 999, "nobody knows", None),
]


@pytest.mark.parametrize(("word", "code", "reason", "expected"), CLASSIFY)
def test_state_for_report(word: str, code: int | None, reason: str | None, expected: S) -> None:
    assert state_for_report(word, code, reason) == expected


# (from, event, to): `to` None means ignored (applied=False, row unchanged).
ALL_EVENTS_IGNORED = [
    qr(),
    st("connected"),
    st("close", 515),
    st("connecting"),
    st("close", 428),
    st("close", 401, "loggedOut"),
    st("close", 440),
    st("close", 408, QRS_END),
    st("close", 403),
    started(),
    created(),
    retrying(),
    failed(),
]
TABLE: list[tuple[S, Event, S | None]] = [
    (S.PENDING, started(), S.CREATING),
    (S.PENDING, created(), S.AWAITING_QR),
    (S.PENDING, retrying(), S.CREATING),
    (S.PENDING, failed(), S.FAILED),
    (S.PENDING, qr(), S.QR_READY),
    (S.PENDING, st("connecting"), S.AWAITING_QR),
    (S.PENDING, st("open"), S.CONNECTED),
    (S.PENDING, st("close", 515), S.PAIRING),
    (S.PENDING, st("close", 428, "Connection Terminated"), S.RECONNECTING),
    (S.PENDING, st("close", 401), S.LOGGED_OUT),
    (S.PENDING, ev(SessionDeleted), None),
    (S.CREATING, started(2), S.CREATING),
    (S.CREATING, started(1), None),
    (S.CREATING, retrying(1), S.CREATING),
    (S.CREATING, created(), S.AWAITING_QR),
    (S.CREATING, qr(), S.QR_READY),
    (S.CREATING, failed(), S.FAILED),
    (S.AWAITING_QR, started(), None),
    (S.AWAITING_QR, created(), None),
    (S.AWAITING_QR, retrying(), None),
    (S.AWAITING_QR, st("connecting"), None),
    (S.AWAITING_QR, qr(), S.QR_READY),
    (S.AWAITING_QR, failed(), S.FAILED),
    (S.AWAITING_QR, st("close", 440, "connectionReplaced"), S.RECONNECTING),
    (S.AWAITING_QR, st("close", 428, "Connection Terminated"), S.RECONNECTING),
    (S.QR_READY, qr("2@newer"), S.QR_READY),
    (S.QR_READY, qr("2@old"), None),
    (S.QR_READY, st("close", 515, "restartRequired"), S.PAIRING),
    (S.QR_READY, st("connected"), S.CONNECTED),
    (S.QR_READY, st("close", 428), S.RECONNECTING),
    (S.QR_READY, st("close", 408), S.RECONNECTING),
    (S.QR_READY, st("close", 408, QRS_END), S.QR_EXPIRED),
    (S.QR_READY, st("connecting"), None),
    (S.QR_READY, created(), None),
    (S.QR_READY, failed(), None),
    (S.PAIRING, st("connected"), S.CONNECTED),
    (S.PAIRING, qr(), None),
    (S.PAIRING, st("close", 515), None),
    (S.PAIRING, st("close", 503), S.RECONNECTING),
    (S.PAIRING, st("close", 401), S.LOGGED_OUT),
    (S.CONNECTED, qr(), None),
    (S.CONNECTED, st("close", 515), None),
    (S.CONNECTED, st("connected"), None),
    (S.CONNECTED, st("open"), None),
    (S.CONNECTED, st("connecting"), None),
    (S.CONNECTED, st("close"), S.RECONNECTING),
    (S.CONNECTED, st("close", 401, "loggedOut"), S.LOGGED_OUT),
    (S.CONNECTED, st("close", 440, "connectionReplaced"), S.RECONNECTING),
    (S.CONNECTED, st("close", 403), S.FAILED),
    (S.CONNECTED, st("close", 411), S.FAILED),
    (S.CONNECTED, st("close", 500), S.FAILED),
    (S.CONNECTED, created(), None),
    (S.CONNECTED, failed(), None),
    (S.CONNECTED, ev(SessionDeleted), None),
    (S.RECONNECTING, st("connected"), S.CONNECTED),
    (S.RECONNECTING, qr(), S.QR_READY),
    (S.RECONNECTING, st("close", 515), S.PAIRING),
    (S.RECONNECTING, st("close", 428), None),
    (S.RECONNECTING, st("connecting"), None),
    (S.RECONNECTING, st("close", 401), S.LOGGED_OUT),
    (S.CODE_READY, st("close", 515), S.PAIRING),
    (S.CODE_READY, st("connected"), S.CONNECTED),
    (S.CODE_READY, st("close", 428), S.RECONNECTING),
    (S.CODE_READY, st("close", 401, "loggedOut"), S.LOGGED_OUT),
    (S.CODE_READY, st("connecting"), None),
    (S.CODE_READY, code("WXYZ9876"), None),
    (S.CODE_READY, code("NEWC0DE1"), S.CODE_READY),
    (S.CODE_READY, created(), None),
    (S.QR_READY, code(), None),  # QR login: a code is never shown
    (S.RECONNECTING, code(), None),
    *[(t, e, None) for t in sorted(TERMINAL) for e in ALL_EVENTS_IGNORED],
    *[(t, ev(SessionDeleted), None) for t in sorted(TERMINAL - {S.DELETED})],
    (S.DELETED, ev(SessionDeleted), None),
]


@pytest.mark.parametrize(
    ("start", "event", "to"), TABLE, ids=[f"{s}-{event_type(e)}-{t}" for s, e, t in TABLE]
)
def test_apply_table(start: S, event: Event, to: S | None) -> None:
    before = row(start)
    outcome = apply(before, event, POLICY)
    if to is None:
        assert (outcome.applied, outcome.row) == (False, before)
        return
    assert outcome.applied and outcome.row.status == to
    assert (outcome.row.qr is not None) == (to == S.QR_READY)
    assert (outcome.row.qr_expires_at is not None) == (to == S.QR_READY)
    if isinstance(event, StatusReported) and (to in TERMINAL or to == S.RECONNECTING):
        assert outcome.row.status_reason == event.reason
        assert outcome.code == event.code


def test_every_state_is_in_the_table() -> None:
    assert {start for start, _, _ in TABLE} == set(Status)


@pytest.mark.parametrize("generation", [0, 2, 7])
@pytest.mark.parametrize("event", [*ALL_EVENTS_IGNORED, ev(SessionDeleted)], ids=event_type)
def test_events_of_another_generation_never_apply(generation: int, event: Event) -> None:
    for start in Status:
        before = Row(status=start, generation=generation)
        outcome = apply(before, event, POLICY)
        assert (outcome.applied, outcome.row, outcome.reason) == (False, before, "other generation")


def test_failed_keeps_the_reason_of_the_code() -> None:
    out = apply(row(S.CONNECTED), st("close", 403, "forbidden"), POLICY)
    assert (out.row.status, out.row.status_reason, out.code) == (S.FAILED, "forbidden", 403)
    out = apply(row(S.CREATING), failed(), POLICY)
    assert (out.row.status, out.row.status_reason) == (S.FAILED, "HTTP 400")


def test_qr_seq_counts_and_expiry_is_first_ttl_then_next_ttl() -> None:
    r = row(S.AWAITING_QR)
    for n, (text, t, expires) in enumerate([("2@a", 0, 60), ("2@b", 60, 80), ("2@c", 80, 100)]):
        out = apply(r, qr(text, t), POLICY)
        r = out.row
        assert out.applied and (r.status, r.qr, r.qr_seq) == (S.QR_READY, text, n + 1)
        assert r.qr_expires_at == at(expires)


def test_the_same_qr_twice_is_a_no_op() -> None:
    r = apply(row(S.AWAITING_QR), qr("2@a", 0), POLICY).row
    out = apply(r, qr("2@a", 5), POLICY)
    assert (out.applied, out.row) == (False, r)


def test_a_qr_older_than_the_one_shown_is_ignored() -> None:
    r = apply(row(S.AWAITING_QR), qr("2@new", 60), POLICY).row
    out = apply(r, qr("2@old", 0), POLICY)
    assert (out.applied, out.row, out.reason) == (False, r, "older than the QR shown")


def test_two_qrs_received_at_the_same_instant_end_the_same_in_either_order() -> None:
    a, b = qr("2@a", 10), qr("2@b", 10)
    start = row(S.AWAITING_QR)
    ab = apply(apply(start, a, POLICY).row, b, POLICY).row
    ba = apply(apply(start, b, POLICY).row, a, POLICY).row
    assert ab.qr == ba.qr == "2@b"


def test_the_refresh_cap_ends_in_qr_expired() -> None:
    r = row(S.AWAITING_QR)
    for i in range(POLICY.max_refreshes):
        r = apply(r, qr(f"2@{i}", 20 * i), POLICY).row
    assert (r.status, r.qr_seq) == (S.QR_READY, POLICY.max_refreshes)
    out = apply(r, qr("2@one-too-many", 100), POLICY)
    assert out.applied and out.reason == "qr refresh limit reached"
    assert (out.row.status, out.row.status_reason) == (S.QR_EXPIRED, "qr refresh limit reached")
    assert (out.row.qr, out.row.qr_expires_at, out.row.qr_seq) == (None, None, 3)


def test_a_late_qr_after_connected_is_ignored() -> None:
    r = row(S.QR_READY)
    for event in (st("close", 515, t=1), st("connected", t=2)):
        r = apply(r, event, POLICY).row
    assert (r.status, r.qr, r.qr_expires_at, r.qr_seq) == (S.CONNECTED, None, None, 1)
    assert not apply(r, qr("2@late", 3), POLICY).applied


def test_create_failed_after_a_qr_was_shown_is_ignored() -> None:
    out = apply(row(S.QR_READY), failed(), POLICY)
    assert (out.applied, out.row.status, out.reason) == (False, S.QR_READY, "HTTP 400")


def test_reconnecting_leads_back_to_connected_or_a_new_qr() -> None:
    r = apply(row(S.CONNECTED), st("close", 428, "connectionClosed"), POLICY).row
    assert (r.status, r.status_reason) == (S.RECONNECTING, "connectionClosed")
    assert apply(r, st("open"), POLICY).row.status == S.CONNECTED
    back = apply(r, qr("2@again", 500), POLICY).row
    assert (back.status, back.qr, back.qr_seq, back.status_reason) == (
        S.QR_READY,
        "2@again",
        2,
        None,
    )
    assert back.qr_expires_at == at(520)  # not the first QR: next_ttl


def test_attempts_never_go_down_and_a_later_attempt_clears_the_retry_reason() -> None:
    r = apply(row(S.PENDING, attempts=0), retrying(1), POLICY).row
    assert (r.status, r.status_reason, r.attempts) == (S.CREATING, "HTTP 502", 1)
    r = apply(r, started(2), POLICY).row
    assert (r.status_reason, r.attempts) == (None, 2)
    for late in (started(1), retrying(1)):
        assert not apply(r, late, POLICY).applied
    late_created = apply(row(S.QR_READY), created(3), POLICY)
    assert late_created.applied and late_created.row.status == S.QR_READY
    assert late_created.row.attempts == 3


def test_default_policy_is_used_when_none_is_given() -> None:
    out = apply(row(S.AWAITING_QR), qr("2@a", 0))
    assert out.row.qr_expires_at == at(QrPolicy().first_ttl_seconds)


def test_code_login_shows_the_code_and_a_qr_rotation_never_replaces_it() -> None:
    r = row(S.AWAITING_QR, login="code")
    r = apply(r, qr("2@first", t=1), POLICY).row
    assert (r.status, r.qr, r.pairing_code) == (S.AWAITING_QR, "2@first", None)
    r = apply(r, code("ABCD1234", t=2), POLICY).row
    assert (r.status, r.pairing_code, r.qr) == (S.CODE_READY, "ABCD1234", "2@first")
    assert r.pairing_code_expires_at == at(2 + POLICY.pairing_code_ttl_seconds)
    out = apply(r, qr("2@second", t=30), POLICY)
    assert out.applied and out.row.status == S.CODE_READY
    assert (out.row.pairing_code, out.row.qr) == ("ABCD1234", "2@second")  # the code stays
    linked = apply(out.row, st("close", 515, t=40), POLICY).row
    assert (linked.status, linked.pairing_code, linked.qr) == (S.PAIRING, None, None)


def test_a_code_before_the_session_reports_anything_still_shows() -> None:
    out = apply(row(S.CREATING, login="code"), code(), POLICY)
    assert out.applied and out.row.status == S.CODE_READY


# --- what 2026 servers report (reason codes, 440 loops, 408s, unreachable, passkey) -----------

LOOP = QrPolicy(conflict_loop_count=3, conflict_loop_window_seconds=60)


def test_440_reconnects_until_it_loops_within_the_window() -> None:
    r = row(S.CONNECTED)
    for n, t in enumerate((10.0, 20.0), start=1):
        r = apply(r, st("close", 440, "connectionReplaced", t=t), LOOP).row
        assert (r.status, r.reason_code, r.conflicts) == (S.RECONNECTING, "connection_replaced", n)
        r = apply(r, st("connected", t=t + 1), LOOP).row
        assert r.status == S.CONNECTED
    r = apply(r, st("close", 440, "connectionReplaced", t=30.0), LOOP).row
    assert (r.status, r.reason_code) == (S.CONFLICT, "connection_replaced")


def test_440s_spread_beyond_the_window_never_end_the_generation() -> None:
    r = row(S.CONNECTED)
    for t in (0.0, 70.0, 140.0, 210.0):
        r = apply(r, st("close", 440, t=t), LOOP).row
        assert r.status == S.RECONNECTING
        r = apply(r, st("connected", t=t + 1), LOOP).row
    assert r.status == S.CONNECTED


@pytest.mark.parametrize(
    ("report", "status", "reason_code"),
    [
        (st("close", 408, QRS_END), S.QR_EXPIRED, "qr_refs_ended"),
        (st("close", 401, "loggedOut"), S.LOGGED_OUT, "logged_out"),
        (st("close", 403, "forbidden"), S.FAILED, "server_refused"),
        (st("close", None, "reconnect_loop_detected"), S.FAILED, "session_lost"),
        (st("error", None, "wrong_phone_number"), S.FAILED, "wrong_number"),
        (
            st("PASSKEY_REQUIRED", None, "WhatsApp asked for a passkey"),
            S.FAILED,
            "passkey_required",
        ),
        (st("close", 408, "Connection was lost"), S.RECONNECTING, None),
        (st("close", 408, "Pre-key upload timeout"), S.RECONNECTING, None),
    ],
)
def test_reason_codes(report: Event, status: S, reason_code: str | None) -> None:
    out = apply(row(S.QR_READY), report, POLICY)
    assert out.applied and (out.row.status, out.row.reason_code) == (status, reason_code)
    assert reason_code is None or reason_code in REASON_CODES


LOOP_WORDS = "the server gave up reconnecting (reconnect_loop_detected)"


@pytest.mark.parametrize("start", [S.PENDING, S.CREATING, S.AWAITING_QR])
def test_a_give_up_before_any_qr_is_whatsapp_unreachable_not_a_conflict(start: S) -> None:
    """fazer hides every close's code ("reconnecting"), then gives up: with no QR ever shown
    and no 440 seen, the server could not reach WhatsApp (issue 19, item 1)."""
    r = row(start)
    for n in range(3):
        r = apply(r, st("reconnecting", t=100 + n), POLICY).row
    assert r.status == S.RECONNECTING and r.qr_seq == 0
    for before in (row(start), r):
        out = apply(before, st("reconnect_loop_detected", None, LOOP_WORDS, t=110), POLICY)
        assert (out.row.status, out.row.reason_code) == (S.FAILED, "whatsapp_unreachable")
        assert out.row.status_reason == LOOP_WORDS


def test_a_give_up_after_440s_is_a_conflict_loop() -> None:
    r = apply(row(S.CONNECTED), st("close", 440, "connectionReplaced", t=10.0), LOOP).row
    assert r.status == S.RECONNECTING and r.conflicts == 1
    out = apply(r, st("reconnect_loop_detected", None, LOOP_WORDS, t=20.0), LOOP)
    assert (out.row.status, out.row.reason_code) == (S.FAILED, "conflict_loop")
    early = apply(row(S.AWAITING_QR), st("close", 440, "connectionReplaced", t=10.0), LOOP).row
    out = apply(early, st("reconnect_loop_detected", None, LOOP_WORDS, t=20.0), LOOP)
    assert out.row.reason_code == "conflict_loop"


def test_a_give_up_after_a_qr_or_a_link_without_440_is_a_lost_session() -> None:
    for start in (S.QR_READY, S.CONNECTED, S.RECONNECTING, S.PAIRING):
        out = apply(row(start), st("reconnect_loop_detected", None, LOOP_WORDS), POLICY)
        assert (out.row.status, out.row.reason_code) == (S.FAILED, "session_lost"), start


def test_a_server_that_cannot_reach_whatsapp_says_why_at_once() -> None:
    unreachable = "WebSocket Error (getaddrinfo ENOTFOUND web.whatsapp.com)"
    r = apply(row(S.AWAITING_QR), st("close", 408, unreachable), POLICY).row
    assert (r.status, r.status_reason) == (S.RECONNECTING, unreachable)
    again = apply(r, st("connecting", t=101), POLICY)
    assert not again.applied  # the loop of connects and closes never hides the reason
    bare = apply(row(S.CREATING), st("close"), POLICY).row
    assert bare.status == S.RECONNECTING and bare.status_reason


@pytest.mark.parametrize(
    ("start", "to", "reason_code"),
    [
        (S.CONNECTED, S.LOGGED_OUT, "logged_out"),
        (S.RECONNECTING, S.LOGGED_OUT, "logged_out"),
        (S.QR_READY, S.QR_EXPIRED, "qr_refs_ended"),
        (S.AWAITING_QR, S.FAILED, "server_refused"),
    ],
)
def test_a_bare_failed_means_what_the_row_was_doing(start: S, to: S, reason_code: str) -> None:
    out = apply(row(start), st("FAILED"), POLICY)
    assert (out.row.status, out.row.reason_code) == (to, reason_code)
    assert out.row.status_reason


def test_stopped_on_the_server_ends_a_live_row() -> None:
    out = apply(row(S.CONNECTED), st("STOPPED"), POLICY)
    assert (out.row.status, out.row.reason_code) == (S.FAILED, "session_lost")
