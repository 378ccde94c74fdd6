"""The OpenAPI 3.1 document of the gateway, built from the msgspec types it answers with."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from proto.states import Status
from services.gateway.models import (
    ClientTokenIssued,
    ClientTokenRequest,
    Connection,
    ConnectionList,
    CreateConnection,
    History,
    Problem,
    QrCode,
    RecreateConnection,
)
from services.gateway.openapi_webhooks import WEBHOOK_TYPES, webhook_events, webhook_paths
from services.gateway.sse import LiveEvent
from zapbus.httpkit import json_response

_REF = "#/components/schemas/{name}"
PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    }
    if headers:
        out["headers"] = headers
    return out


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        out["headers"] = headers
    return out


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_AUTH = {
    "401": _problem(
        "missing or unknown API key, or an expired or forged client token",
        {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "the Bearer scheme"}},
    ),
    "403": _problem("a client token, which only reads its connection (GET, /qr, /events)"),
    "503": _problem(
        "dependency down; retry",
        {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}},
    ),
}
_FOUND = {**_AUTH, "404": _problem("no such connection for this tenant")}
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the connection's URL"}}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}}
# the three routes a client token reads: as Bearer, or here (for <img src> and EventSource)
_TOKEN = {
    "name": "token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "a client token (POST .../client-token), when no Authorization is sent",
}


def build() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            CreateConnection,
            RecreateConnection,
            Connection,
            ConnectionList,
            History,
            QrCode,
            Problem,
            LiveEvent,
            ClientTokenRequest,
            ClientTokenIssued,
            *WEBHOOK_TYPES,
        ],
        ref_template=_REF,
    )
    # The models keep ``status`` a plain str; the document names the values it takes.
    statuses = [s.value for s in Status]
    for name in ("Connection", "LiveEvent"):
        components[name]["properties"]["status"]["enum"] = statuses
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": "same key and body: the same connection, never a second one",
    }
    paths: dict[str, Any] = {
        "/v1/connections": {
            "post": {
                "summary": "Create a connection; answers at once, the session follows",
                "operationId": "createConnection",
                "parameters": [idem],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CreateConnection")}},
                },
                "responses": {
                    "202": _json("accepted", "Connection", _LOCATION),
                    "400": _problem("malformed JSON or Idempotency-Key"),
                    "409": _problem(
                        "phone-in-use: on a server keyed by phone number (fazer), a live"
                        " connection of the tenant already uses phone_number (connection_id"
                        " names it); nothing was sent to the server"
                    ),
                    "413": _problem("body too large"),
                    "422": _problem(
                        "invalid body (on fazer, phone_number is required), or"
                        " Idempotency-Key reused with another body"
                    ),
                    **_AUTH,
                },
            },
            "get": {
                "summary": "List connections, newest first",
                "operationId": "listConnections",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json("a page", "ConnectionList"),
                    "400": _problem("bad limit or cursor"),
                    **_AUTH,
                },
            },
        },
        "/v1/connections/{id}": {
            "parameters": [_ID],
            "get": {
                "summary": "One connection",
                "operationId": "getConnection",
                "parameters": [_TOKEN],
                "responses": {"200": _json("the connection", "Connection"), **_FOUND},
            },
            "delete": {
                "summary": "Delete the connection and its Baileys session",
                "operationId": "deleteConnection",
                "responses": {"202": _json("marked deleted", "Connection"), **_FOUND},
            },
        },
        "/v1/connections/{id}/recreate": {
            "parameters": [_ID],
            "post": {
                "summary": "Start the next generation with a new session",
                "operationId": "recreateConnection",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RecreateConnection")}},
                },
                "responses": {
                    "202": _json("next generation pending", "Connection", _LOCATION),
                    "400": _problem("malformed JSON"),
                    "409": _problem(
                        "the connection was deleted; or phone-in-use (fazer: another live"
                        " connection of the tenant uses the phone number)"
                    ),
                    "422": _problem("invalid body, or a login the server cannot do"),
                    **_FOUND,
                },
            },
        },
        "/v1/connections/{id}/pairing-code": {
            "parameters": [_ID],
            "post": {
                "summary": "Ask for a new pairing code (code login, before it is linked)",
                "operationId": "requestPairingCode",
                "responses": {
                    "202": _json("a new code is on its way", "Connection"),
                    "409": _problem("not code login, or not waiting to be linked"),
                    "429": _problem("asked too recently", _RETRY_AFTER),
                    **_FOUND,
                },
            },
        },
        "/v1/connections/{id}/history": {
            "parameters": [_ID],
            "get": {
                "summary": "Every event and transition, oldest first, a page at a time",
                "operationId": "getHistory",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        "description": "entries per page (default 100)",
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json("a page of the history", "History"),
                    "400": _problem("bad limit or cursor"),
                    **_FOUND,
                },
            },
        },
        "/v1/connections/{id}/qr": {
            "parameters": [_ID],
            "get": {
                "summary": "The current QR code as JSON, SVG or PNG (by Accept)",
                "operationId": "getQr",
                "parameters": [_TOKEN],
                "responses": {
                    "200": {
                        "description": "the QR code",
                        "content": {
                            "application/json": {"schema": _ref("QrCode")},
                            "image/svg+xml": {"schema": {"type": "string"}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "406": _problem("none of JSON, SVG, PNG is acceptable"),
                    "409": _problem("no QR code now (status_now says why)"),
                    **_FOUND,
                },
            },
        },
        "/v1/connections/{id}/events": {
            "parameters": [
                _ID,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "get": {
                "summary": "Server-Sent Events: `status` and `qr` (data: LiveEvent), resumable",
                "operationId": "streamEvents",
                "parameters": [_TOKEN],
                "responses": {
                    "200": {
                        "description": "an event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "429": _problem(
                        "too many open event streams for this tenant, or for client tokens"
                        " of this connection",
                        {
                            "Retry-After": {
                                "schema": {"type": "string"},
                                "description": "seconds to wait",
                            }
                        },
                    ),
                    **_FOUND,
                },
            },
        },
    }
    paths["/v1/connections/{id}/client-token"] = {
        "parameters": [_ID],
        "post": {
            "summary": "A client token: reads only this connection (GET, /qr, /events) until"
            " it expires (at most 24 h); as Bearer or ?token=, and the /connect/{token} page",
            "operationId": "createClientToken",
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": _ref("ClientTokenRequest")}},
            },
            "responses": {
                "200": _json("the token", "ClientTokenIssued"),
                "400": _problem("malformed JSON"),
                "409": _problem("the connection was deleted"),
                "413": _problem("body too large"),
                "422": _problem("invalid body: ttl_seconds from 1 to 86400"),
                **_FOUND,
            },
        },
    }
    paths.update(webhook_paths())
    _document_nul(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "zapbus gateway",
            "version": "1",
            "description": "WhatsApp (Baileys) connections: create, follow, recreate, delete.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "webhooks": webhook_events(),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _document_nul(paths: dict[str, Any]) -> None:
    """Every operation answers 400 to a NUL in its path or query (httpkit.refuse_nul)."""
    nul = "a NUL character (%00) in the path or query"
    for item in paths.values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue  # the path's own parameters
            responses = operation["responses"]
            if "400" in responses:
                responses["400"] = {
                    **responses["400"],
                    "description": f"{responses['400']['description']}; or {nul}",
                }
            else:
                responses["400"] = _problem(nul)


_DOCUMENT = build()


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(_DOCUMENT)
