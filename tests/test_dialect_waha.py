"""The ``waha`` dialect (WAHA 2025-2026): its webhooks replayed from WAHA's documented payloads,
its client against the simulator speaking waha, and the whole stack on a simulated WAHA."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proto.states import Status
from services.baileys_sim.app import REGISTRY_KEY
from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from services.baileys_sim.sessions import SessionRegistry
from tests.stack import FAST_SIM, serve, start_stack, wait_for
from zapbus import bus, dlq
from zapbus.config import Settings
from zapbus.connection.vocabulary import state_for_report
from zapbus.dialects import dialect_class
from zapbus.dialects.base import CreateSessionRequest, ServerSession
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.dialects.removal import delete_or_gone
from zapbus.dialects.reports import (
    Delivery,
    PayloadError,
    QrToFetch,
    Report,
    StatusReport,
    Unknown,
)
from zapbus.dialects.waha import WahaDialect
from zapbus.signing import SignatureError
from zapbus.tokens import session_name, webhook_signing_key, webhook_url
from zapbus.tools.localinfra import free_port

KEY = "hmac-key-of-this-generation"
QR = "2@" + "A" * 100 + ",noise=,identity=,adv="


def signed(doc: dict[str, Any], key: str = KEY) -> tuple[bytes, dict[str, str]]:
    body = msgspec.json.encode(doc)
    mac = hmac.new(key.encode(), body, hashlib.sha512).hexdigest()
    return body, {"X-Webhook-Hmac": mac, "X-Webhook-Hmac-Algorithm": "sha512"}


def parse(doc: dict[str, Any]) -> Delivery:
    body, headers = signed(doc)
    return WahaDialect.parse_webhook(body, headers, KEY)


def envelope(payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """WAHA's envelope around a ``session.status`` payload (the issue's fields, in order)."""
    return {
        "id": "evt_01aaaaaaaaaaaaaaaaaaaaaaaa",
        "timestamp": 1634567890123,
        "event": "session.status",
        "session": "default",
        "me": None,
        "payload": payload,
        **extra,
    }


def history(*statuses: str) -> list[dict[str, Any]]:
    return [{"status": s, "timestamp": 1700000001000 + i * 1000} for i, s in enumerate(statuses)]


def only(delivery: Delivery) -> Report:
    assert len(delivery.reports) == 1, delivery.reports
    return delivery.reports[0]


def state_of(report: Report) -> Status | None:
    """What today's state machine makes of a status report."""
    assert isinstance(report, StatusReport), report
    return state_for_report(report.status, report.code, report.reason)


# --- contract: WAHA's documented webhooks ------------------------------------------------------


def test_the_registry_names_waha() -> None:
    assert dialect_class("waha") is WahaDialect


def test_scan_qr_code_asks_for_the_qr_and_dedupes_on_the_body_id() -> None:
    delivery = parse(envelope({"name": "default", "status": "SCAN_QR_CODE"}))
    assert delivery.session == "default"
    assert delivery.delivery_id == "evt_01aaaaaaaaaaaaaaaaaaaaaaaa"
    assert delivery.reports == [QrToFetch()]


def test_docs_session_status_example_with_statuses_is_connected_with_me() -> None:
    # waha-docs, how-to/sessions "session.status" (WEBJS, statuses oldest first)
    doc = {
        "event": "session.status",
        "session": "default",
        "me": {"id": "7911111@c.us", "pushName": "~"},
        "payload": {
            "status": "WORKING",
            "statuses": history("STOPPED", "STARTING", "WORKING"),
        },
        "engine": "WEBJS",
        "environment": {"version": "2023.10.12", "engine": "WEBJS", "tier": "CORE"},
    }
    delivery = parse(doc)
    assert delivery.delivery_id is None  # no id: nothing to de-duplicate by
    report = only(delivery)
    assert report == StatusReport(
        status="connected", reason="WAHA WORKING as 7911111@c.us", account_name="~"
    )  # 7 digits: not a phone number anyone could dial, so no account_phone
    assert state_of(report) == Status.CONNECTED


def test_issue_envelope_with_me_once_linked() -> None:
    doc = envelope(
        {"name": "default", "status": "WORKING"},
        me={"id": "5511999990000@c.us", "pushName": "Sales"},
        metadata={"user.id": "123"},
        engine="NOWEB",
    )
    report = only(parse(doc))
    assert isinstance(report, StatusReport) and report.status == "connected"
    assert report.reason is not None and "5511999990000@c.us" in report.reason


