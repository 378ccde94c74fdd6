"""The connection state machine: one pure function folds an event into a connection row.

Rules (see docs/architecture.md):

* Events of another generation never change the row.
* Terminal states (qr_expired, logged_out, conflict, failed, deleted) end a generation; only
  ``deleted`` may still replace them.
* Within a generation the state only moves forward along
  pending -> creating -> awaiting_qr -> qr_ready -> pairing -> connected; ``reconnecting`` can
  follow any state from qr_ready on and leads back to connected or qr_ready.
* A repeated fact (the same QR again, ``connected`` while connected) changes nothing, and so does
  a late one: a QR older than the one shown, a start or retry of an earlier attempt. So a
  generation's events delivered twice or out of order end in the same state as in order, with
  the newest QR on screen (tests/test_transitions_property.py). Two exceptions, by nature:
  ``reconnecting`` is a cycle, and the refresh cap counts the QRs shown, which a shuffle can make
  fewer (a QR overtaken by a newer one is never shown).
* A QR is on the row only while it is ``qr_ready``. ``qr_seq`` counts the QR codes applied in
  this generation; the first lives ``first_ttl_seconds``, later ones ``next_ttl_seconds``, and
  one more than ``max_refreshes`` ends the generation in qr_expired. When the shown QR was
  received is not stored: it is ``qr_expires_at`` minus that QR's lifetime.
* ``attempts`` (of the create call) never goes down; a late worker event that only raises it is
  applied without moving the state.

What a server's words and Baileys' disconnect codes mean is ``vocabulary.py``'s.

The system also forces transitions of its own, which no event of the session brings: the
gateway's create, recreate and delete, the watchdog's time-out, the reconciler's re-create of a
lost session (or its giving up), a move to another server, a placement that failed, a dead
letter replayed. ``force`` says where each kind goes and refuses (``IllegalTransition``) what the
graph does not allow, by the same rules as events (``_can_move``) plus the restarts:

* ``fail`` (-> failed) and ``delete`` (-> deleted) follow the event rules: a terminal state ends
  the generation, only ``deleted`` still replaces it, and nothing leaves ``deleted``;
* ``restart`` (a new generation: recreate, move) and ``rerun`` (the same generation's create
  again: replay, placement failed) go back to ``pending`` from any state but ``deleted``;
* ``recreate`` (a session the server lost is created again) goes to ``reconnecting`` from a
  state whose session the server should hold (``WANTED_LIVE``);
* ``create`` makes a row, ``pending``.

None of their targets shows a QR or a pairing code: a forced move clears both. Its reason code
is the one the caller gives; a ``rerun`` keeps a move's (``MOVE_REASONS``: the connection must
still be linked again), every other one is cleared with the state it explained.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

import msgspec

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
    WebhookIgnored,
)
from zapbus.connection.states import AWAITING_CREATE, RANK, TERMINAL, WANTED_LIVE, Status
from zapbus.connection.vocabulary import (
    BARE_FAILED,
    MOVE_REASONS,
    STOPPED,
    reason_code_for,
    state_for_report,
)


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a connection row that the state machine reads and writes."""

    status: Status
    generation: int
    status_reason: str | None = None
    qr: str | None = None
    qr_seq: int = 0
    qr_expires_at: datetime | None = None
    attempts: int = 0
    login: str = "qr"
    pairing_code: str | None = None
    pairing_code_expires_at: datetime | None = None
    # machine-readable cause of the state (REASON_CODES), beside the free-text status_reason
    reason_code: str | None = None
    # 440 (connection replaced) closes seen in the current loop window, and since when
    conflicts: int = 0
    conflicts_since: datetime | None = None
    account_phone: str | None = None
    account_name: str | None = None
    # the Baileys server of this generation (read only here: placement writes it)
    server: str | None = None


class QrPolicy(msgspec.Struct, frozen=True, kw_only=True):
    first_ttl_seconds: float = 60.0
    next_ttl_seconds: float = 20.0
    max_refreshes: int = 6
    # How long WhatsApp accepts a pairing code (about three minutes).
    pairing_code_ttl_seconds: float = 180.0
    # 440 closes this many times within the window: another device keeps taking the session.
    conflict_loop_count: int = 3
    conflict_loop_window_seconds: float = 60.0


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    row: Row
    applied: bool
    code: int | None = None
    reason: str | None = None


# A move to another server stays on the row through the new generation's linking.
_KEEPS_MOVE_REASON = frozenset(
    {Status.CREATING, Status.AWAITING_QR, Status.QR_READY, Status.CODE_READY}
)


