"""The ``evolution`` dialect (Evolution API v2.3 / 2.4): its webhooks, its client, end to end.

Contract tests replay the payloads of issue 11 and of Evolution's own source
(``whatsapp.baileys.service.ts`` ``connectionUpdate``, ``webhook.controller.ts`` ``emit``)
through ``EvolutionDialect.parse_webhook`` and check what zapbus's state machine makes of them.
Client tests run against the simulator speaking evolution and against tiny servers answering
what Evolution answers where the simulator does not go. The end-to-end tests run the whole
stack with the simulator speaking evolution.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proto.states import Status
from services.baileys_sim.app import create_app as create_sim
from services.baileys_sim.config import SimConfig
from tests.stack import FAST_SIM, Stack, start_stack, wait_for
from zapbus.config import Settings
from zapbus.connection.vocabulary import state_for_report
from zapbus.dialects import dialect_class
from zapbus.dialects.base import CreateSessionRequest
from zapbus.dialects.errors import PermanentError, RetryableError
from zapbus.dialects.evolution import EvolutionDialect
from zapbus.dialects.reports import (
    Delivery,
    PairingCodeReport,
    PayloadError,
    QrReport,
    StatusReport,
    Unknown,
)

NAME = "zb_evo_g1"
QR = "2@y8eK+bjtEjUWy9/FOM,noise=,identity=,adv="
REQ = CreateSessionRequest(name=NAME, webhook_url="http://127.0.0.1:1/webhooks/baileys/x/1/t")
CODE_REQ = CreateSessionRequest(
    name=NAME, webhook_url=REQ.webhook_url, login="code", phone_number="+5511987654321"
)
EVO_SIM = msgspec.structs.replace(FAST_SIM, kind="evolution")


def envelope(event: str, data: Any, **extra: Any) -> dict[str, Any]:
    """A delivery as Evolution's WebhookController.emit builds it."""
    return {
        "event": event,
        "instance": NAME,
        "data": data,
        "destination": "http://zapbus/webhooks/baileys/x/1/t",
        "date_time": "2026-03-01T09:15:42.123Z",  # local time labelled UTC
        "sender": "5511987654321@s.whatsapp.net",
        "server_url": "http://localhost:8080",
        "apikey": None,
        **extra,
    }


def parse(body: dict[str, Any], headers: dict[str, str] | None = None) -> Delivery:
    return EvolutionDialect.parse_webhook(msgspec.json.encode(body), headers or {}, "")


def meaning(delivery: Delivery) -> list[Status | None]:
    """The state zapbus's state machine reads into each status report."""
    return [
        state_for_report(r.status, r.code, r.reason)
        for r in delivery.reports
        if isinstance(r, StatusReport)
    ]


# --- contract: webhooks -----------------------------------------------------------------------


def test_the_registry_finds_the_evolution_dialect() -> None:
    assert dialect_class("evolution") is EvolutionDialect


@pytest.mark.parametrize("event", ["qrcode.updated", "QRCODE_UPDATED"])
def test_qrcode_updated_carries_the_qr_in_data_qrcode_code(event: str) -> None:
    qrcode = {"instance": NAME, "pairingCode": None, "code": QR, "base64": "data:image/png;..."}
    delivery = parse(envelope(event, {"qrcode": qrcode}))
    assert delivery.session == NAME
    assert delivery.reports == [QrReport(qr=QR)]


def test_qrcode_updated_with_a_pairing_code_reports_it_beside_the_qr() -> None:
    qrcode = {"instance": NAME, "pairingCode": "WZYEH1YY", "code": QR, "base64": "data:..."}
    delivery = parse(envelope("qrcode.updated", {"qrcode": qrcode}))
    assert delivery.reports == [PairingCodeReport(code="WZYEH1YY"), QrReport(qr=QR)]


