"""Riding out leader elections (zapbus/jsretry.py, zapbus/consumer.py): what is retried, with
which message id, for how long; and a fetch that fails for an election or with a plain
asyncio.TimeoutError is an empty fetch, not a crash. (tests/test_cluster.py kills a real
leader.)"""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import pytest
from nats.js import api as js_api
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from zapbus import bus, jsretry
from zapbus.consumer import DurableConsumer


@pytest.mark.parametrize(
    "exc",
    [
        nats.errors.TimeoutError(),
        TimeoutError(),  # asyncio.TimeoutError (the same class on 3.11)
        NoStreamResponseError(),
        nats.errors.NoRespondersError(),
        nats.errors.ConnectionReconnectingError(),
        ServiceUnavailableError(),  # a 503 status: nats-py sets no code
        APIError(code=503, err_code=10008, description="JetStream system temporarily unavailable"),
        BadRequestError(code=400, err_code=10005, description="no suitable peers for placement"),
    ],
)
def test_election_errors_are_transient(exc: Exception) -> None:
    assert jsretry.is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        NotFoundError(code=404, err_code=10059, description="stream not found"),
        BadRequestError(code=400, err_code=10058, description="stream name already in use"),
        nats.errors.ConnectionClosedError(),
        ValueError("bug"),
    ],
)
def test_other_errors_are_not(exc: Exception) -> None:
    assert not jsretry.is_transient(exc)


async def test_retrying_rides_out_an_election_and_stops_at_the_deadline() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise NoStreamResponseError
        return "ok"

    assert await jsretry.retrying(flaky, "flaky") == "ok"
    assert calls == 4

    async def gone() -> None:
        raise NotFoundError(code=404, description="stream not found")

    with pytest.raises(NotFoundError):  # not retried
        await jsretry.retrying(gone, "gone")

    async def down() -> None:
        raise nats.errors.TimeoutError

    t0 = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await jsretry.retrying(down, "down", deadline=0.5)
    assert time.monotonic() - t0 < 1.5


class _FakeJS:
    """A publish that times out twice (the first copy was stored by the old leader), then
    answers duplicate, as JetStream's duplicate window does for the same Nats-Msg-Id."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def publish(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> js_api.PubAck:
        self.ids.append(headers["Nats-Msg-Id"])
        headers["mutated-by-client"] = "1"  # nats-py adds to the headers it is given
        if len(self.ids) < 3:
            raise nats.errors.TimeoutError
        return js_api.PubAck(stream="S", seq=1, duplicate=len(self.ids) > 1)


async def test_a_timed_out_publish_is_retried_with_the_same_id() -> None:
    js: Any = _FakeJS()
    ack = await jsretry.publish(js, "s", b"x", headers={"Nats-Msg-Id": "cmd-1"})
    assert js.ids == ["cmd-1"] * 3
    assert ack.duplicate
    with pytest.raises(ValueError):  # without an id a retry could store twice
        await jsretry.publish(js, "s", b"x", headers={})


class _FakeSub:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),  # asyncio.TimeoutError: what nats-py raises near its deadline
        nats.errors.TimeoutError(),
        ServiceUnavailableError(),  # the consumer has no leader: its pull is answered 503
        nats.errors.NoRespondersError(),
    ],
)
async def test_a_fetch_failing_for_an_election_is_an_empty_fetch(exc: Exception) -> None:
    consumer = DurableConsumer(
        js=None,  # type: ignore[arg-type]
        stream="S",
        config=js_api.ConsumerConfig(durable_name="d"),
    )
    consumer._psub = _FakeSub(exc)  # type: ignore[assignment]
    assert await consumer.fetch(batch=10, timeout=0.05) == []


async def test_a_fetch_failing_otherwise_raises() -> None:
    consumer = DurableConsumer(
        js=None,  # type: ignore[arg-type]
        stream="S",
        config=js_api.ConsumerConfig(durable_name="d"),
    )
    consumer._psub = _FakeSub(NotFoundError(code=404, description="consumer not found"))  # type: ignore[assignment]
    with pytest.raises(NotFoundError):
        await consumer.fetch(batch=10, timeout=0.05)


def test_the_nats_url_may_list_a_cluster() -> None:
    assert bus.server_urls("nats://a:4222") == ["nats://a:4222"]
    assert bus.server_urls(" nats://a:4222, nats://b:4222 ,nats://c:4222,") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
