"""One grep for a connection id follows it through every service; secrets never reach a log.

The four services run as processes (``tests/faults.py``) with the default log format, so their
output to a file must be JSON lines. One connection is created and scanned to ``connected``;
its id must then show up in the gateway's, the worker's, the webhook's and the projector's
logs, with the generation and the command id where the service knows them, while the API key,
the webhook token and secret, the Baileys API key and the QR payload appear nowhere.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from services.baileys_sim.config import SimConfig
from tests.faults import ProcessStack, process_stack
from tests.stack import wait_for
from zapbus.tokens import webhook_token

WEBHOOK_SECRET = f"whsec-{uuid.uuid4().hex}"
SIM = SimConfig(
    port=0,
    api_key=f"baileys-{uuid.uuid4().hex}",
    create_delay=(0.02, 0.1),
    qr_first_seconds=600,  # one QR code only: the test knows every payload
    qr_next_seconds=600,
)
ENV = {
    "ZAPBUS_LOG_FORMAT": "auto",  # the default: JSON because stderr is a file here
    "ZAPBUS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "ZAPBUS_OUTBOX_POLL_SECONDS": "0.2",
}
SERVICES = ("gateway", "session_worker", "webhook", "projector")


def read_logs(stack: ProcessStack) -> dict[str, list[dict[str, Any]]]:
    """Every service's log lines, each parsed as the JSON object it must be."""
    logs: dict[str, list[dict[str, Any]]] = {}
    for service in SERVICES:
        lines = (stack.logs / f"{service}.log").read_text(errors="replace").splitlines()
        parsed = []
        for line in filter(str.strip, lines):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"{service} logged a line that is not JSON: {line}") from None
        assert all(isinstance(p, dict) for p in parsed), service
        logs[service] = parsed
    return logs


async def _connection(stack: ProcessStack, connection_id: str) -> dict[str, Any]:
    async with stack.http.get(
        f"{stack.gateway_url}/v1/connections/{connection_id}", headers=stack.auth()
    ) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_one_grep_follows_a_connection_and_no_secret_is_logged(workdir: Path) -> None:
    async with process_stack(workdir, SIM, ENV) as stack:
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections", json={"name": "traced"}, headers=stack.auth()
        ) as r:
            assert r.status == 202, await r.text()
            created = await r.json()
        cid, generation = created["id"], created["generation"]

        async def in_status(status: str) -> dict[str, Any] | None:
            body = await _connection(stack, cid)
            return body if body["status"] == status else None

        ready = await wait_for(f"{cid} qr_ready", lambda: in_status("qr_ready"), timeout=20)
        qr = ready["qr"]
        assert qr
        # a client token, used the ways a browser does: as Bearer, as ?token=, in /connect
        async with stack.http.post(
            f"{stack.gateway_url}/v1/connections/{cid}/client-token", headers=stack.auth()
        ) as r:
            assert r.status == 200, await r.text()
            client_token = (await r.json())["token"]
        base = f"{stack.gateway_url}/v1/connections/{cid}"
        for url, kw in (
            (f"{base}/qr", {"params": {"token": client_token}}),
            (base, {"headers": {"Authorization": f"Bearer {client_token}"}}),
            (f"{base}/history", {"params": {"token": client_token}}),  # 403
            (f"{stack.gateway_url}/connect/{client_token}", {}),
        ):
            async with stack.http.get(url, **kw) as r:
                assert r.status in (200, 403), (url, r.status)
        async with stack.http.post(
            f"{stack.sim_url}/_sim/sessions/{created['session_name']}/scan"
        ) as r:
            assert r.status < 300, await r.text()
        await wait_for(f"{cid} connected", lambda: in_status("connected"), timeout=20)

        def about_connection(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Lines about the connection; a batch line (the projector's events, a relay's
            commands) counts by its items."""
            found = [line for line in lines if line.get("connection_id") == cid]
            for line in lines:
                for item in [*line.get("events", ()), *line.get("commands", ())]:
                    if item["connection_id"] == cid:
                        found.append({**item, "service": line["service"], "msg": line["msg"]})
            return found

        async def traced() -> dict[str, list[dict[str, Any]]] | None:
            about = {
                service: about_connection(lines) for service, lines in read_logs(stack).items()
            }
            done = any(line.get("to_status") == "connected" for line in about["projector"])
            return about if done and all(about.values()) else None

        about = await wait_for(f"log lines about {cid} from {SERVICES}", traced, timeout=30)
        all_logs = stack.all_logs()

    # The same lines, found the way an operator would: one grep for the id.
    grep = [json.loads(line) for line in all_logs.splitlines() if cid in line]
    assert {line["service"] for line in grep} == set(SERVICES)
    for service, lines in about.items():
        assert all(line["service"] == service for line in lines), service

    (handled,) = (line for line in about["session_worker"] if line.get("command") == "create")
    assert handled["msg"] == "command succeeded"
    command_id = handled["command_id"]
    uuid.UUID(command_id)
    assert handled["generation"] == generation
    assert handled["seq"] >= 1 and handled["delivered"] == 1 and handled["ms"] >= 0
    # the gateway relays its commands; the projector's relay (it relays the changes it
    # queues) may take one that is committed at that moment
    relayed = [
        line
        for line in about["gateway"] + about["projector"]
        if line.get("msg") == "commands relayed"
    ]
    assert command_id in {line["command_id"] for line in relayed}, relayed
    handled_webhooks = [line for line in about["webhook"] if "event" in line]
    assert {line["event"] for line in handled_webhooks} == {"qr.update", "session.status"}
    access = [line for line in about["webhook"] if "route" in line]
    assert access and all(line["status"] == 202 for line in access)
    assert all("{token}" in line["route"] for line in access)  # the template, never the token
    assert all(line["generation"] == generation for line in about["webhook"])
    projected = [line for line in about["projector"] if line.get("msg") != "commands relayed"]
    assert all(line["generation"] == generation for line in projected)
    from_worker = [line for line in projected if line["event"].startswith("create.")]
    assert from_worker and all(line["command_id"] == command_id for line in from_worker)

    secrets = {
        "API key": stack.api_key,
        "webhook token": webhook_token(WEBHOOK_SECRET, uuid.UUID(cid), generation),
        "webhook secret": WEBHOOK_SECRET,
        "Baileys API key": SIM.api_key,
        "QR payload": qr,
        "client token": client_token,
        "client token signature": client_token.rsplit(".", 1)[1],
    }
    for what, secret in secrets.items():
        assert secret not in all_logs, f"the {what} appears in a log"
