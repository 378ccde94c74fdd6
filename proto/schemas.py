"""JSON Schemas of every message on the bus, generated from the Structs in ``proto/``.

For consumers outside zapbus (another language, another team): ``docs/schemas/*.json`` are
written by ``python -m proto.schemas`` and a test checks they match the code
(tests/test_bus_schemas.py). ``docs/bus.md`` lists the subjects and streams they travel on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from proto.changes import ConnectionChanged
from proto.commands import Command, DeadLetter
from proto.events import Event

# file name -> (title, type)
MESSAGES: dict[str, tuple[str, Any]] = {
    "commands": ("A command on SESSION_CMDS (tagged by `type`)", Command),
    "events": ("An event on SESSION_EVENTS (tagged by `type`)", Event),
    "dead_letter": ("A dead letter on SESSION_DLQ", DeadLetter),
    "connection_changed": ("A connection snapshot on CONNECTION_CHANGES", ConnectionChanged),
}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def build() -> dict[str, dict[str, Any]]:
    """file name -> its JSON Schema (draft 2020-12), definitions inline."""
    out = {}
    for name, (title, kind) in MESSAGES.items():
        schema = msgspec.json.schema(kind)
        out[name] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": title,
            **schema,
        }
    return out


def render(schema: dict[str, Any]) -> str:
    return msgspec.json.format(msgspec.json.encode(schema), indent=2).decode() + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in build().items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(schema))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path, file=sys.stderr)