def test_starting_is_connecting_and_after_working_reconnecting() -> None:
    first = only(parse(envelope({"name": "default", "status": "STARTING"})))
    assert isinstance(first, StatusReport) and first.status == "connecting"
    assert state_of(first) == Status.AWAITING_QR
    again = only(
        parse(envelope({"status": "STARTING", "statuses": history("WORKING", "STARTING")}))
    )
    assert isinstance(again, StatusReport) and again.status == "reconnecting"
    assert state_of(again) == Status.RECONNECTING


def test_failed_after_qr_codes_offered_is_qr_expired() -> None:
    statuses = history("STARTING", *["SCAN_QR_CODE"] * 6, "FAILED")
    report = only(parse(envelope({"name": "default", "status": "FAILED", "statuses": statuses})))
    assert isinstance(report, StatusReport) and report.code == 408
    assert report.reason is not None and "after SCAN_QR_CODE" in report.reason
    assert state_of(report) == Status.QR_EXPIRED


def test_failed_after_working_is_logged_out() -> None:
    statuses = history("STARTING", "SCAN_QR_CODE", "WORKING", "FAILED")
    report = only(parse(envelope({"status": "FAILED", "statuses": statuses})))
    assert isinstance(report, StatusReport) and report.status == "logged_out"
    assert state_of(report) == Status.LOGGED_OUT


def test_statuses_are_read_by_timestamp_not_by_position() -> None:
    statuses = [
        {"status": "FAILED", "timestamp": 4},
        {"status": "WORKING", "timestamp": 3},
        {"status": "SCAN_QR_CODE", "timestamp": 2},
    ]
    report = only(parse(envelope({"status": "FAILED", "statuses": statuses})))
    assert isinstance(report, StatusReport) and report.status == "logged_out"


def test_failed_without_history_is_failed_with_a_reason() -> None:
    report = only(parse(envelope({"name": "default", "status": "FAILED"})))
    assert isinstance(report, StatusReport)
    assert report.status == "failed" and report.code is None
    assert report.reason is not None and "no status history" in report.reason


def test_passkey_statuses_say_what_zapbus_cannot_do() -> None:
    # waha-docs, how-to/sessions "Passkey" (GOWS)
    challenge = {
        "challenge": "9WVUYm9AsQ...",
        "timeout": 60000,
        "rpId": "web.whatsapp.com",
        "allowCredentials": [
            {"id": "AX8bTgH2...", "type": "public-key", "transports": ["internal", "hybrid"]}
        ],
        "userVerification": "required",
    }
    required = only(
        parse(
            {
                "event": "session.status",
                "session": "default",
                "payload": {"name": "default", "status": "PASSKEY_REQUIRED", "data": challenge},
            }
        )
    )
    assert isinstance(required, StatusReport) and required.status == "passkey_required"
    assert required.reason is not None and "passkey" in required.reason
    confirm = only(
        parse(
            {
                "event": "session.status",
                "session": "default",
                "payload": {
                    "name": "default",
                    "status": "PASSKEY_CONFIRMATION_REQUIRED",
                    "data": {"code": "1234"},
                },
            }
        )
    )
    assert isinstance(confirm, StatusReport)
    assert confirm.status == "passkey_confirmation_required"
    assert confirm.reason is not None and "zapbus cannot" in confirm.reason


def test_stopped_is_reported_as_stopped() -> None:
    doc = envelope(
        {"name": "default", "status": "STOPPED"},
        me={"id": "11111111111@c.us", "lid": "123123@lid", "pushName": "Wawp Instance"},
        engine="WEBJS",
    )
    report = only(parse(doc))
    assert isinstance(report, StatusReport) and report.status == "stopped"
    assert report.reason is not None and "STOPPED" in report.reason


