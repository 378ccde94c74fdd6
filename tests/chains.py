"""What a connection's webhooks must be: read from the CONNECTION_CHANGES stream itself.

The order tests of the notifier compare what a receiver got with this chain: every change of
the connection, in stream order, each making the webhooks an endpoint subscribed to (ids as
the fan-out derives them), so a missing, duplicated-out-of-place or reordered webhook shows.
"""

from __future__ import annotations

import uuid
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from proto import headers
from proto.changes import change_decoder
from proto.names import Names
from services.notifier.fanout import webhook_id
from zapbus.endpoints import event_types, wants


async def expected_webhook_ids(
    js: JetStreamContext,
    names: Names,
    connection_id: uuid.UUID | str,
    endpoint_id: uuid.UUID | str,
    events: list[str],
) -> list[str]:
    """The webhook ids ``endpoint_id`` must receive for this connection, in order."""
    ids: list[str] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(
                names.changes_stream, seq, names.change_subject(connection_id), next=True
            )
        except NotFoundError:
            return ids
        assert msg.seq is not None and msg.data is not None
        change = change_decoder.decode(msg.data)
        msg_id = (msg.headers or {}).get(headers.MSG_ID) or f"seq:{msg.seq}"
        for kind in event_types(change):
            if wants(events, kind):
                ids.append(webhook_id(uuid.UUID(str(endpoint_id)), msg_id, kind))
        seq = msg.seq + 1


def first_seen(got: list[tuple[str, dict[str, Any]]], connection_id: str) -> list[str]:
    """The webhook ids a receiver got for a connection, in the order each was first seen
    (a redelivery after a crash repeats an id: that is allowed, a new one out of place not)."""
    seen: dict[str, None] = {}
    for wid, body in got:
        if body.get("data", {}).get("id") == connection_id:
            seen.setdefault(wid, None)
    return list(seen)
