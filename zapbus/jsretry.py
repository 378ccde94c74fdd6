"""Riding out JetStream leader elections: retry what a failover makes fail for a few seconds.

On a cluster, killing a stream's leader leaves the stream (and its consumers) without one for
several seconds (4.5-8.6 s measured, ``../shared/NATS_NOTES.md``). Meanwhile a publish fails
fast with ``NoStreamResponseError`` or times out if it was in flight to the dead node; stream
and consumer management calls time out or answer 503 ("JetStream system temporarily
unavailable"). ``retrying`` repeats such a call with backoff until a deadline; ``publish``
does it for a publish, always with the same ``Nats-Msg-Id``, so a copy the dead node had
already stored is dropped by the duplicate window instead of being stored twice.

Anything else (a 404, a bad request, a closed connection) is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import nats.errors
from nats.js import api as js_api
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from proto import headers as hdr

log = logging.getLogger("zapbus.jsretry")

T = TypeVar("T")

# JetStream's "temporarily unavailable" answers (the API has no leader yet, or the cluster is
# re-forming): JSClusterNotAvailErr, JSClusterNotLeaderErr, JSClusterNoPeersErr (R3 placement
# while a node is down), JSStreamNotLeader... err_codes, and any 503.
_TRANSIENT_ERR_CODES = {10005, 10006, 10008, 10074}
BACKOFF_START_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 1.0
MANAGEMENT_DEADLINE_SECONDS = 30.0


def is_transient(exc: BaseException) -> bool:
    """True for errors a leader election (or a reconnect in progress) causes."""
    if isinstance(exc, ServiceUnavailableError):  # a 503 status (nats-py sets no code then)
        return True
    if isinstance(exc, APIError):
        return exc.code == 503 or exc.err_code in _TRANSIENT_ERR_CODES
    return isinstance(
        exc,
        TimeoutError  # nats.errors.TimeoutError, and the plain asyncio one nats-py also raises
        | NoStreamResponseError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionReconnectingError,
    )


async def retrying(
    call: Callable[[], Awaitable[T]],
    what: str,
    deadline: float = MANAGEMENT_DEADLINE_SECONDS,
) -> T:
    """``await call()``, again after each transient failure (0.1 s doubling to 1 s), until
    ``deadline`` seconds have passed; then the last error is raised."""
    began = time.monotonic()
    give_up = began + deadline
    delay = BACKOFF_START_SECONDS
    tries = 0
    while True:
        tries += 1
        try:
            result = await call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > give_up:
                raise
            log.info("%s failed (try %d), retrying: %r", what, tries, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            continue
        if tries > 1:
            waited = time.monotonic() - began
            log.info("%s succeeded after %d tries (%.1f s)", what, tries, waited)
        return result


class Publisher(Protocol):
    """What ``publish`` needs: a JetStreamContext, or a batchpub.GroupCommit."""

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float | None = ...,
        headers: dict[str, str] | None = ...,
    ) -> js_api.PubAck: ...


async def publish(
    js: Publisher,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
    timeout: float = 5.0,
    deadline: float = MANAGEMENT_DEADLINE_SECONDS,
) -> js_api.PubAck:
    """A JetStream publish retried through an election, every try with the same message id
    (``headers`` must carry ``Nats-Msg-Id``)."""
    if hdr.MSG_ID not in headers:
        raise ValueError("a retried publish needs a Nats-Msg-Id")

    async def once() -> js_api.PubAck:
        # a copy per try: nats-py adds to the headers it is given
        return await js.publish(subject, payload, timeout=timeout, headers=dict(headers))

    return await retrying(once, f"publish {headers[hdr.MSG_ID]} to {subject}", deadline)