def test_other_events_and_unknown_statuses_are_kept_as_ignored() -> None:
    engine_event = {
        "id": "evt_11111111111111111111111111",
        "session": "default",
        "event": "engine.event",
        "payload": {"session": "default", "event": "x", "data": {"field": "value"}},
        "timestamp": 1742102571277,
        "metadata": {},
        "me": {"": None},
        "environment": {"": None},
    }
    assert only(parse(engine_event)) == Unknown(name="engine.event")
    newer = only(parse(envelope({"status": "SOMETHING_NEW"})))
    assert newer == Unknown(name="session.status SOMETHING_NEW")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (None, "payload"),
        ([], "payload"),
        ({"name": "x"}, "payload.status"),
        ({"status": 3}, "payload.status"),
    ],
)
def test_malformed_status_payloads_name_the_field(payload: Any, field: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse(envelope(payload))
    assert info.value.field == field


def test_signed_non_json_is_a_payload_error() -> None:
    body = b"not json"
    mac = hmac.new(KEY.encode(), body, hashlib.sha512).hexdigest()
    with pytest.raises(PayloadError):
        WahaDialect.parse_webhook(body, {"X-Webhook-Hmac": mac}, KEY)


# --- contract: X-Webhook-Hmac --------------------------------------------------------------


def test_hmac_is_checked_case_insensitively_and_in_any_hex_case() -> None:
    body, headers = signed(envelope({"status": "WORKING"}))
    lower = {"x-webhook-hmac": headers["X-Webhook-Hmac"].upper()}
    assert WahaDialect.parse_webhook(body, lower, KEY).reports


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Webhook-Hmac": ""},
        {"X-Webhook-Hmac": "00" * 64},
        {"X-Webhook-Hmac": "not hex at all é"},
    ],
)
def test_missing_or_wrong_hmac_is_a_signature_error(headers: dict[str, str]) -> None:
    body, _ = signed(envelope({"status": "WORKING"}))
    with pytest.raises(SignatureError):
        WahaDialect.parse_webhook(body, headers, KEY)


def test_hmac_of_another_key_or_another_body_is_refused() -> None:
    body, headers = signed(envelope({"status": "WORKING"}), key="another generation")
    with pytest.raises(SignatureError, match="does not match"):
        WahaDialect.parse_webhook(body, headers, KEY)
    body, headers = signed(envelope({"status": "WORKING"}))
    with pytest.raises(SignatureError):
        WahaDialect.parse_webhook(body.replace(b"WORKING", b"FAILED!"), headers, KEY)


def test_hmac_with_another_algorithm_or_no_key_is_refused() -> None:
    body, headers = signed(envelope({"status": "WORKING"}))
    with pytest.raises(SignatureError, match="sha512"):
        WahaDialect.parse_webhook(body, {**headers, "X-Webhook-Hmac-Algorithm": "sha256"}, KEY)
    with pytest.raises(SignatureError):
        WahaDialect.parse_webhook(body, headers, "")


def test_the_hmac_is_checked_before_the_body_is_read() -> None:
    with pytest.raises(SignatureError):
        WahaDialect.parse_webhook(b"not json", {}, KEY)


# --- the client against the simulator speaking waha -----------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((await request.read(), dict(request.headers)))
        return web.Response(text="ok")

    def reports(self, key: str) -> list[Report]:
        return [r for body, h in self.got for r in WahaDialect.parse_webhook(body, h, key).reports]


class Sim:
    def __init__(self, client: WahaDialect, registry: SessionRegistry, receiver: Receiver):
        self.client = client
        self.registry = registry
        self.receiver = receiver

    def request(self, name: str, secret: str = KEY) -> CreateSessionRequest:
        return CreateSessionRequest(name=name, webhook_url=self.receiver.url, webhook_secret=secret)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    receiver = Receiver()
    hook_app = web.Application()
    hook_app.router.add_post("/hook", receiver.handle)
    hooks = TestServer(hook_app)
    await hooks.start_server()
    receiver.url = str(hooks.make_url("/hook"))
    config = SimConfig(
        kind="waha", api_key="waha-key", create_delay=(0.01, 0.02), qr_first_seconds=60, seed=3
    )
    app = create_sim(config)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            client = WahaDialect(http, str(server.make_url("/")), "waha-key", 5.0)
            yield Sim(client, app[REGISTRY_KEY], receiver)
    finally:
        await server.close()
        await hooks.close()


async def until(what: str, probe: Callable[[], bool]) -> None:
    await wait_for(what, lambda: asyncio.sleep(0, probe()), timeout=30.0)


