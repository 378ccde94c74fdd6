"""The connection state machine: one pure function folds an event into a connection row.

Rules (see docs/architecture.md):

* Events of another generation never change the row.
* Terminal states (qr_expired, logged_out, conflict, failed, deleted) end a generation; only
  ``deleted`` may still replace them.
* Within a generation the state only moves forward along
  pending -> creating -> awaiting_qr -> qr_ready -> pairing -> connected; ``reconnecting`` can
  follow any state from qr_ready on and leads back to connected or qr_ready.
* A repeated fact (the same QR again, ``connected`` while connected) changes nothing.

Baileys disconnect codes (``DisconnectReason``): 515 restartRequired = pairing (the normal step
after a scan), 401 loggedOut = logged_out, 408 "QR refs attempts ended" = qr_expired, other
408/428/503 = reconnecting, 440 connectionReplaced = conflict, 403/411/500 = failed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from proto.events import (
    CreateFailed,
    CreateRetrying,
    CreateStarted,
    Event,
    QrUpdated,
    SessionCreated,
    SessionDeleted,
    StatusReported,
    UnknownEvent,
)
from proto.states import RANK, TERMINAL, Status


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a connection row that the state machine reads and writes."""

    status: Status
    generation: int
    status_reason: str | None = None
    qr: str | None = None
    qr_seq: int = 0
    qr_expires_at: datetime | None = None
    attempts: int = 0


class QrPolicy(msgspec.Struct, frozen=True, kw_only=True):
    first_ttl_seconds: float = 60.0
    next_ttl_seconds: float = 20.0
    max_refreshes: int = 6


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    row: Row
    applied: bool
    code: int | None = None
    reason: str | None = None


_QR_END = "qr refs attempts ended"
_RECONNECT_CODES = frozenset({408, 428, 503})
_FAIL_CODES = frozenset({403, 411, 500})
_CONNECTED_WORDS = frozenset({"connected", "open", "online", "ready", "authenticated"})
_PAIRING_WORDS = frozenset({"pairing", "paired", "restart_required"})
_LOGGED_OUT_WORDS = frozenset({"logged_out", "loggedout", "logout"})
_RECONNECT_WORDS = frozenset({"reconnecting", "close", "closed", "disconnected"})
_CONNECTING_WORDS = frozenset({"connecting", "starting", "initializing", "qr"})


def classify_status(status: str, code: int | None, reason: str | None) -> Status | None:
    """Map a Baileys status report to the state it means, or None when it means no change."""
    word = status.strip().lower().replace("-", "_").replace(" ", "_")
    reason_l = (reason or "").lower()
    if code == 515:
        return Status.PAIRING
    if code == 401 or word in _LOGGED_OUT_WORDS:
        return Status.LOGGED_OUT
    if code == 408 and _QR_END in reason_l:
        return Status.QR_EXPIRED
    if code == 440 or word == "conflict":
        return Status.CONFLICT
    if code in _FAIL_CODES:
        return Status.FAILED
    if code in _RECONNECT_CODES:
        return Status.RECONNECTING
    if word in _CONNECTED_WORDS:
        return Status.CONNECTED
    if word in _PAIRING_WORDS:
        return Status.PAIRING
    if word in _RECONNECT_WORDS:
        return Status.RECONNECTING
    if word in _CONNECTING_WORDS:
        return Status.AWAITING_QR
    return None


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
        return target in (Status.CONNECTED, Status.QR_READY, Status.PAIRING)
    return RANK[target] > RANK[current]


def _move(row: Row, target: Status, reason: str | None = None, **changes: object) -> Row:
    return msgspec.structs.replace(row, status=target, status_reason=reason, **changes)


def apply(row: Row, event: Event, policy: QrPolicy | None = None) -> Outcome:
    """Fold one event into a row. Pure: same inputs, same outcome."""
    policy = policy or QrPolicy()
    ignored = Outcome(row=row, applied=False)
    if event.generation != row.generation:
        return Outcome(row=row, applied=False, reason="other generation")

    match event:
        case CreateStarted(attempt=attempt):
            if row.status in (Status.PENDING, Status.CREATING):
                return Outcome(row=_move(row, Status.CREATING, attempts=attempt), applied=True)
            return ignored
        case SessionCreated():
            if _can_move(row.status, Status.AWAITING_QR):
                return Outcome(row=_move(row, Status.AWAITING_QR), applied=True)
            return ignored
        case CreateRetrying(reason=reason, attempt=attempt):
            if row.status in (Status.PENDING, Status.CREATING):
                new = msgspec.structs.replace(
                    row, status=Status.CREATING, status_reason=reason, attempts=attempt
                )
                return Outcome(row=new, applied=True, reason=reason)
            return Outcome(row=row, applied=False, reason=reason)
        case CreateFailed(reason=reason):
            # A QR already shown proves the session exists: a late failure of the call lies.
            if row.status in (Status.PENDING, Status.CREATING, Status.AWAITING_QR):
                return Outcome(row=_move(row, Status.FAILED, reason), applied=True, reason=reason)
            return Outcome(row=row, applied=False, reason=reason)
        case SessionDeleted():
            if _can_move(row.status, Status.DELETED):
                return Outcome(row=_move(row, Status.DELETED, qr=None), applied=True)
            return ignored
        case QrUpdated(qr=qr, occurred_at=at):
            accepts_qr = row.status == Status.QR_READY or _can_move(row.status, Status.QR_READY)
            if qr == row.qr or not accepts_qr:
                return ignored
            if row.qr_seq >= policy.max_refreshes:
                new = _move(row, Status.QR_EXPIRED, "qr refresh limit reached", qr=None)
                return Outcome(row=new, applied=True, reason="qr refresh limit reached")
            ttl = policy.first_ttl_seconds if row.qr_seq == 0 else policy.next_ttl_seconds
            new = _move(
                row,
                Status.QR_READY,
                qr=qr,
                qr_seq=row.qr_seq + 1,
                qr_expires_at=at + timedelta(seconds=ttl),
            )
            return Outcome(row=new, applied=True)
        case StatusReported(status=status, code=code, reason=reason):
            target = classify_status(status, code, reason)
            if target is None or not _can_move(row.status, target):
                return Outcome(row=row, applied=False, code=code, reason=reason)
            keep_qr = target in (Status.QR_READY, Status.AWAITING_QR)
            new = _move(
                row,
                target,
                reason if target in TERMINAL or target == Status.RECONNECTING else None,
                **({} if keep_qr else {"qr": None, "qr_expires_at": None}),
            )
            return Outcome(row=new, applied=True, code=code, reason=reason)
        case UnknownEvent():
            return ignored
    return ignored
