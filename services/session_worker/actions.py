"""The one map of Baileys errors (``zapbus.dialects.errors``) to what JetStream is told."""

from __future__ import annotations

import enum

from zapbus.dialects.errors import BaileysError, PermanentError


class Action(enum.Enum):
    """What the worker tells JetStream about a command whose call failed."""

    RETRY = "retry"  # event create.retrying, nak(delay): delivered again later
    GIVE_UP = "give_up"  # dead letter + create.failed (+ a delete of what may exist), term()


def action_for(error: BaileysError, last_delivery: bool) -> Action:
    """The one map of errors to JetStream actions (see the tree in this module's docstring)."""
    if isinstance(error, PermanentError) or last_delivery:
        return Action.GIVE_UP
    return Action.RETRY
