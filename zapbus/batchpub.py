"""Publish many JetStream messages with one acknowledgement: atomic batches, group commit.

With ``sync_interval: always`` (the embedded server's setting) the server fsyncs each stored
message it acknowledges: messages published one by one, even pipelined, cost one fsync each
(~1-1.5k/s measured here), where an atomic batch (nats-server 2.12+, ADR-50) is stored and
fsynced once (~12-18k/s for batches of 200; ``docs/benchmarks.md``).

``BatchPublisher.publish`` sends a list of messages to one stream as atomic batches of at most
``MAX_ATOMIC`` messages (headers ``Nats-Batch-Id`` / ``Nats-Batch-Sequence``, the last with
``Nats-Batch-Commit``; only the commit is a request), when the stream allows it
(``allow_atomic``, set by ``zapbus migrate`` on servers that have it). Otherwise, and for a
batch the server refuses whole, it falls back to pipelined publishes whose acks are awaited
together, each message then getting its own answer:

- a batch holding a ``Nats-Msg-Id`` already in the duplicate window is refused whole
  (err_code 10201), where a single publish answers "duplicate": a relay re-publishing after a
  crash, or a retried webhook, must not loop on it;
- a stream without ``allow_atomic`` (10174): atomic batches are not tried again;
- a commit that timed out: the batch may be stored, so it is re-sent one by one only when
  every message has a ``Nats-Msg-Id`` (the duplicates are then dropped); else it failed.

A list that mixes streams is split by stream (``stream_of``): the server takes an atomic batch
for one stream only and refuses a mixed one as incomplete.

``GroupCommit`` collects the publishes of concurrent callers (webhook requests) into such
batches: a few batches in flight at a time, the next one gathering whatever arrived meanwhile,
so batches grow with the load and a lone request goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError

from zapbus.bus import supports_atomic

log = logging.getLogger("zapbus.batchpub")

MAX_ATOMIC = 1000  # the server's limit of messages in one atomic batch
ATOMIC_DISABLED = 10174  # the stream does not allow atomic publishes
DUPLICATE_IN_BATCH = 10201  # a message id of the batch is in the duplicate window
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
MSG_ID = "Nats-Msg-Id"


class BatchItem(NamedTuple):
    subject: str
    payload: bytes
    headers: Mapping[str, str]


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Reply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    count: int = 0
    error: _Error | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)

Result = js_api.PubAck | BaseException


class BatchPublisher:
    """Publishes lists of messages bound for one stream (see the module's docstring)."""

    def __init__(
        self,
        js: JetStreamContext,
        atomic: bool | None = None,
        timeout: float = 3.0,
        stream_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """``atomic`` None: tried where the server has atomic batches (2.12+); a stream that
        does not allow them turns them off at the first refusal. ``stream_of``: a subject's
        stream (``Names.stream_of``), for callers whose lists mix streams (the outbox relay
        sends commands and changes, the worker events, commands and dead letters): an atomic
        batch holds one stream's messages, the server refuses a mixed one as incomplete (its
        messages for the other stream are a gap). None: every list is for one stream."""
        self.js = js
        self.nc: NATS = js._nc
        self.atomic = supports_atomic(js) if atomic is None else atomic
        self.timeout = timeout
        self.stream_of = stream_of

    async def publish(self, msgs: Sequence[BatchItem]) -> list[Result]:
        """One result per message, in order: its PubAck, or the exception it failed with.
        Each stream's messages keep their order and go out as batches of their own, the
        streams side by side."""
        streams: dict[str, list[int]] = {}
        if self.stream_of is not None:
            for i, msg in enumerate(msgs):
                streams.setdefault(self.stream_of(msg.subject) or msg.subject, []).append(i)
        if len(streams) <= 1:
            return await self._one_stream(msgs)
        results: list[Result] = [nats.errors.Error("not published")] * len(msgs)
        answers = await asyncio.gather(
            *(self._guarded([msgs[i] for i in where]) for where in streams.values())
        )
        for where, answer in zip(streams.values(), answers, strict=True):
            for i, result in zip(where, answer, strict=True):
                results[i] = result
        return results

    async def _guarded(self, msgs: Sequence[BatchItem]) -> list[Result]:
        try:
            return await self._one_stream(msgs)
        except Exception as exc:  # one stream's failure leaves the others' answers
            return [exc] * len(msgs)

    async def _one_stream(self, msgs: Sequence[BatchItem]) -> list[Result]:
        results: list[Result] = []
        for start in range(0, len(msgs), MAX_ATOMIC):
            chunk = msgs[start : start + MAX_ATOMIC]
            if self.atomic and len(chunk) > 1:
                results.extend(await self._atomic_or_each(chunk))
            else:
                results.extend(await self._each(chunk))
        return results

    async def _atomic_or_each(self, chunk: Sequence[BatchItem]) -> list[Result]:
        try:
            return await self._atomic(chunk)
        except APIError as exc:
            if exc.err_code == ATOMIC_DISABLED:
                log.info("atomic publishes are not allowed on the stream: publishing one by one")
                self.atomic = False
            elif exc.err_code != DUPLICATE_IN_BATCH:
                log.info("atomic batch of %d refused (%s): publishing one by one", len(chunk), exc)
            return await self._each(chunk)
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            if all(MSG_ID in m.headers for m in chunk):
                return await self._each(chunk)  # stored or not: the ids drop the copies
            return [exc] * len(chunk)
        except nats.errors.Error as exc:
            return [exc] * len(chunk)

    async def _atomic(self, chunk: Sequence[BatchItem]) -> list[Result]:
        batch = uuid.uuid4().hex
        last = len(chunk)
        for seq, msg in enumerate(chunk[:-1], 1):
            hdrs = {**msg.headers, BATCH_ID: batch, BATCH_SEQUENCE: str(seq)}
            await self.nc.publish(msg.subject, msg.payload, headers=hdrs)
        msg = chunk[-1]
        hdrs = {**msg.headers, BATCH_ID: batch, BATCH_SEQUENCE: str(last), BATCH_COMMIT: "1"}
        answer = await self.nc.request(msg.subject, msg.payload, self.timeout, headers=hdrs)
        reply = _reply_decoder.decode(answer.data)
        if reply.error is not None:
            raise APIError(
                code=reply.error.code,
                err_code=reply.error.err_code,
                description=reply.error.description,
                stream=reply.stream,
                seq=reply.seq,
            )
        if reply.count != last:
            raise APIError(description=f"atomic batch of {last} stored {reply.count}")
        first = reply.seq - last + 1
        return [js_api.PubAck(stream=reply.stream, seq=first + i) for i in range(last)]

    async def _each(self, chunk: Sequence[BatchItem]) -> list[Result]:
        return await asyncio.gather(
            *(
                self.js.publish(m.subject, m.payload, timeout=self.timeout, headers=dict(m.headers))
                for m in chunk
            ),
            return_exceptions=True,
        )


class GroupCommit:
    """Concurrent ``publish`` calls go out together: up to ``max_in_flight`` batches at a
    time, each taking whatever queued meanwhile (at most ``max_batch``)."""

    def __init__(
        self,
        publisher: BatchPublisher,
        max_batch: int = MAX_ATOMIC,
        max_in_flight: int = 4,
    ) -> None:
        """Callers publishing to several streams need a ``publisher`` with ``stream_of``."""
        self.publisher = publisher
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[tuple[BatchItem, asyncio.Future[js_api.PubAck]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> js_api.PubAck:
        """Like ``JetStreamContext.publish``: the PubAck once the message is stored. A
        ``timeout`` bounds the wait (the batch may still be stored: retry with its id)."""
        future: asyncio.Future[js_api.PubAck] = asyncio.get_running_loop().create_future()
        self._queue.append((BatchItem(subject, payload, headers or {}), future))
        self._start_flush()
        # Not shielded: a caller that gives up (timeout, cancel) cancels its future, so the
        # flush skips it rather than setting an answer nobody will read (an exception set on
        # an abandoned future is logged by asyncio as "never retrieved").
        async with asyncio.timeout(timeout):
            return await future

    def _start_flush(self) -> None:
        # started as a task: the publishes of this turn of the event loop join its batch
        if self._queue and len(self._flushers) < self.max_in_flight:
            task = asyncio.create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushers.discard(task)
        self._start_flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if not batch:
            return
        try:
            results = await self._publish([m for m, _ in batch])
        except BaseException as exc:  # cancelled at shutdown: nobody waits forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(nats.errors.Error(f"publish abandoned: {exc!r}"))
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _publish(self, msgs: list[BatchItem]) -> list[Result]:
        try:
            return await self.publisher.publish(msgs)
        except Exception as exc:
            return [exc] * len(msgs)