def test_qr_limit_message_then_refused_both_mean_qr_expired() -> None:
    limit = parse(
        envelope(
            "qrcode.updated",
            {"message": "QR code limit reached, please login again", "statusCode": 500},
        )
    )
    refused = parse(
        envelope(
            "connection.update",
            {
                "instance": NAME,
                "state": "refused",
                "statusReason": 428,
                "wuid": None,
                "profileName": None,
                "profilePictureUrl": None,
            },
        )
    )
    assert meaning(limit) == [Status.QR_EXPIRED]
    assert meaning(refused) == [Status.QR_EXPIRED]
    for delivery in (limit, refused):
        assert all(isinstance(r, StatusReport) and r.code == 408 for r in delivery.reports)


@pytest.mark.parametrize(
    ("data", "status", "code", "means"),
    [
        ({"instance": NAME, "state": "connecting", "statusReason": 200}, "connecting", None,
         Status.AWAITING_QR),
        ({"instance": NAME, "wuid": "5511987654321@s.whatsapp.net", "profileName": "Ana",
          "profilePictureUrl": None, "state": "open", "statusReason": 200}, "open", None,
         Status.CONNECTED),
        ({"instance": NAME, "state": "close", "statusReason": 401}, "close", 401,
         Status.LOGGED_OUT),
        ({"instance": NAME, "state": "close", "statusReason": 403}, "close", 403, Status.FAILED),
        ({"instance": NAME, "state": "close", "statusReason": "515"}, "close", 515,
         Status.PAIRING),
        ({"instance": NAME, "state": "close", "statusReason": 515.0}, "close", 515,
         Status.PAIRING),
    ],
)  # fmt: skip
def test_connection_update_state_and_numeric_status_reason(
    data: dict[str, Any], status: str, code: int | None, means: Status
) -> None:
    for event in ("connection.update", "CONNECTION_UPDATE"):
        delivery = parse(envelope(event, data))
        assert [(r.status, r.code) for r in delivery.reports] == [(status, code)]  # type: ignore[union-attr]
        assert meaning(delivery) == [means]
        if "wuid" in data:  # the linked account, from wuid and profileName
            report = delivery.reports[0]
            assert isinstance(report, StatusReport)
            assert (report.account_phone, report.account_name) == ("+5511987654321", "Ana")


def test_a_final_close_status_instance_logout_and_close_all_mean_logged_out() -> None:
    """401 from the phone: Evolution sends status.instance, logout.instance, connection.update."""
    status = parse(
        envelope(
            "status.instance",
            {
                "instance": NAME,
                "status": "closed",
                "disconnectionAt": "2026-03-01T09:15:42.123Z",
                "disconnectionReasonCode": 401,
                "disconnectionObject": '{"error":{"output":{"statusCode":401}}}',
            },
        )
    )
    logout = parse(envelope("logout.instance", None))
    upper = parse(envelope("LOGOUT_INSTANCE", None))
    close = parse(envelope("connection.update", {"instance": NAME, "state": "close",
                                                 "statusReason": 401}))  # fmt: skip
    assert status.reports == [StatusReport(status="close", code=401)]
    for delivery in (status, logout, upper, close):
        assert meaning(delivery) == [Status.LOGGED_OUT]


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("messages.upsert", {"key": {"id": "ABC"}}),
        ("MESSAGES_UPSERT", {"key": {"id": "ABC"}}),
        ("remove.instance", None),
        ("instance.create", {"instanceName": NAME, "instanceId": "x"}),
        ("connection.update", {"instance": NAME, "isNewLogin": True}),
        ("connection.update", None),
        ("qrcode.updated", {"qrcode": "not an object"}),
        ("qrcode.updated", {"something": "else"}),
        ("status.instance", {"instance": NAME}),
    ],
)
def test_unknown_events_and_unknown_shapes_are_kept_as_unknown_not_refused(
    event: str, data: Any
) -> None:
    assert parse(envelope(event, data)).reports == [Unknown(name=event)]


