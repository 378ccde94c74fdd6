"""The Baileys client against tiny real aiohttp servers, one per test, each serving one shape."""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from zapbus.dialects.base import CreateSessionRequest, ServerSession, SessionList
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.dialects.seed import SeedDialect as BaileysClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[list[web.RouteDef]], Awaitable[BaileysClient]]
REQ = CreateSessionRequest(name="zb_1_g1", webhook_url="http://127.0.0.1:1/hook")


def answer(body: Any, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a real server with the given routes on a free port; a client pointed at it."""
    servers: list[TestServer] = []
    async with aiohttp.ClientSession() as http:

        async def start(routes: list[web.RouteDef]) -> BaileysClient:
            app = web.Application()
            app.add_routes(routes)
            server = TestServer(app)
            await server.start_server()
            servers.append(server)
            return BaileysClient(http, str(server.make_url("/")), "secret-key", 5.0)

        yield start
    for server in servers:
        await server.close()


async def test_create_2xx_with_success_false_is_a_retryable_failure(serve: Serve) -> None:
    client = await serve(
        [web.post("/sessions", answer({"success": False, "error": "engine busy"}, 200))]
    )
    with pytest.raises(RetryableError) as info:
        await client.create_session(REQ)
    assert "engine busy" in info.value.reason
    assert info.value.status == 200


async def test_create_2xx_with_success_false_and_bad_key_text_is_permanent(serve: Serve) -> None:
    client = await serve(
        [web.post("/sessions", answer({"success": False, "message": "Invalid API key"}, 201))]
    )
    with pytest.raises(PermanentError, match="Invalid API key"):
        await client.create_session(REQ)


async def test_create_2xx_with_success_false_already_exists_counts_as_existing(
    serve: Serve,
) -> None:
    client = await serve(
        [web.post("/sessions", answer({"success": False, "error": "Session already exists"}))]
    )
    result = await client.create_session(REQ)
    assert result.already_existed


async def test_create_success_true_is_created(serve: Serve) -> None:
    client = await serve([web.post("/sessions", answer({"success": True, "data": {}}, 201))])
    assert not (await client.create_session(REQ)).already_existed


async def test_redirects_are_not_followed_with_the_api_key(serve: Serve) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-API-Key"))
        return web.json_response({"success": True}, status=201)

    other = await serve([web.post("/sessions", elsewhere), web.get("/sessions/{name}", elsewhere)])

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(other.base_url + request.path)

    client = await serve([web.post("/sessions", redirect), web.get("/sessions/{name}", redirect)])
    with pytest.raises(PermanentError, match="redirect") as info:
        await client.create_session(REQ)
    assert info.value.status == 307
    assert other.base_url in info.value.reason
    with pytest.raises(PermanentError, match="redirect"):
        await client.session_exists("zb_1_g1")
    assert seen == [], "the API key was sent to the redirect target"


async def test_server_text_in_a_reason_is_bounded_and_has_no_control_characters(
    serve: Serve,
) -> None:
    noisy = "bad\x1b[31m thing\r\n\x00\u202e happened\t" * 200
    client = await serve([web.post("/sessions", answer(noisy, 500))])
    with pytest.raises(RetryableError) as info:
        await client.create_session(REQ)
    reason = info.value.reason
    assert len(reason) <= 300
    assert reason.startswith("baileys answered 500: bad[31m thing happened bad")
    assert not [c for c in reason if unicodedata.category(c) in ("Cc", "Cf")], reason


async def test_a_json_error_field_is_preferred_over_the_raw_body(serve: Serve) -> None:
    body = {"error": "name\ninvalid", "stack": "x" * 5000}
    client = await serve([web.post("/sessions", answer(body, 400))])
    with pytest.raises(PermanentError) as info:
        await client.create_session(REQ)
    assert info.value.reason == "baileys answered 400: name invalid"


ITEMS: list[Any] = [
    {"name": "a", "status": "open"},
    {"id": "b", "state": "connecting"},
    {"session": "c", "connection": "close"},
    "d",
    {"name": "e", "status": {"nested": 1}, "state": "qr"},  # a non-string state is ignored
    {"id": "f", "status": 3},
    {"status": "open"},  # no name: skipped
    42,  # skipped
    None,  # skipped
    {"name": 7},  # skipped
    "",  # skipped
]
EXPECTED = [
    ServerSession("a", "open"),
    ServerSession("b", "connecting"),
    ServerSession("c", "close"),
    ServerSession("d", None),
    ServerSession("e", "qr"),
    ServerSession("f", None),
]


@pytest.mark.parametrize(
    "body",
    [
        ITEMS,
        {"data": ITEMS},
        {"sessions": ITEMS},
        {"success": True, "data": ITEMS},
        {"success": True, "data": {"sessions": ITEMS}},
    ],
    ids=["list", "data", "sessions", "success-data", "data-sessions"],
)
async def test_list_sessions_reads_every_shape(serve: Serve, body: Any) -> None:
    client = await serve([web.get("/sessions", answer(body))])
    listed = await client.list_sessions()
    assert listed == EXPECTED
    # the five items that could not be read make the list incomplete (issue 19 #12)
    assert isinstance(listed, SessionList) and listed.unreadable == 5 and not listed.complete


async def test_list_sessions_is_none_without_a_list_route(serve: Serve) -> None:
    no_route = await serve([web.get("/health", answer("ok"))])
    assert await no_route.list_sessions() is None  # 404
    post_only = await serve([web.post("/sessions", answer({}, 201))])
    assert await post_only.list_sessions() is None  # 405


@pytest.mark.parametrize(
    "body",
    [{"foo": []}, {"data": "x"}, "not json", {"success": False, "error": "later"}, 5],
)
async def test_list_sessions_of_an_unknown_shape_is_retryable(serve: Serve, body: Any) -> None:
    client = await serve([web.get("/sessions", answer(body))])
    with pytest.raises(RetryableError):
        await client.list_sessions()


@pytest.mark.parametrize(
    ("body", "state"),
    [
        ({"success": True, "data": {"name": "s1", "status": "open"}}, "open"),
        ({"id": "s1", "state": "connecting"}, "connecting"),
        ({"connection": "close"}, "close"),
        ({"status": 1}, None),
        ("exists", None),
    ],
)
async def test_get_session_reads_its_state(serve: Serve, body: Any, state: str | None) -> None:
    client = await serve([web.get("/sessions/s1", answer(body))])
    assert await client.get_session("s1") == ServerSession("s1", state)
    assert await client.session_exists("s1")


async def test_get_session_of_an_unknown_name_is_none(serve: Serve) -> None:
    client = await serve(
        [web.get("/sessions/gone", answer({"success": False, "error": "Session not found"}))]
    )
    assert await client.get_session("missing") is None  # 404
    assert await client.get_session("gone") is None  # 200 + success false "not found"
    assert not await client.session_exists("missing")


async def test_get_session_2xx_with_success_false_is_a_failure(serve: Serve) -> None:
    client = await serve([web.get("/sessions/s1", answer({"success": False, "error": "busy"}))])
    with pytest.raises(RetryableError, match="busy"):
        await client.session_exists("s1")


async def test_against_the_simulator(serve: Serve) -> None:
    sim = create_sim(SimConfig(api_key="secret-key", create_delay=(0.0, 0.0), seed=1))
    client = await serve([])
    server = TestServer(sim)
    await server.start_server()
    try:
        client.base_url = str(server.make_url("")).rstrip("/")
        assert await client.list_sessions() == []
        assert not (await client.create_session(REQ)).already_existed
        assert (await client.create_session(REQ)).already_existed
        listed = await client.list_sessions()
        assert listed is not None and [s.name for s in listed] == [REQ.name]
        found = await client.get_session(REQ.name)
        assert found is not None and found.name == REQ.name and found.state
        assert await client.delete_session(REQ.name)
        assert await client.get_session(REQ.name) is None
        assert not await client.delete_session(REQ.name)
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("body", "figure"),
    [
        ('{"status": "ok", "sessions": 12}', 12),
        ('{"data": {"sessions": [1, 2, 3]}}', 3),
        ('{"sessions": 99999999999}', None),  # no server's: would not fit the int4 column
        ('{"sessions": Infinity}', None),
        ('{"sessions": NaN}', None),
        ('{"sessions": -1}', None),
        ('{"sessions": true}', None),
        ('{"status": "ok"}', None),
    ],
)
async def test_the_health_figure_is_a_count_or_unknown(
    serve: Serve, body: str, figure: int | None
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    client = await serve([web.get("/health", handler)])
    health = await client.health()
    assert health.up and health.sessions == figure