def _can_move(current: Status, target: Status) -> bool:
    if current == target:
        return False
    if target == Status.DELETED:
        return True
    if current in TERMINAL:
        return False
    if target in TERMINAL:
        return True
    if target == Status.RECONNECTING:
        return RANK[current] >= RANK[Status.QR_READY]
    if current == Status.RECONNECTING:
        return target in (Status.CONNECTED, Status.QR_READY, Status.CODE_READY, Status.PAIRING)
    return RANK[target] > RANK[current]


def _move(row: Row, target: Status, reason: str | None = None, **changes: object) -> Row:
    """The row in ``target``. A QR is only kept while the row shows one (``qr_ready``; and in
    code login ``awaiting_qr``/``code_ready``, where it is the fallback beside the code); a
    pairing code only while ``code_ready``."""
    keeps_qr = target == Status.QR_READY or (
        row.login == "code" and target in (Status.AWAITING_QR, Status.CODE_READY)
    )
    if not keeps_qr:
        changes = {"qr": None, "qr_expires_at": None, **changes}
    if target != Status.CODE_READY:
        changes = {"pairing_code": None, "pairing_code_expires_at": None, **changes}
    changes = {"reason_code": None, **changes}
    if changes["reason_code"] is None and target in _KEEPS_MOVE_REASON:
        if row.reason_code in MOVE_REASONS:
            changes["reason_code"] = row.reason_code  # moved: why it must be linked again
    return msgspec.structs.replace(row, status=target, status_reason=reason, **changes)


def _ttl(policy: QrPolicy, qr_seq: int) -> timedelta:
    """How long the ``qr_seq``-th QR of a generation lives (the first one longer)."""
    seconds = policy.first_ttl_seconds if qr_seq <= 1 else policy.next_ttl_seconds
    return timedelta(seconds=seconds)


def _shown_since(row: Row, policy: QrPolicy) -> datetime | None:
    """When the QR on the row was received: its expiry minus its lifetime (no extra column)."""
    if row.qr is None or row.qr_expires_at is None:
        return None
    return row.qr_expires_at - _ttl(policy, row.qr_seq)


def _attempts(row: Row, attempt: int) -> Row:
    """Attempts only grow: a late event of an earlier attempt never lowers the count."""
    return row if attempt <= row.attempts else msgspec.structs.replace(row, attempts=attempt)


def _worker_event(row: Row, event: Event) -> Outcome:
    """create.started / create.succeeded / create.retrying / create.failed."""
    reason: str | None = None
    match event:
        case CreateStarted(attempt=attempt):
            # A later attempt starts afresh (clears the last retry's reason); a late or repeated
            # start of an attempt already counted changes nothing.
            new = _attempts(row, attempt)
            if row.status in AWAITING_CREATE and attempt > row.attempts:
                new = _move(row, Status.CREATING, attempts=attempt)
        case SessionCreated(attempt=attempt):
            new = _attempts(row, attempt)
            if _can_move(row.status, Status.AWAITING_QR):
                new = _move(new, Status.AWAITING_QR)
        case CreateRetrying(reason=reason, attempt=attempt):
            new = _attempts(row, attempt)
            if row.status in AWAITING_CREATE and attempt >= row.attempts:
                new = _move(new, Status.CREATING, reason)
        case CreateFailed(reason=reason, attempt=attempt, reason_code=code):
            # A QR already shown proves the session exists: a late failure of the call lies.
            new = _attempts(row, attempt)
            if row.status in (Status.PENDING, Status.CREATING, Status.AWAITING_QR):
                new = _move(new, Status.FAILED, reason, reason_code=code or "gave_up")
        case _:
            return Outcome(row=row, applied=False)
    # Even when the state does not move, a late event may carry a higher attempt count.
    return Outcome(row=new, applied=new != row, reason=reason)


def _pairing_code(row: Row, code: str, at: datetime, policy: QrPolicy) -> Outcome:
    """A pairing code: shown (``code_ready``) in code login, until the session connects."""
    if row.login != "code" or code == row.pairing_code:
        return Outcome(row=row, applied=False)
    if row.status != Status.CODE_READY and not _can_move(row.status, Status.CODE_READY):
        return Outcome(row=row, applied=False)
    expires = at + timedelta(seconds=policy.pairing_code_ttl_seconds)
    new = _move(row, Status.CODE_READY, pairing_code=code, pairing_code_expires_at=expires)
    return Outcome(row=new, applied=True)


