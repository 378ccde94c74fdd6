"""What the Baileys servers' words and codes mean, and the reasons zapbus gives.

A status report (``StatusReported``: a webhook, or the reconciler's look at a server) carries a
server's word (``connected``, ``close``, WAHA's ``WORKING`` turned into ``connected`` by its
dialect ...) and maybe a Baileys disconnect code (``DisconnectReason``): 515 restartRequired =
pairing (the normal step after a scan), 401 loggedOut = logged_out, 408 "QR refs attempts
ended" = qr_expired, other 408/428/503 = reconnecting, 440 connectionReplaced = conflict,
403/411/500 = failed. ``state_for_report`` says which state a report means; the machine
(``machine.py``) decides whether the row may move there. The dialect modules
(``zapbus/dialects/``) turn each server's bodies into these words.
"""

from __future__ import annotations

from zapbus.connection.states import Status

# The closed list of reason codes (contract: frontends translate and act on them).
REASON_CODES = frozenset(
    {
        "qr_refs_ended",  # nobody scanned: the QR codes ran out
        "logged_out",  # the phone logged the device out
        "conflict_loop",  # the server gave up reconnecting in a loop of 440s (replaced)
        "wrong_number",  # the phone that linked is not the one asked for
        "passkey_required",  # WhatsApp asked for a passkey, which Baileys cannot give
        "gave_up",  # the create failed on every attempt
        "timeout",  # no progress within the watchdog's deadline
        "session_lost",  # the server lost the session (re-created, or given up on; or it
        # gave up reconnecting, after a QR, with no 440 seen)
        "bad_credentials",  # the server refused zapbus's API key
        "server_refused",  # the server refused the request or the session (403/411/500 ...)
        "whatsapp_unreachable",  # the server cannot reach WhatsApp: closes before any QR (and
        # a server that gave up reconnecting before any QR)
        "connection_replaced",  # another client took the session (440), repeatedly
        "server_lost",  # its Baileys server was unreachable: moved to another (link again)
        "server_drained",  # moved off a drained Baileys server (link again)
    }
)
# A move to another server says why the connection must be linked again until it is: kept
# through the states of the new generation's linking (machine.py).
MOVE_REASONS = frozenset({"server_lost", "server_drained"})

_QR_END = "qr refs attempts ended"
_PASSKEY = ("passkey",)
_WRONG_NUMBER = ("wrong_phone_number", "wrong phone number", "wrong number")
_LOOP = ("reconnect_loop_detected",)
_RECONNECT_CODES = frozenset({408, 428, 503})
_FAIL_CODES = frozenset({403, 411, 500})
_CONNECTED_WORDS = frozenset({"connected", "open", "online", "ready", "authenticated", "working"})
_PAIRING_WORDS = frozenset({"pairing", "paired", "restart_required"})
_LOGGED_OUT_WORDS = frozenset({"logged_out", "loggedout", "logout"})
_RECONNECT_WORDS = frozenset({"reconnecting", "close", "closed", "disconnected"})
_CONNECTING_WORDS = frozenset({"connecting", "starting", "initializing", "qr", "scan_qr_code"})
# A server's bare "failed" / "stopped" (WAHA): what it means depends on where the row is.
BARE_FAILED = frozenset({"failed", "stopped"})
STOPPED = "stopped"
# The word the reconciler reports when a session it sees linked here dropped there.
RECONNECTING_WORD = Status.RECONNECTING.value


def state_for_report(status: str, code: int | None, reason: str | None) -> Status | None:
    """Map a Baileys status report to the state it means, or None when it means no change."""
    word = status.strip().lower().replace("-", "_").replace(" ", "_")
    reason_l = (reason or "").lower()
    said = f"{word} {reason_l}"
    if any(p in said for p in _PASSKEY + _WRONG_NUMBER + _LOOP):
        return Status.FAILED
    if code == 515:
        return Status.PAIRING
    if code == 401 or word in _LOGGED_OUT_WORDS:
        return Status.LOGGED_OUT
    if code == 408 and _QR_END in reason_l:
        return Status.QR_EXPIRED
    if code == 440 or word == Status.CONFLICT.value:
        return Status.CONFLICT
    if code in _FAIL_CODES or word in BARE_FAILED:
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


def reason_code_for(
    target: Status, status: str, code: int | None, reason: str | None
) -> str | None:
    """The reason code of a status report that moves a row to ``target``."""
    said = f"{status} {reason or ''}".lower().replace("-", "_")
    if any(p in said for p in _PASSKEY):
        return "passkey_required"
    if any(p in said for p in _WRONG_NUMBER):
        return "wrong_number"
    if any(p in said for p in _LOOP):
        return "conflict_loop"
    if status.strip().lower() == STOPPED:
        return "session_lost"
    match target:
        case Status.QR_EXPIRED:
            return "qr_refs_ended"
        case Status.LOGGED_OUT:
            return "logged_out"
        case Status.CONFLICT:
            return "connection_replaced"
        case Status.FAILED:
            return "server_refused"
        case Status.RECONNECTING if code == 440:
            return "connection_replaced"
    return None