def test_no_delivery_id_and_date_time_is_never_read() -> None:
    data = {"instance": NAME, "state": "open", "statusReason": 200}
    one = parse(envelope("connection.update", data), {"webhook-id": "msg_1"})
    other = parse(envelope("connection.update", data, date_time="not a time at all"))
    assert one.delivery_id is None and other.delivery_id is None
    assert one == other


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (envelope("qrcode.updated", {"qrcode": {"code": "2@a\u0000b"}}), "data.qrcode.code"),
        (envelope("qrcode.updated", {"qrcode": {"code": 12}}), "data.qrcode.code"),
        (envelope("connection.update", {"state": "close", "statusReason": "soon"}),
         "data.statusReason"),
        ({**envelope("connection.update", {"state": "open"}), "instance": 7}, "instance"),
        ({"instance": NAME, "data": {}}, "event"),
    ],
)  # fmt: skip
def test_malformed_known_fields_are_refused_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(PayloadError) as info:
        parse(body)
    assert info.value.field == field


# --- the client against tiny servers answering as Evolution does ----------------------------

Serve = Callable[[list[web.RouteDef]], Awaitable[EvolutionDialect]]


def answer(body: Any, status: int = 200, calls: list[str] | None = None) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        if calls is not None:
            calls.append(f"{request.method} {request.path_qs}")
        return web.json_response(body, status=status)

    return handler


def evolution_error(status: int, error: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": error, "response": {"message": [message]}}


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []
    async with aiohttp.ClientSession() as http:

        async def start(routes: list[web.RouteDef]) -> EvolutionDialect:
            app = web.Application()
            app.add_routes(routes)
            server = TestServer(app)
            await server.start_server()
            servers.append(server)
            return EvolutionDialect(http, str(server.make_url("/")), "global-key", 5.0)

        yield start
    for server in servers:
        await server.close()


async def test_create_sends_the_exact_body_with_the_apikey_header(serve: Serve) -> None:
    seen: list[tuple[dict[str, Any], str | None]] = []

    async def create(request: web.Request) -> web.Response:
        seen.append((await request.json(), request.headers.get("apikey")))
        return web.json_response({"instance": {"instanceName": NAME}, "qrcode": {}}, status=201)

    client = await serve([web.post("/instance/create", create)])
    assert not (await client.create_session(REQ)).already_existed
    created = await client.create_session(CODE_REQ)
    webhook = {
        "url": REQ.webhook_url,
        "byEvents": False,
        "base64": False,
        "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE", "STATUS_INSTANCE", "LOGOUT_INSTANCE"],
    }
    body = {
        "instanceName": NAME,
        "integration": "WHATSAPP-BAILEYS",
        "qrcode": True,
        "webhook": webhook,
    }
    assert seen == [(body, "global-key"), ({**body, "number": "5511987654321"}, "global-key")]
    assert created.pairing_code is None


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (403, evolution_error(403, "Forbidden", f'This name "{NAME}" is already in use.')),
        (400, evolution_error(400, "Bad Request", f'This name "{NAME}" is already in use.')),
        (400, evolution_error(400, "Bad Request",
                              "Unique constraint failed on the fields: (`name`)")),
    ],
)  # fmt: skip
async def test_a_name_in_use_is_already_existing(
    serve: Serve, status: int, error: dict[str, Any]
) -> None:
    client = await serve([web.post("/instance/create", answer(error, status))])
    assert (await client.create_session(REQ)).already_existed


async def test_other_create_refusals_are_errors_with_evolutions_message(serve: Serve) -> None:
    forbidden = evolution_error(403, "Forbidden", "Missing global api key")
    client = await serve([web.post("/instance/create", answer(forbidden, 403))])
    with pytest.raises(PermanentError, match="Missing global api key"):
        await client.create_session(REQ)
    busy = await serve([web.post("/instance/create", answer({"error": "x"}, 503))])
    with pytest.raises(RetryableError):
        await busy.create_session(REQ)