def _qr(row: Row, qr: str, at: datetime, policy: QrPolicy) -> Outcome:
    ignored = Outcome(row=row, applied=False)
    if row.login == "code":
        return _fallback_qr(row, qr, at, policy)
    accepts_qr = row.status == Status.QR_READY or _can_move(row.status, Status.QR_READY)
    if qr == row.qr or not accepts_qr:
        return ignored
    shown_since = _shown_since(row, policy)
    # A QR older than the one shown was overtaken (late or re-delivered): showing it would put
    # a dead code on screen. Two QRs received at the same instant are ordered by their text, so
    # the outcome never depends on the order they arrive in.
    if shown_since is not None and row.qr is not None and (at, qr) < (shown_since, row.qr):
        return Outcome(row=row, applied=False, reason="older than the QR shown")
    if row.qr_seq >= policy.max_refreshes:
        new = _move(row, Status.QR_EXPIRED, "qr refresh limit reached")
        return Outcome(row=new, applied=True, reason="qr refresh limit reached")
    seq = row.qr_seq + 1
    new = _move(row, Status.QR_READY, qr=qr, qr_seq=seq, qr_expires_at=at + _ttl(policy, seq))
    return Outcome(row=new, applied=True)


def _fallback_qr(row: Row, qr: str, at: datetime, policy: QrPolicy) -> Outcome:
    """Code login: a QR is kept beside the code as a fallback; it never moves the row out of
    ``code_ready`` (nor replaces the code the user is typing). Before the code, it shows the
    session is up (``awaiting_qr``)."""
    if qr == row.qr or row.status not in (
        Status.PENDING,
        Status.CREATING,
        Status.AWAITING_QR,
        Status.CODE_READY,
    ):
        return Outcome(row=row, applied=False)
    target = Status.CODE_READY if row.status == Status.CODE_READY else Status.AWAITING_QR
    seq = row.qr_seq + 1
    new = _move(
        row,
        target,
        row.status_reason if target == row.status else None,
        qr=qr,
        qr_seq=seq,
        qr_expires_at=at + _ttl(policy, seq),
        pairing_code=row.pairing_code,
        pairing_code_expires_at=row.pairing_code_expires_at,
    )
    return Outcome(row=new, applied=True)


def _status(
    row: Row, status: str, code: int | None, reason: str | None, at: datetime, policy: QrPolicy
) -> Outcome:
    target = state_for_report(status, code, reason)
    ignored = Outcome(row=row, applied=False, code=code, reason=reason)
    if target is None:
        return ignored
    word = status.strip().lower()
    if target == Status.FAILED and code is None and word in BARE_FAILED and not reason:
        if word == STOPPED:
            reason = "the session was stopped on the server"
        elif row.status in (Status.CONNECTED, Status.PAIRING, Status.RECONNECTING):
            target, reason = Status.LOGGED_OUT, "the server reports the session failed"
        elif row.status == Status.QR_READY or row.qr_seq > 0:
            target, reason = Status.QR_EXPIRED, "no QR code was scanned"
        else:
            reason = "the server reports the session failed"
    changes: dict[str, object] = {}
    if target == Status.CONFLICT:
        # 440: another client took the session; servers reconnect after it. Only a loop of
        # them (the count within the window) ends the generation.
        window = timedelta(seconds=policy.conflict_loop_window_seconds)
        fresh = row.conflicts_since is None or at - row.conflicts_since > window
        count, since = (1, at) if fresh else (row.conflicts + 1, row.conflicts_since)
        changes = {"conflicts": count, "conflicts_since": since}
        if count < policy.conflict_loop_count:
            target = Status.RECONNECTING
    early_close = (
        target == Status.RECONNECTING
        and row.status in (Status.PENDING, Status.CREATING, Status.AWAITING_QR)
        and row.qr_seq == 0
    )
    # A close before the first QR (the server cannot reach WhatsApp, a handshake timed out)
    # shows at once, with the server's words, instead of a silent awaiting_qr.
    if not early_close and not _can_move(row.status, target):
        if changes and row.status == target:  # a repeated 440 while reconnecting: count it
            return Outcome(row=msgspec.structs.replace(row, **changes), applied=True, code=code)
        return ignored
    explains = target in TERMINAL or target == Status.RECONNECTING
    text = reason if explains else None
    if early_close and not text:
        text = "the server closed the connection before any QR code"
    reason_code = reason_code_for(target, status, code, reason) if explains else None
    if reason_code == "conflict_loop":
        reason_code = _loop_reason_code(row)
    new = _move(row, target, text, reason_code=reason_code, **changes)
    return Outcome(row=new, applied=True, code=code, reason=reason)


def _loop_reason_code(row: Row) -> str:
    """Why a server gave up reconnecting (``reconnect_loop_detected``), from what the row saw:
    440s (another client took the session) make it a conflict loop; closes before any QR, the
    server cannot reach WhatsApp (fazer forwards no close codes: its loop of unreachable
    WhatsApp looks like any other); after a QR or a link, the server lost the session."""
    if row.conflicts > 0:
        return "conflict_loop"
    rank = RANK.get(row.status, RANK[Status.CONNECTED])
    before_whatsapp = rank < RANK[Status.QR_READY] or row.status == Status.RECONNECTING
    if before_whatsapp and row.qr_seq == 0 and row.account_phone is None:
        return "whatsapp_unreachable"
    return "session_lost"