async def test_client_create_get_list_qr_code_delete(sim: Sim) -> None:
    client, registry = sim.client, sim.registry
    assert await client.healthy()
    created = await client.create_session(sim.request("w1"))
    assert not created.already_existed and created.pairing_code is None
    again = await client.create_session(sim.request("w1"))
    assert again.already_existed  # 422 "Session 'w1' already exists. Use PUT to update it."

    assert await client.get_session("w1") == ServerSession("w1", "SCAN_QR_CODE")
    assert await client.get_session("nope") is None
    assert await client.list_sessions() == [ServerSession("w1", "SCAN_QR_CODE")]

    qr = await client.fetch_qr("w1")
    assert qr is not None and qr == registry.live["w1"].qr and qr.startswith("2@")
    code = await client.request_pairing_code("w1", "+5511999990000")
    assert len(code) == 9 and code[4] == "-"  # WAHA's "ABCD-ABCD"
    assert registry.live["w1"].phone_number == "5511999990000"  # digits, no "+"

    assert registry.scan("w1") == "ok"
    assert await client.fetch_qr("w1") is None  # 422: no longer showing a QR
    with pytest.raises(RetryableError, match="422"):
        await client.request_pairing_code("w1", "+5511999990000")

    assert await client.delete_session("w1")
    assert await client.get_session("w1") is None
    assert await client.fetch_qr("w1") is None  # 404
    assert await client.delete_session("w1")  # WAHA's delete is idempotent


async def test_client_sends_the_hmac_key_and_the_sim_signs_with_it(sim: Sim) -> None:
    await sim.client.create_session(sim.request("w2", secret="k2"))
    assert sim.registry.live["w2"].secret == "k2"
    await until("STARTING and the first SCAN_QR_CODE", lambda: len(sim.receiver.got) >= 2)
    body, headers = sim.receiver.got[0]
    assert headers["X-Webhook-Hmac-Algorithm"] == "sha512"
    assert headers["X-Webhook-Hmac"] == hmac.new(b"k2", body, hashlib.sha512).hexdigest()
    doc = msgspec.json.decode(body)
    assert set(doc) >= {"id", "timestamp", "event", "session", "me", "payload"}
    assert doc["payload"]["status"] == "STARTING" and doc["me"] is None
    assert sim.receiver.reports("k2")[:2] == [
        StatusReport(status="connecting", reason="WAHA STARTING"),
        QrToFetch(),
    ]
    with pytest.raises(SignatureError):
        WahaDialect.parse_webhook(body, headers, "another key")


async def test_sim_webhooks_through_scan_and_logout(sim: Sim) -> None:
    await sim.client.create_session(sim.request("w3"))
    await until("first SCAN_QR_CODE", lambda: len(sim.receiver.got) >= 2)
    assert sim.registry.scan("w3") == "ok"
    await until("WORKING", lambda: len(sim.receiver.got) >= 4)
    assert sim.registry.logout("w3")
    await until("FAILED", lambda: len(sim.receiver.got) >= 5)
    reports = sim.receiver.reports(KEY)
    assert [getattr(r, "status", type(r).__name__) for r in reports] == [
        "connecting",
        "QrToFetch",
        "connecting",  # the 515 restart after the scan: WAHA restarts the client
        "connected",
        "logged_out",
    ]
    working = msgspec.json.decode(sim.receiver.got[3][0])
    assert working["me"]["id"].endswith("@c.us")
    ids = [msgspec.json.decode(body)["id"] for body, _ in sim.receiver.got]
    assert len(set(ids)) == len(ids)


async def test_client_without_a_webhook_secret_refuses_to_create(sim: Sim) -> None:
    with pytest.raises(PermanentError, match="hmac"):
        await sim.client.create_session(sim.request("w4", secret=""))
    assert "w4" not in sim.registry.live


async def test_client_with_a_wrong_api_key_is_permanent(sim: Sim) -> None:
    async with aiohttp.ClientSession() as http:
        wrong = WahaDialect(http, sim.client.base_url, "wrong", 5.0)
        with pytest.raises(PermanentError) as info:
            await wrong.create_session(sim.request("w5"))
    assert info.value.status == 401