async def test_delete_logs_out_first_and_tolerates_not_connected(serve: Serve) -> None:
    calls: list[str] = []
    not_connected = evolution_error(400, "Bad Request", f'The "{NAME}" instance is not connected')
    deleted = {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
    client = await serve(
        [
            web.delete("/instance/logout/{name}", answer(not_connected, 400, calls)),
            web.delete("/instance/delete/{name}", answer(deleted, 200, calls)),
        ]
    )
    assert await client.delete_session(NAME)
    assert calls == [f"DELETE /instance/logout/{NAME}", f"DELETE /instance/delete/{NAME}"]


async def test_delete_of_an_instance_that_does_not_exist_is_false(serve: Serve) -> None:
    missing = evolution_error(404, "Not Found", f'The "{NAME}" instance does not exist')
    client = await serve(
        [
            web.delete("/instance/logout/{name}", answer(missing, 404)),
            web.delete("/instance/delete/{name}", answer(missing, 404)),
        ]
    )
    assert not await client.delete_session(NAME)


async def test_fetch_instances_of_v2_and_v1_shapes(serve: Serve) -> None:
    v2 = [
        {"id": "c1", "name": "zb_a_g1", "connectionStatus": "open", "ownerJid": None},
        {"id": "c2", "name": "zb_b_g1", "connectionStatus": "close"},
        {"unreadable": True},
    ]
    v1 = [{"instance": {"instanceName": "zb_c_g1", "instanceId": "x", "status": "connecting"}}]
    client = await serve([web.get("/instance/fetchInstances", answer(v2))])
    listed = await client.list_sessions()
    assert listed is not None
    assert [(s.name, s.state) for s in listed] == [("zb_a_g1", "open"), ("zb_b_g1", "close")]
    old = await serve([web.get("/instance/fetchInstances", answer(v1))])
    listed = await old.list_sessions()
    assert listed is not None and [(s.name, s.state) for s in listed] == [("zb_c_g1", "connecting")]
    broken = await serve([web.get("/instance/fetchInstances", answer({"data": 1}))])
    with pytest.raises(RetryableError):
        await broken.list_sessions()


async def test_connect_without_a_code_yet_is_retried(serve: Serve) -> None:
    client = await serve([web.get("/instance/connect/{name}", answer({"count": 0}))])
    with pytest.raises(RetryableError):
        await client.request_pairing_code(NAME, "+5511987654321")
    caught = await serve(
        [web.get("/instance/connect/{name}", answer({"error": True, "message": "Error: x"}))]
    )
    with pytest.raises(RetryableError, match="Error: x"):
        await caught.request_pairing_code(NAME, "+5511987654321")


async def test_health_is_the_welcome_route(serve: Serve) -> None:
    welcome = {"status": 200, "message": "Welcome to the Evolution API, it is working!"}
    assert await (await serve([web.get("/", answer(welcome))])).healthy()
    assert not await (await serve([])).healthy()


# --- the client against the simulator speaking evolution -------------------------------------


@pytest.fixture
async def sim_client(serve: Serve) -> AsyncIterator[tuple[EvolutionDialect, TestServer]]:
    config = SimConfig(kind="evolution", api_key="global-key", create_delay=(0.0, 0.0), seed=1)
    server = TestServer(create_sim(config))
    await server.start_server()
    client = await serve([])
    client.base_url = str(server.make_url("")).rstrip("/")
    try:
        yield client, server
    finally:
        await server.close()


async def test_client_and_simulator_agree(
    sim_client: tuple[EvolutionDialect, TestServer],
) -> None:
    client, server = sim_client
    assert await client.healthy()
    assert await client.list_sessions() == []
    assert await client.get_session(NAME) is None
    assert not (await client.create_session(REQ)).already_existed
    assert (await client.create_session(REQ)).already_existed
    found = await client.get_session(NAME)
    assert found is not None and found.state == "connecting"
    listed = await client.list_sessions()
    assert listed is not None and [(s.name, s.state) for s in listed] == [(NAME, "connecting")]
    code = await client.request_pairing_code(NAME, "+5511987654321")
    assert len(code) == 8

    async with aiohttp.ClientSession() as http:
        async with http.post(server.make_url(f"/_sim/sessions/{NAME}/scan")) as r:
            assert r.status == 200
    found = await client.get_session(NAME)
    assert found is not None and found.state == "open"

    assert await client.delete_session(NAME)
    assert await client.get_session(NAME) is None
    assert not await client.delete_session(NAME)


async def test_code_login_create_answers_with_the_pairing_code(
    sim_client: tuple[EvolutionDialect, TestServer],
) -> None:
    client, _ = sim_client
    created = await client.create_session(CODE_REQ)
    assert created.pairing_code is not None and len(created.pairing_code) == 8


async def test_the_simulator_wants_the_apikey_header(
    sim_client: tuple[EvolutionDialect, TestServer],
) -> None:
    client, _ = sim_client
    client.api_key = "wrong"
    with pytest.raises(PermanentError):
        await client.create_session(REQ)
    assert await client.healthy()  # GET / needs no key


# --- end to end through the whole stack -------------------------------------------------------


async def _history(stack: Stack, connection_id: str) -> list[dict[str, Any]]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}/history", headers=stack.auth()
    ) as r:
        assert r.status == 200
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items


