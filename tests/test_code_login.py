"""Pairing by code, end to end (seed dialect): the code shows, a QR rotation never changes it,
typing it links the phone; a new code on request, rate-limited; bad input refused clearly."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.projector.app import create_app as create_projector
from tests.stack import FAST_SIM, Stack, serve, start_stack, wait_for
from zapbus.config import Settings

ROTATING = msgspec.structs.replace(FAST_SIM, qr_first_seconds=0.3, qr_next_seconds=0.3, qr_max=50)
PHONE = "+5511987654321"


async def _post(stack: Stack, path: str, body: Any = None) -> tuple[int, Any]:
    async with stack.http.post(f"{stack.gateway_url}{path}", json=body, headers=stack.auth()) as r:
        return r.status, await r.json(content_type=None)


async def test_code_login_shows_a_code_that_survives_qr_rotations_and_links(
    settings: Settings,
) -> None:
    async with start_stack(settings, ROTATING, qr_max_refreshes=50) as stack:
        status, created = await _post(
            stack, "/v1/connections", {"name": "by code", "login": "code", "phone_number": PHONE}
        )
        assert status == 202, created
        assert (created["login"], created["phone_number"]) == ("code", PHONE)
        shown = await stack.wait_status(created["id"], "code_ready")
        code = shown["pairing_code"]
        assert code and len(code) == 8 and shown["pairing_code_expires_at"]
        seq = shown["qr_seq"]

        async def rotated() -> Any:
            _, body = await stack.get(created["id"])
            return body if body["qr_seq"] >= seq + 2 else None

        later = await wait_for("two more QR rotations", rotated)
        assert (later["status"], later["pairing_code"]) == ("code_ready", code)

        name = created["session_name"]
        await stack.sim("POST", f"/_sim/sessions/{name}/enter-code")
        linked = await stack.wait_status(created["id"], "connected")
        assert linked["pairing_code"] is None


async def test_a_new_code_on_request_is_rate_limited(settings: Settings) -> None:
    async with start_stack(settings, pairing_code_min_interval_seconds=60) as stack:
        status, created = await _post(
            stack, "/v1/connections", {"name": "again", "login": "code", "phone_number": PHONE}
        )
        first = (await stack.wait_status(created["id"], "code_ready"))["pairing_code"]
        path = f"/v1/connections/{created['id']}/pairing-code"
        status, body = await _post(stack, path)
        assert status == 202, body

        async def replaced() -> Any:
            _, now = await stack.get(created["id"])
            return now if now["pairing_code"] not in (None, first) else None

        await wait_for("a new code", replaced)
        async with stack.http.post(f"{stack.gateway_url}{path}", headers=stack.auth()) as r:
            assert r.status == 429
            assert r.content_type == "application/problem+json"
            assert int(r.headers["Retry-After"]) > 0

        qr_login = await stack.create("by qr")
        status, body = await _post(stack, f"/v1/connections/{qr_login['id']}/pairing-code")
        assert status == 409 and body["type"].endswith("/pairing-code-unavailable")


async def test_bad_code_login_requests_are_refused_clearly(settings: Settings) -> None:
    async with start_stack(settings) as stack:
        for body, field in [
            ({"name": "x", "login": "code"}, "phone_number"),
            ({"name": "x", "login": "code", "phone_number": "11987654321"}, None),
            ({"name": "x", "login": "code", "phone_number": "+0123456789"}, None),
            ({"name": "x", "login": "sms", "phone_number": PHONE}, None),
        ]:
            status, problem = await _post(stack, "/v1/connections", body)
            assert status == 422, (body, problem)
            assert problem["type"].endswith("/invalid-body")
            if field:
                assert problem["field"] == field
        created = await stack.create("switch")
        status, body = await _post(
            stack, f"/v1/connections/{created['id']}/recreate", {"login": "code"}
        )
        assert status == 422 and body["field"] == "phone_number"
        status, body = await _post(
            stack,
            f"/v1/connections/{created['id']}/recreate",
            {"login": "code", "phone_number": PHONE},
        )
        assert status == 202 and (body["login"], body["generation"]) == ("code", 2)
        await stack.wait_status(created["id"], "code_ready")


@pytest.mark.parametrize("kind", ["evolution", "waha"])
async def test_code_login_end_to_end_in_other_dialects(settings: Settings, kind: str) -> None:
    sim = msgspec.structs.replace(FAST_SIM, kind=kind)
    async with start_stack(settings, sim, baileys_kind=kind) as stack:
        status, created = await _post(
            stack, "/v1/connections", {"name": kind, "login": "code", "phone_number": PHONE}
        )
        assert status == 202, created
        shown = await stack.wait_status(created["id"], "code_ready", timeout=20)
        assert shown["pairing_code"]
        await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/enter-code")
        linked = await stack.wait_status(created["id"], "connected", timeout=20)
        assert linked["pairing_code"] is None


async def test_the_code_is_asked_for_while_the_projector_lags(settings: Settings) -> None:
    """The worker asks for the code right after the create; the projector may not have moved
    the row out of ``pending`` yet (a loaded machine): the request must still go to the server,
    not be dropped as no longer wanted (the row then waited in ``awaiting_qr`` for good)."""
    async with start_stack(settings) as stack:
        await stack.runners.pop("projector").cleanup()  # the row stays pending meanwhile
        status, created = await _post(
            stack, "/v1/connections", {"name": "lag", "login": "code", "phone_number": PHONE}
        )
        assert status == 202, created

        async def asked() -> bool:
            async with stack.http.get(f"{stack.worker_url}/metrics") as r:
                text = await r.text()
            finished = [
                line
                for line in text.splitlines()
                if line.startswith('zapbus_worker_commands_total{kind="pairing_code"')
                and not line.endswith(" 0.0")
            ]
            return bool(finished)

        await wait_for("the worker to handle the code request", asked)
        _, row = await stack.get(created["id"])
        assert row["status"] == "pending", row  # the lag this test is about
        stack.runners["projector"] = await serve(
            create_projector(stack.settings), int(stack.projector_url.rsplit(":", 1)[1])
        )
        shown = await stack.wait_status(created["id"], "code_ready")
        assert shown["pairing_code"]
