"""The ``fazer`` dialect (fazer-ai baileys-api v3): its webhook payloads replayed (contract), its
client against the simulator speaking fazer, and create -> QR -> connected -> logout / delete
through the whole stack."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.baileys_sim.app import REGISTRY_KEY
from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from tests.stack import FAST_SIM, start_stack, wait_for
from zapbus.config import Settings
from zapbus.dialects import dialect_class
from zapbus.dialects.base import CreateSessionRequest
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.dialects.fazer import STALE_EPOCH, EpochGuard, FazerDelivery, FazerDialect
from zapbus.dialects.reports import PayloadError, QrReport, StatusReport, Unknown
from zapbus.signing import SignatureError
from zapbus.tokens import webhook_signing_key

PHONE = "+5511987654321"
QR = "2@" + "A" * 100 + ",bm9pc2U=,aWRlbnRpdHk=,YWR2"
KEY = "fazer-key"


def secret() -> str:
    """A verify token of its own per test (the epoch guard remembers per token)."""
    return webhook_signing_key("s", uuid.uuid4(), 1)


def body(token: str, data: Any, event: str = "connection.update") -> bytes:
    return msgspec.json.encode({"event": event, "data": data, "webhookVerifyToken": token})


def parse(token: str, data: Any, event: str = "connection.update") -> FazerDelivery:
    delivery = FazerDialect.parse_webhook(body(token, data, event), {}, token)
    assert isinstance(delivery, FazerDelivery)
    assert delivery.session is None and delivery.delivery_id is None
    return delivery


def closed(code: Any, message: str) -> dict[str, Any]:
    return {
        "connection": "close",
        "lastDisconnect": {
            "error": {
                "data": None,
                "isBoom": True,
                "output": {
                    "statusCode": code,
                    "payload": {"statusCode": code, "error": "x", "message": message},
                    "headers": {},
                },
            },
            "date": "2026-11-02T10:00:00.000Z",
        },
    }


# --- contract: every payload of the issue -------------------------------------------------------


def test_registered_as_fazer_without_code_login() -> None:
    assert dialect_class("fazer") is FazerDialect
    assert FazerDialect.code_login is False


def test_qr_is_a_qr_only() -> None:
    token = secret()
    data = {
        "qr": QR,
        "connection": "connecting",
        "qrDataUrl": "data:image/png;base64,AA",
        "epoch": 1,
    }
    delivery = parse(token, data)
    assert delivery.reports == [QrReport(qr=QR)]  # fazer's own "connecting" is dropped
    assert delivery.epoch == 1


@pytest.mark.parametrize("state", ["open", "connecting", "reconnecting"])
def test_connection_states(state: str) -> None:
    delivery = parse(secret(), {"connection": state, "epoch": 3})
    assert delivery.reports == [StatusReport(status=state)]


@pytest.mark.parametrize(
    ("code", "message"),
    [(401, "Intentional Logout"), (408, "QR refs attempts ended"), ("515.0", "restart")],
)
def test_close_carries_code_and_payload_message(code: Any, message: str) -> None:
    delivery = parse(secret(), {**closed(code, message), "epoch": 1})
    assert delivery.reports == [StatusReport(status="close", code=int(float(code)), reason=message)]


@pytest.mark.parametrize(
    ("error", "words"),
    [("reconnect_loop_detected", "gave up reconnecting"), ("wrong_phone_number", "not the number")],
)
def test_guard_reports(error: str, words: str) -> None:
    (report,) = parse(secret(), {"error": error, "epoch": 2}).reports
    assert isinstance(report, StatusReport)
    assert report.status == error and report.code is None
    assert report.reason is not None and words in report.reason and error in report.reason


def test_unknown_guard_and_unused_bodies_are_kept_as_ignored() -> None:
    token = secret()
    assert parse(token, {"error": "something_new"}).reports == [
        Unknown(name="connection.update:something_new")
    ]
    for data in ({"isNewLogin": True}, {"receivedPendingNotifications": True}, {}):
        assert parse(token, data).reports == [Unknown(name="connection.update")]
    assert parse(token, [{"key": {}}], event="messages.upsert").reports == [
        Unknown(name="messages.upsert")
    ]


def test_lower_epoch_than_seen_is_dropped() -> None:
    token = secret()
    assert parse(token, {"connection": "open", "epoch": 2}).reports == [StatusReport(status="open")]
    stale = parse(token, {"connection": "reconnecting", "epoch": 1})
    assert stale.reports == [Unknown(name=STALE_EPOCH)] and stale.epoch == 1
    # the same epoch again, and a higher one, are heard; another generation is its own
    assert parse(token, {"connection": "reconnecting", "epoch": 2}).reports[0] == StatusReport(
        status="reconnecting"
    )
    assert parse(secret(), {"connection": "open", "epoch": 1}).reports == [
        StatusReport(status="open")
    ]
    # no epoch (single-instance servers): never dropped
    assert parse(token, {"connection": "open"}).reports == [StatusReport(status="open")]


def test_epoch_guard_forgets_after_its_window() -> None:
    guard = EpochGuard(window_seconds=60.0, size=2)
    assert not guard.stale("a", 5, now=0.0)
    assert guard.stale("a", 4, now=59.0)
    assert not guard.stale("a", 1, now=61.0)  # a wiped lease store: heard again
    assert guard.stale("a", 0, now=62.0)
    assert not guard.stale("b", 1, now=62.0) and not guard.stale("c", 1, now=62.0)
    assert not guard.stale("a", 0, now=62.0)  # "a" was pushed out by the size bound


@pytest.mark.parametrize(
    "doc",
    [
        {"event": "connection.update", "data": {"connection": "open"}},
        {"event": "connection.update", "data": {"connection": "open"}, "webhookVerifyToken": 7},
        {"event": "connection.update", "data": {}, "webhookVerifyToken": "not-the-token"},
    ],
)
def test_token_must_match(doc: dict[str, Any]) -> None:
    with pytest.raises(SignatureError):
        FazerDialect.parse_webhook(msgspec.json.encode(doc), {}, secret())
    with pytest.raises(SignatureError):  # no secret: nothing matches
        FazerDialect.parse_webhook(body("", {"connection": "open"}), {}, "")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "body"),
        (b"[]", "body"),
        (None, "event"),
        ("data", "data"),
        ("epoch", "data.epoch"),
        ("qr", "data.qr"),
    ],
)
def test_malformed_bodies_name_the_field(raw: Any, field: str) -> None:
    token = secret()
    doc: dict[str, Any] = {"event": "connection.update", "webhookVerifyToken": token, "data": {}}
    match raw:
        case None:
            doc["event"] = ""
        case "data":
            doc["data"] = "open"
        case "epoch":
            doc["data"] = {"connection": "open", "epoch": -1}
        case "qr":
            doc["data"] = {"qr": "", "connection": "connecting"}
    encoded = raw if isinstance(raw, bytes) else msgspec.json.encode(doc)
    with pytest.raises(PayloadError) as info:
        FazerDialect.parse_webhook(encoded, {}, token)
    assert info.value.field == field


# --- the client against a capturing server and the simulator ----------------------------------


Serve = Callable[..., Awaitable[tuple[FazerDialect, TestServer]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """A FazerDialect pointed at a real server (given routes, or the fazer simulator)."""
    servers: list[TestServer] = []
    async with aiohttp.ClientSession() as http:

        async def start(
            app: web.Application, key: str = KEY, url: str | None = None
        ) -> tuple[FazerDialect, TestServer]:
            server = TestServer(app)
            await server.start_server()
            servers.append(server)
            return FazerDialect(http, url or str(server.make_url("/")), key, 5.0), server

        yield start
        for server in servers:
            await server.close()


def sim_app(**overrides: Any) -> web.Application:
    config = {"kind": "fazer", "api_key": KEY, "create_delay": (0.0, 0.01), **overrides}
    return create_sim(SimConfig(qr_first_seconds=60, qr_next_seconds=60, seed=3, **config))


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.Response(text="ok")

    def datas(self) -> list[dict[str, Any]]:
        return [b["data"] for b in self.bodies]


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[Receiver, str]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    server = await aiohttp_server(app)
    return recv, str(server.make_url("/hook"))


def req(name: str, url: str, token: str, phone: str | None = PHONE) -> CreateSessionRequest:
    return CreateSessionRequest(
        name=name, webhook_url=url, phone_number=phone, webhook_secret=token
    )


async def test_create_and_delete_requests_as_fazer_reads_them(serve: Serve) -> None:
    seen: list[tuple[str, str, str | None, Any]] = []

    async def capture(request: web.Request) -> web.Response:
        payload = await request.json() if request.can_read_body else None
        seen.append((request.method, request.raw_path, request.headers.get("x-api-key"), payload))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/connections/{phone}", capture)
    client, _ = await serve(app)
    token = secret()
    created = await client.create_session(req("zb_a_g1", "http://127.0.0.1:1/h", token))
    assert created.already_existed is False and created.pairing_code is None
    assert await client.delete_session("zb_a_g1") is True
    hook = {"webhookUrl": "http://127.0.0.1:1/h", "webhookVerifyToken": token}
    assert seen == [
        ("POST", "/connections/%2B5511987654321", KEY, hook),
        ("DELETE", "/connections/%2B5511987654321", KEY, None),
    ]


async def test_create_needs_a_phone_a_token_and_qr_login(serve: Serve) -> None:
    client, _ = await serve(web.Application())  # any request would be a 404 PermanentError
    for bad in (None, "", "+12", "+55 11 98765 4321", "+5511987654321000000"):
        with pytest.raises(PermanentError, match="phone number"):
            await client.create_session(req("zb_b_g1", "http://h/x", secret(), phone=bad))
    with pytest.raises(PermanentError, match="webhookVerifyToken"):
        await client.create_session(req("zb_b_g1", "http://h/x", ""))
    code = msgspec.structs.replace(req("zb_b_g1", "http://h/x", secret()), login="code")
    with pytest.raises(PermanentError, match="pairing code"):
        await client.create_session(code)


async def test_client_against_the_simulator(serve: Serve, receiver: tuple[Receiver, str]) -> None:
    recv, url = receiver
    app = sim_app()
    client, server = await serve(app)
    token = secret()
    assert await client.healthy() is True
    await client.create_session(req("zb_c_g1", url, token))
    registry = app[REGISTRY_KEY]
    assert list(registry.live) == [PHONE] and registry.live[PHONE].secret == token
    await wait_for("a QR", lambda: _async(any("qr" in d for d in recv.datas())), 5.0)
    assert all(
        b["webhookVerifyToken"] == token and b["event"] == "connection.update" for b in recv.bodies
    )
    reports = [r for b in recv.bodies for r in _reparse(b, token)]
    assert reports[0] == StatusReport(status="connecting")
    assert isinstance(reports[1], QrReport)

    # the phone scans: fazer hides the 515 restart as "reconnecting", then "open"
    async with client.http.post(server.make_url(f"/_sim/sessions/{quote(PHONE, safe='')}/scan")):
        pass
    await wait_for("open", lambda: _async({"connection": "open", "epoch": 1} in recv.datas()))
    assert [d.get("connection") for d in recv.datas()][-3:] == [
        "reconnecting",
        "reconnecting",
        "open",
    ]

    # a repeated create (same webhook) is answered again: same connection, same epoch
    await client.create_session(req("zb_c_g1", url, token))
    assert registry.created_count[PHONE] == 1
    assert await client.session_exists("zb_c_g1") is False

    # the phone logs out: a real close with its code and message
    async with client.http.post(server.make_url(f"/_sim/sessions/{quote(PHONE, safe='')}/logout")):
        pass
    await wait_for("401 close", lambda: _async(recv.datas()[-1].get("connection") == "close"))
    assert _reparse(recv.bodies[-1], token) == [
        StatusReport(status="close", code=401, reason="Stream Errored (conflict)")
    ]
    assert await client.delete_session("zb_c_g1") is False  # gone already: 404


async def test_delete_finds_the_phone_and_spares_a_newer_session(
    serve: Serve, receiver: tuple[Receiver, str]
) -> None:
    recv, url = receiver
    app = sim_app()
    client, server = await serve(app)
    registry = app[REGISTRY_KEY]
    with pytest.raises(PermanentError, match="pass phone_number"):
        await client.delete_session("zb_never_created_g1")

    await client.create_session(req("zb_d_g1", url, secret()))
    # a recreate with the same phone: fazer re-points the phone's connection (new epoch)
    token2 = secret()
    await client.create_session(req("zb_d_g2", url + "?g=2", token2))
    assert registry.live[PHONE].secret == token2
    await wait_for("epoch 2", lambda: _async(any(d.get("epoch") == 2 for d in recv.datas())))
    # deleting the old generation must not end the connection the new one now uses
    assert await client.delete_session("zb_d_g1") is False
    assert PHONE in registry.live
    assert await client.delete_session("zb_d_g2") is True
    assert PHONE not in registry.live

    # another worker process (no memory of the create) deletes by the phone it is given
    await client.create_session(req("zb_e_g1", url, secret()))
    other = FazerDialect(client.http, str(server.make_url("/")), KEY, 5.0)
    assert await other.delete_session("zb_e_g1", phone_number=PHONE) is True
    assert await other.delete_session("zb_e_g1", phone_number=PHONE) is False


async def test_only_a_later_generation_of_the_connection_spares_a_delete(
    serve: Serve, receiver: tuple[Receiver, str]
) -> None:
    """The client's memory of who claimed a phone last spares a delete only for a later
    generation of the same connection (a recreate); another connection's claim, which may
    have ended since, is the worker's to judge (it asks Postgres)."""
    _, url = receiver
    app = sim_app()
    client, _ = await serve(app)
    registry = app[REGISTRY_KEY]
    await client.create_session(req("zb_x_g1", url, secret()))
    await client.create_session(req("zb_y_g1", url + "?y", secret()))
    assert await client.delete_session("zb_x_g1") is True  # sent: y's claim is not x's
    assert registry.delete_requests[PHONE] == 1
    await client.create_session(req("zb_z_g1", url + "?z", secret()))
    assert await client.delete_session("zb_z_g2", phone_number=PHONE) is True  # g1 is older
    assert registry.delete_requests[PHONE] == 2