def apply(row: Row, event: Event, policy: QrPolicy | None = None) -> Outcome:
    """Fold one event into a row. Pure: same inputs, same outcome."""
    policy = policy or QrPolicy()
    ignored = Outcome(row=row, applied=False)
    if event.generation != row.generation:
        return Outcome(row=row, applied=False, reason="other generation")

    match event:
        case CreateStarted() | SessionCreated() | CreateRetrying() | CreateFailed():
            return _worker_event(row, event)
        case SessionDeleted(already_gone=gone):
            # The server's session is gone; the row says what the tenant wants. Only the
            # gateway's delete makes a row `deleted` (a session the reconciler removed from
            # a failed row leaves it failed). Recorded in history, never applied.
            said = "already gone from the server" if gone else "removed from the server"
            return Outcome(row=row, applied=False, reason=f"session {said}")
        case PairingCodeShown(code=code, occurred_at=at):
            return _pairing_code(row, code, at, policy)
        case WebhookIgnored(event=name):
            return Outcome(row=row, applied=False, reason=f"not used: {name}")
        case QrUpdated(qr=qr, occurred_at=at):
            return _qr(row, qr, at, policy)
        case StatusReported(status=status, code=code, reason=reason, occurred_at=at):
            out = _status(row, status, code, reason, at, policy)
            if out.row.status == Status.CONNECTED and (event.account_phone or event.account_name):
                account = {
                    "account_phone": event.account_phone or out.row.account_phone,
                    "account_name": event.account_name or out.row.account_name,
                }
                new = msgspec.structs.replace(out.row, **account)
                return msgspec.structs.replace(out, row=new, applied=out.applied or new != row)
            return out
    return ignored


# -- transitions the system forces ------------------------------------------------------------


class Forced(enum.StrEnum):
    """A transition the system makes itself (not an event of the session), by kind."""

    CREATE = "create"  # the gateway makes a connection
    RESTART = "restart"  # a new generation: the gateway's recreate, a move to another server
    RERUN = "rerun"  # the same generation's create again: a dead letter replayed, a
    # placement whose server failed the create
    RECREATE = "recreate"  # the reconciler creates a session the server lost again
    FAIL = "fail"  # the watchdog's time-out, the reconciler giving up on a lost session
    DELETE = "delete"  # the tenant deletes the connection


FORCED_TARGET: dict[Forced, Status] = {
    Forced.CREATE: Status.PENDING,
    Forced.RESTART: Status.PENDING,
    Forced.RERUN: Status.PENDING,
    Forced.RECREATE: Status.RECONNECTING,
    Forced.FAIL: Status.FAILED,
    Forced.DELETE: Status.DELETED,
}


class IllegalTransition(Exception):
    """A forced transition the state graph does not allow (a bug in its caller)."""

    def __init__(self, current: Status | None, kind: Forced) -> None:
        now = current.value if current is not None else "no row"
        super().__init__(f"{kind.value} is not allowed from {now}")
        self.current = current
        self.kind = kind


class Move(msgspec.Struct, frozen=True, kw_only=True):
    """Where a forced transition leads: the state, and the reason code the row gets."""

    status: Status
    reason_code: str | None = None


def may_force(current: Status | None, kind: Forced) -> bool:
    """Does the graph allow ``kind`` from ``current`` (None: there is no row yet)?"""
    if kind == Forced.CREATE or current is None:
        return kind == Forced.CREATE and current is None
    match kind:
        case Forced.RESTART | Forced.RERUN:
            return current != Status.DELETED
        case Forced.RECREATE:
            return current in WANTED_LIVE
        case _:
            return _can_move(current, FORCED_TARGET[kind])


def force(
    current: Status | None,
    kind: Forced,
    reason_code: str | None = None,
    current_reason_code: str | None = None,
) -> Move:
    """The move ``kind`` makes from ``current`` (with its reason code: ``reason_code``, else
    the row's ``current_reason_code`` when a rerun keeps it); raises IllegalTransition when the
    graph does not allow it. Pure."""
    if not may_force(current, kind):
        raise IllegalTransition(current, kind)
    if reason_code is None and kind == Forced.RERUN and current_reason_code in MOVE_REASONS:
        reason_code = current_reason_code  # still to be linked again after its move
    return Move(status=FORCED_TARGET[kind], reason_code=reason_code)
