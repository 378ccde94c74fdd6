"""The JSON Schemas of the bus messages in docs/schemas/ match the code, and real messages
validate against them (with an independent validator, the jsonschema package)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import jsonschema
import pytest

from proto import schemas
from proto.changes import ConnectionChanged, change_encoder
from proto.commands import CreateSession, RequestPairingCode, command_encoder
from proto.events import PairingCodeShown, StatusReported, event_encoder


@pytest.mark.parametrize("name", sorted(schemas.MESSAGES))
def test_the_schema_files_match_the_code(name: str) -> None:
    path = schemas.SCHEMA_DIR / f"{name}.schema.json"
    assert path.exists(), f"run `python -m proto.schemas` to write {path}"
    assert path.read_text() == schemas.render(schemas.build()[name]), (
        f"{path} is out of date: run `python -m proto.schemas`"
    )


def _validate(name: str, message: bytes) -> None:
    schema = json.loads((schemas.SCHEMA_DIR / f"{name}.schema.json").read_text())
    jsonschema.validate(json.loads(message), schema)


def test_real_messages_validate_and_a_wrong_one_does_not() -> None:
    now = datetime.now(UTC)
    ids = {
        "command_id": uuid.uuid4(),
        "connection_id": uuid.uuid4(),
        "tenant_id": uuid.uuid4(),
        "generation": 1,
        "session_name": "zb_x_g1",
        "requested_at": now,
    }
    _validate("commands", command_encoder.encode(CreateSession(**ids, login="code")))
    _validate("commands", command_encoder.encode(RequestPairingCode(**ids, phone_number="+55")))
    common = {
        "event_id": uuid.uuid4(),
        "connection_id": uuid.uuid4(),
        "generation": 2,
        "occurred_at": now,
    }
    _validate("events", event_encoder.encode(StatusReported(**common, status="open", code=515)))
    _validate("events", event_encoder.encode(PairingCodeShown(**common, code="ABCD1234")))
    change = ConnectionChanged(
        connection_id=uuid.uuid4(),
        generation=1,
        status="qr_ready",
        status_reason=None,
        qr="2@x",
        qr_seq=1,
        qr_expires_at=now,
        cause="qr.updated",
        changed_at=now,
    )
    _validate("connection_changed", change_encoder.encode(change))
    with pytest.raises(jsonschema.ValidationError):
        _validate("events", b'{"type": "status.reported", "generation": "one"}')