async def test_client_reads_nest_error_messages() -> None:
    async def exists(request: web.Request) -> web.Response:
        body = {"statusCode": 409, "message": "conflict", "error": "Conflict"}
        return web.json_response(body, status=409)

    async def invalid(request: web.Request) -> web.Response:
        body = {"statusCode": 422, "message": ["name must match"], "error": "Unprocessable Entity"}
        return web.json_response(body, status=422)

    for handler, outcome in ((exists, "exists"), (invalid, "name must match")):
        app = web.Application()
        app.router.add_post("/api/sessions", handler)
        server = TestServer(app)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                client = WahaDialect(http, str(server.make_url("/")), "k", 5.0)
                req = CreateSessionRequest(name="n", webhook_url="http://h/x", webhook_secret="s")
                if outcome == "exists":
                    assert (await client.create_session(req)).already_existed
                else:
                    with pytest.raises(PermanentError, match=outcome):
                        await client.create_session(req)
        finally:
            await server.close()


# --- end to end: the stack on a simulated WAHA ----------------------------------------------


async def test_e2e_create_qr_scan_connected_logout_and_bad_hmac(settings: Settings) -> None:
    waha_sim = msgspec.structs.replace(FAST_SIM, kind="waha")
    async with start_stack(settings, waha_sim, baileys_kind="waha") as stack:
        created = await stack.create("sales")
        ready = await stack.wait_status(created["id"], "qr_ready")
        name = created["session_name"]
        registry: SessionRegistry = stack.apps["sim"][REGISTRY_KEY]
        assert ready["qr"] == registry.live[name].qr  # fetched from /api/{name}/auth/qr

        await stack.sim("POST", f"/_sim/sessions/{name}/scan")
        connected = await stack.wait_status(created["id"], "connected")
        assert connected["qr"] is None
        account = connected["account"]  # from the envelope's `me`
        assert account["name"] == "zapbus sim" and account["phone"].startswith("+5511")

        await stack.sim("POST", f"/_sim/sessions/{name}/logout")
        await stack.wait_status(created["id"], "logged_out")

        async with stack.http.get(
            f"{stack.gateway_url}/v1/connections/{created['id']}/history", headers=stack.auth()
        ) as r:
            items = (await r.json())["items"]
        applied = [h["to_status"] for h in items if h["applied"]]
        assert applied == [
            "pending",
            "creating",
            "awaiting_qr",
            "qr_ready",
            "connected",
            "logged_out",
        ]

        # A webhook of this connection whose HMAC is wrong, or missing, is refused (401).
        cid = uuid.UUID(created["id"])
        url = webhook_url(stack.webhook_url, stack.settings.webhook_secret, cid, 1)
        doc = envelope({"name": name, "status": "WORKING"}, session=name, id="evt_e2e")
        key = webhook_signing_key(stack.settings.webhook_secret, cid, 1)
        body, good = signed(doc, key)
        for headers in ({}, {"X-Webhook-Hmac": "ab" * 64}, signed(doc, "wrong")[1]):
            async with stack.http.post(url, data=body, headers=headers) as r:
                assert r.status == 401, await r.text()
                problem = await r.json(content_type=None)
                assert problem["type"].endswith("invalid-webhook-signature")
        replies = []
        for _ in range(2):  # the same body, rightly signed, delivered twice (a WAHA retry)
            async with stack.http.post(url, data=body, headers=good) as r:
                assert r.status == 202, await r.text()
                replies.append(await r.json())
        assert [r["duplicate"] for r in replies] == [False, True]  # de-duplicated on "id"
        assert session_name(cid, 1) == name


def test_the_linked_account_is_read_from_me() -> None:
    from zapbus.dialects.reports import StatusReport, account_of, phone_of_jid

    assert phone_of_jid("5511987654321@c.us") == "+5511987654321"
    assert phone_of_jid("5511987654321:12@s.whatsapp.net") == "+5511987654321"
    assert phone_of_jid("123@lid") is None
    assert account_of({"me": {"id": "5511987654321@c.us", "pushName": "Ana"}}) == (
        "+5511987654321",
        "Ana",
    )
    assert account_of({"wuid": "5511987654321@s.whatsapp.net", "profileName": "Loja"}) == (
        "+5511987654321",
        "Loja",
    )
    assert StatusReport(status="connected").account_phone is None


# --- WAHA Core: a stand-in that answers as Core does (issue 19 #4) --------------------------


