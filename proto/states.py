"""Connection states (contract with the frontend) and which of them end a generation."""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    PENDING = "pending"
    CREATING = "creating"
    AWAITING_QR = "awaiting_qr"
    QR_READY = "qr_ready"
    CODE_READY = "code_ready"  # code login: a pairing code to type on the phone is shown
    PAIRING = "pairing"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    QR_EXPIRED = "qr_expired"
    LOGGED_OUT = "logged_out"
    CONFLICT = "conflict"
    FAILED = "failed"
    DELETED = "deleted"


TERMINAL: frozenset[Status] = frozenset(
    {Status.QR_EXPIRED, Status.LOGGED_OUT, Status.CONFLICT, Status.FAILED, Status.DELETED}
)

# Progress along the happy path; a generation never moves to a lower rank, except through
# `reconnecting`, which the transition function handles on its own.
RANK: dict[Status, int] = {
    Status.PENDING: 0,
    Status.CREATING: 1,
    Status.AWAITING_QR: 2,
    Status.QR_READY: 3,
    Status.CODE_READY: 3,
    Status.PAIRING: 4,
    Status.CONNECTED: 5,
    Status.RECONNECTING: 5,
}