async def test_end_to_end_create_qr_scan_connected_logout(settings: Settings) -> None:
    async with start_stack(settings, EVO_SIM, baileys_kind="evolution") as stack:
        created = await stack.create("evo")
        name = created["session_name"]
        ready = await stack.wait_status(created["id"], "qr_ready")
        assert ready["qr"].startswith("2@")

        await stack.sim("POST", f"/_sim/sessions/{name}/scan")
        connected = await stack.wait_status(created["id"], "connected")
        assert connected["qr"] is None

        await stack.sim("POST", f"/_sim/sessions/{name}/logout")
        await stack.wait_status(created["id"], "logged_out")
        history = await _history(stack, created["id"])
        applied = [h["to_status"] for h in history if h["applied"]]
        # Evolution never reports the 515 restart close: qr_ready goes straight to connected.
        assert applied == [
            "pending",
            "creating",
            "awaiting_qr",
            "qr_ready",
            "connected",
            "logged_out",
        ]


async def test_end_to_end_qr_limit_is_qr_expired(settings: Settings) -> None:
    sim = msgspec.structs.replace(EVO_SIM, qr_max=1, qr_first_seconds=0.5)
    async with start_stack(settings, sim, baileys_kind="evolution") as stack:
        created = await stack.create("evo-limit")
        await stack.wait_status(created["id"], "qr_ready")
        expired = await stack.wait_status(created["id"], "qr_expired")
        assert "QR refs attempts ended" in (expired["status_reason"] or "")


async def test_end_to_end_delete_removes_the_instance(settings: Settings) -> None:
    async with start_stack(settings, EVO_SIM, baileys_kind="evolution") as stack:
        created = await stack.create("evo-del")
        await stack.wait_status(created["id"], "qr_ready")
        async with stack.http.delete(
            f"{stack.gateway_url}/v1/connections/{created['id']}", headers=stack.auth()
        ) as r:
            assert r.status == 202

        async def gone() -> bool:
            return created["session_name"] not in (await stack.sim("GET", "/_sim/stats"))["live"]

        await wait_for("the instance to be deleted on the server", gone)


async def test_the_reconciler_recreates_a_lost_instance_through_fetch_instances(
    settings: Settings,
) -> None:
    fast = {"reconcile_interval_seconds": 0.2, "reconcile_grace_seconds": 0.5}
    async with start_stack(settings, EVO_SIM, baileys_kind="evolution", **fast) as stack:
        connection = await stack.create("evo-lost")
        await stack.wait_status(connection["id"], "qr_ready")
        lost = (await stack.sim("POST", "/_sim/restart"))["data"]["lost"]
        assert lost == [connection["session_name"]]

        await stack.wait_status(connection["id"], "reconnecting")
        await stack.wait_status(connection["id"], "qr_ready")
        stats = await stack.sim("GET", "/_sim/stats")
        assert stats["created"][connection["session_name"]] == 2
        history = await _history(stack, connection["id"])
        recreated = [h for h in history if h["event_type"] == "reconcile.recreated"]
        assert len(recreated) == 1 and recreated[0]["reason"] == "session lost on server"