async def test_server_refusals(serve: Serve, receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    client, server = await serve(sim_app(), key="wrong")
    with pytest.raises(PermanentError) as info:
        await client.create_session(req("zb_f_g1", url, secret()))
    assert info.value.status == 401
    assert await client.healthy() is True  # GET /status asks no API key
    with pytest.raises(PermanentError, match="no route that reads or lists"):
        await client.list_sessions()
    with pytest.raises(PermanentError, match="no route that reads or lists"):
        await client.get_session("zb_f_g1")
    async with client.http.post(
        server.make_url("/connections/5511987654321"),  # no "+"
        json={"webhookUrl": url, "webhookVerifyToken": "abcdef"},
        headers={"x-api-key": KEY},
    ) as r:
        assert r.status == 422
    async with client.http.post(
        server.make_url(f"/connections/{quote(PHONE, safe='')}"),
        json={"webhookUrl": url, "webhookVerifyToken": "abc"},
        headers={"x-api-key": KEY},
    ) as r:
        assert r.status == 422
    down = FazerDialect(client.http, "http://127.0.0.1:9", KEY, 1.0)
    assert await down.healthy() is False
    with pytest.raises(RetryableError):
        await down.create_session(req("zb_f_g1", url, secret()))


def _reparse(doc: dict[str, Any], token: str) -> list[Any]:
    return list(FazerDialect.parse_webhook(msgspec.json.encode(doc), {}, token).reports)


async def _async(value: Any) -> Any:
    return value


# --- end to end through the stack ---------------------------------------------------------------


async def test_end_to_end_create_qr_connected_logout_and_delete(settings: Settings) -> None:
    sim = msgspec.structs.replace(FAST_SIM, kind="fazer")
    async with start_stack(settings, sim, baileys_kind="fazer") as stack:
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections",
            json={"name": "sales", "phone_number": PHONE},
            headers=stack.auth(),
        ) as r:
            assert r.status == 202, await r.text()
            created = await r.json()
        ready = await stack.wait_status(created["id"], "qr_ready")
        assert ready["qr"].startswith("2@")
        phone_path = quote(PHONE, safe="")
        await stack.sim("POST", f"/_sim/sessions/{phone_path}/scan")
        await stack.wait_status(created["id"], "connected")

        # a delivery whose token is not this generation's is refused (401), nothing stored
        cid, generation = uuid.UUID(created["id"]), created["generation"]
        live = stack.apps["sim"][REGISTRY_KEY].live[PHONE]
        hook = live.webhook_url
        assert live.secret == webhook_signing_key(stack.settings.webhook_secret, cid, generation)
        async with stack.http.post(hook, data=body("wrong-token", {"connection": "close"})) as r:
            assert r.status == 401

        await stack.sim("POST", f"/_sim/sessions/{phone_path}/logout")
        out = await stack.wait_status(created["id"], "logged_out")
        assert out["status_reason"] and "Stream Errored" in out["status_reason"]

        # a second connection on another phone, deleted while it shows its QR
        other = "+5521912345678"
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections",
            json={"name": "support", "phone_number": other},
            headers=stack.auth(),
        ) as r:
            second = await r.json()
        await stack.wait_status(second["id"], "qr_ready")
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{second['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202
        registry = stack.apps["sim"][REGISTRY_KEY]
        await wait_for("the fazer connection deleted", lambda: _async(other not in registry.live))

        async with stack.http.get(
            f"{stack.gateway_url}/v1/connections/{created['id']}/history", headers=stack.auth()
        ) as r:
            history = (await r.json())["items"]
        applied = [h["to_status"] for h in history if h["applied"]]
        assert applied[-3:] == ["reconnecting", "connected", "logged_out"], applied
        assert "qr_ready" in applied


# --- issue 19: what the real fazer does (a give-up, one connection per phone, deletes) ------


async def _create(stack: Any, phone: str | None, name: str = "sales", **kw: Any) -> Any:
    body: dict[str, Any] = {"name": name}
    if phone is not None:
        body["phone_number"] = phone
    async with stack.http.post(
        f"{stack.gateway_url}/v1/connections", json=body, headers={**stack.auth(), **kw}
    ) as r:
        return r.status, await r.json(content_type=None)


async def _delete(stack: Any, connection_id: str) -> None:
    async with stack.http.delete(
        f"{stack.gateway_url}/v1/connections/{connection_id}", headers=stack.auth()
    ) as r:
        assert r.status == 202, await r.text()


def test_only_the_fazer_simulator_gives_up_on_an_unreachable_whatsapp() -> None:
    assert SimConfig(kind="fazer", whatsapp_unreachable=True).whatsapp_unreachable
    with pytest.raises(ValueError, match="whatsapp_unreachable"):
        SimConfig(kind="seed", whatsapp_unreachable=True)


async def test_a_give_up_before_any_qr_fails_as_whatsapp_unreachable(settings: Settings) -> None:
    """fazer cannot reach WhatsApp: ten codeless "reconnecting", then reconnect_loop_detected.
    No QR was shown and no 440 seen: failed / whatsapp_unreachable with fazer's words, not a
    conflict loop."""
    sim = msgspec.structs.replace(FAST_SIM, kind="fazer", whatsapp_unreachable=True)
    async with start_stack(settings, sim, baileys_kind="fazer") as stack:
        status, created = await _create(stack, PHONE)
        assert status == 202, created
        ended = await stack.wait_status(created["id"], "failed", timeout=30)
        assert ended["reason_code"] == "whatsapp_unreachable", ended
        assert "reconnect_loop_detected" in ended["status_reason"], ended
        assert ended["qr"] is None and ended["qr_seq"] == 0
        registry = stack.apps["sim"][REGISTRY_KEY]
        assert PHONE not in registry.live  # fazer dropped it: a DELETE now answers 404


async def test_one_live_connection_per_phone(settings: Settings) -> None:
    """fazer holds one connection per phone: a second live connection of the tenant for the
    phone is 409 phone-in-use and nothing reaches the server; a create without a phone is
    422 at the gateway; two creates in parallel for one phone never both pass."""
    sim = msgspec.structs.replace(FAST_SIM, kind="fazer")
    async with start_stack(settings, sim, baileys_kind="fazer") as stack:
        registry = stack.apps["sim"][REGISTRY_KEY]
        status, problem = await _create(stack, None)
        assert status == 422, problem
        assert problem["type"].endswith("/invalid-body") and problem["field"] == "phone_number"

        status, first = await _create(stack, PHONE, **{"Idempotency-Key": "first"})
        assert status == 202, first
        await stack.wait_status(first["id"], "qr_ready")
        status, problem = await _create(stack, PHONE, name="again")
        assert status == 409, problem
        assert problem["type"].endswith("phone-in-use"), problem
        assert problem["connection_id"] == first["id"]
        # the same create again (its Idempotency-Key) is that connection, not a conflict
        status, same = await _create(stack, PHONE, **{"Idempotency-Key": "first"})
        assert (status, same["id"]) == (202, first["id"])

        # another phone: its own connection; then a recreate onto the taken phone is 409
        other = "+5521912345678"
        status, second = await _create(stack, other, name="support")
        assert status == 202, second
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections/{second['id']}/recreate",
            json={"phone_number": PHONE},
            headers=stack.auth(),
        ) as r:
            assert r.status == 409, await r.text()
            assert (await r.json())["type"].endswith("phone-in-use")

        # race: two creates at once for a fresh phone, five times over
        for n in range(5):
            phone = f"+55119000000{n:02d}"
            answers = await asyncio.gather(
                _create(stack, phone, name=f"a{n}"), _create(stack, phone, name=f"b{n}")
            )
            assert sorted(status for status, _ in answers) == [202, 409], answers

        await stack.wait_status(second["id"], "qr_ready")
        assert registry.created_count[PHONE] == 1  # the refused creates sent nothing
        # once the first is deleted, the phone is free again
        await _delete(stack, first["id"])
        await stack.wait_status(first["id"], "deleted")
        status, third = await _create(stack, PHONE, name="third")
        assert status == 202, third
        await stack.wait_status(third["id"], "qr_ready")
        assert registry.created_count[PHONE] == 2


async def test_delete_of_a_logged_out_connection_reaches_the_server(settings: Settings) -> None:
    """The user's delete sends fazer's DELETE whatever the row's state: here a logged-out
    connection whose phone a later connection (logged out too) used since; its 404 is
    success. A phone another connection uses live is left alone."""
    sim = msgspec.structs.replace(FAST_SIM, kind="fazer")
    async with start_stack(settings, sim, baileys_kind="fazer") as stack:
        registry = stack.apps["sim"][REGISTRY_KEY]
        phone_path = quote(PHONE, safe="")
        ids = []
        for name in ("old", "new"):
            status, created = await _create(stack, PHONE, name=name)
            assert status == 202, created
            ids.append(created["id"])
            await stack.wait_status(created["id"], "qr_ready")
            await stack.sim("POST", f"/_sim/sessions/{phone_path}/logout")
            await stack.wait_status(created["id"], "logged_out")
        assert registry.delete_requests[PHONE] == 0

        await _delete(stack, ids[0])
        await wait_for(
            "fazer's DELETE of the logged-out phone",
            lambda: _async(registry.delete_requests[PHONE] == 1),
            30.0,
        )

        # a live connection on the phone: deleting the logged-out one must not end it
        status, live = await _create(stack, PHONE, name="live")
        assert status == 202, live
        await stack.wait_status(live["id"], "qr_ready")
        await _delete(stack, ids[1])
        await wait_for("the delete handled", lambda: _handled(stack, ids[1]), 30.0)
        assert registry.delete_requests[PHONE] == 1 and PHONE in registry.live
        await _delete(stack, live["id"])
        await wait_for(
            "the live one's DELETE", lambda: _async(registry.delete_requests[PHONE] == 2), 30.0
        )
        assert PHONE not in registry.live


async def _handled(stack: Any, connection_id: str) -> bool:
    """The worker is done with the connection's delete (no tracked delete left)."""
    left = await stack.pool.fetchval(
        "SELECT count(*) FROM session_deletes WHERE connection_id = $1", uuid.UUID(connection_id)
    )
    return bool(left == 0)