@pytest.fixture
async def core() -> AsyncIterator[WahaDialect]:
    config = SimConfig(kind="waha", api_key="waha-key", create_delay=(0.01, 0.02), waha_core=True)
    server = TestServer(create_sim(config))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield WahaDialect(http, str(server.make_url("/")), "waha-key", 5.0)
    finally:
        await server.close()


async def test_core_refuses_any_session_but_default_and_says_plus_is_required(
    core: WahaDialect,
) -> None:
    req = CreateSessionRequest(
        name="zb_x_g1", webhook_url="http://127.0.0.1:9/h", webhook_secret=KEY
    )
    with pytest.raises(PermanentError, match="WAHA Plus") as info:
        await core.create_session(req)
    assert info.value.status == 422
    assert core.unfit is not None and "WAHA Plus" in core.unfit
    assert await core.get_session("zb_x_g1") is None  # Core's GET of another name: 404
    with pytest.raises(PermanentError, match="422"):
        await core.delete_session("zb_x_g1")  # Core's delete of another name: 422
    # the generic delete path: a refusal whose GET says "none" is a session gone already
    assert await delete_or_gone(core, "zb_x_g1", None) is False
    created = await core.create_session(msgspec.structs.replace(req, name="default"))
    assert not created.already_existed  # "default" is served


async def test_core_is_found_by_its_version_route_and_plus_is_not(
    core: WahaDialect, sim: Sim
) -> None:
    reason = await core.check_fit()
    assert reason is not None and "WAHA Core 2024.10.8" in reason and "WAHA Plus" in reason
    assert core.unfit == reason
    assert await sim.client.check_fit() is None and sim.client.unfit is None


async def test_e2e_on_a_pool_of_waha_core_nothing_but_the_create_is_dead_lettered(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool of two WAHA Core servers: the worker's /readyz says WAHA Plus is required; a
    create refused on both fails (server_refused) without a cleanup delete (Core made no
    session); the tenant's delete then finds the session already gone: done, not
    dead-lettered, and history says so."""
    ports = {name: free_port() for name in ("a", "b")}
    core_sim = msgspec.structs.replace(FAST_SIM, kind="waha", waha_core=True)
    runners = [
        await serve(create_sim(msgspec.structs.replace(core_sim, port=p)), p)
        for p in ports.values()
    ]
    urls = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in ports.items())
    try:
        async with start_stack(settings, None, baileys_urls=urls, baileys_kind="waha") as stack:

            async def unready() -> dict[str, Any] | None:
                async with stack.http.get(f"{stack.worker_url}/readyz") as r:
                    body: dict[str, Any] = await r.json()
                    why = body.get("reasons", {}).get("baileys_servers", "")
                    return body if r.status == 503 and "WAHA Plus" in why else None

            ready = await wait_for("the worker's /readyz to say WAHA Plus is required", unready)
            assert ready["checks"]["baileys_servers"] is False

            created = await stack.create("core")
            failed = await stack.wait_status(created["id"], "failed", timeout=30)
            assert failed["reason_code"] == "server_refused"
            assert "WAHA Plus" in failed["status_reason"]

            async with stack.http.delete(
                f"{stack.gateway_url}/v1/connections/{created['id']}", headers=stack.auth()
            ) as r:
                assert r.status == 202

            async def deleted() -> list[dict[str, Any]] | None:
                async with stack.http.get(
                    f"{stack.gateway_url}/v1/connections/{created['id']}/history",
                    headers=stack.auth(),
                ) as r:
                    items: list[dict[str, Any]] = (await r.json())["items"]
                done = [h for h in items if h["event_type"] == "session.deleted"]
                return done or None

            done = await wait_for("the tenant's delete to be done", deleted, timeout=30)
            assert [h["reason"] for h in done] == ["session already gone from the server"]
            assert await stack.pool.fetchval("SELECT count(*) FROM session_deletes") == 0
            nc = await bus.connect(stack.settings.nats_url, "test-core-dlq")
            try:
                letters = await dlq.list_letters(nc.jetstream(), stack.settings.names)
            finally:
                await nc.close()
            assert [item.letter.command.kind for item in letters if item.letter.command] == [
                "create"
            ]
            said = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.ERROR and "WAHA Plus" in r.getMessage()
            ]
            assert len(said) == 2, said  # one error per server, however often it refused
            assert all("cannot serve zapbus: WAHA Core 2024.10.8" in m for m in said), said
    finally:
        for runner in runners:
            await runner.cleanup()
