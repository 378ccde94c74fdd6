"""The ``/v1/webhooks`` part of the gateway's OpenAPI document (merged by openapi.py)."""

from __future__ import annotations

from typing import Any

from services.gateway.webhook_models import (
    ConnectionEvent,
    CreateWebhook,
    DeliveryAttempts,
    QueuedDelivery,
    WebhookEndpoint,
    WebhookEndpointList,
    WebhookEndpointWithSecret,
)

WEBHOOK_TYPES: list[Any] = [
    CreateWebhook,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
    WebhookEndpointList,
    DeliveryAttempts,
    QueuedDelivery,
    ConnectionEvent,
]
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": _PROBLEM}


def _json(description: str, schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_AUTH = {
    "401": _problem("missing or unknown API key"),
    "403": _problem("a client token, which only reads its connection"),
    "503": _problem("dependency down; retry"),
}
_FOUND = {**_AUTH, "404": _problem("no such webhook endpoint (or delivery) for this tenant")}


def webhook_paths() -> dict[str, Any]:
    return {
        "/v1/webhooks": {
            "post": {
                "summary": "Add an endpoint; the answer holds its signing secret (only here)",
                "operationId": "createWebhook",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CreateWebhook"}
                        }
                    },
                },
                "responses": {
                    "201": _json("the endpoint, with its secret", "WebhookEndpointWithSecret"),
                    "400": _problem("malformed JSON"),
                    "409": _problem("too many endpoints"),
                    "413": _problem("body too large"),
                    "422": _problem("invalid body, or a URL refused (private address, not https)"),
                    **_AUTH,
                },
            },
            "get": {
                "summary": "The tenant's endpoints",
                "operationId": "listWebhooks",
                "responses": {"200": _json("the endpoints", "WebhookEndpointList"), **_AUTH},
            },
        },
        "/v1/webhooks/{id}": {
            "parameters": [_ID],
            "get": {
                "summary": "One endpoint (enabled, or disabled with the reason)",
                "operationId": "getWebhook",
                "responses": {"200": _json("the endpoint", "WebhookEndpoint"), **_FOUND},
            },
            "delete": {
                "summary": "Remove the endpoint and its deliveries",
                "operationId": "deleteWebhook",
                "responses": {"204": {"description": "removed"}, **_FOUND},
            },
        },
        "/v1/webhooks/{id}/rotate-secret": {
            "parameters": [_ID],
            "post": {
                "summary": "A new secret; the old one keeps signing beside it for 24 h",
                "operationId": "rotateWebhookSecret",
                "responses": {
                    "200": _json("the endpoint, with its new secret", "WebhookEndpointWithSecret"),
                    **_FOUND,
                },
            },
        },
        "/v1/webhooks/{id}/test": {
            "parameters": [_ID],
            "post": {
                "summary": "Queue a webhook.test event to the endpoint",
                "operationId": "testWebhook",
                "responses": {"202": _json("queued", "QueuedDelivery"), **_FOUND},
            },
        },
        "/v1/webhooks/{id}/deliveries": {
            "parameters": [_ID],
            "get": {
                "summary": "Every delivery attempt, newest first",
                "operationId": "listWebhookDeliveries",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"enum": ["pending", "succeeded", "given_up"]},
                        "description": "only attempts of deliveries in this state",
                    },
                ],
                "responses": {
                    "200": _json("a page of attempts", "DeliveryAttempts"),
                    "400": _problem("bad limit, cursor or state"),
                    **_FOUND,
                },
            },
        },
        "/v1/webhooks/{id}/deliveries/{webhook_id}/replay": {
            "parameters": [
                _ID,
                {
                    "name": "webhook_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                },
            ],
            "post": {
                "summary": "Send a given-up delivery again (same webhook-id); enables the endpoint",
                "operationId": "replayWebhookDelivery",
                "responses": {
                    "202": _json("queued again", "QueuedDelivery"),
                    "409": _problem("the delivery was not given up on"),
                    **_FOUND,
                },
            },
        },
    }


def webhook_events() -> dict[str, Any]:
    """The document's ``webhooks``: what zapbus sends to an endpoint (README, Webhooks)."""
    return {
        "connectionEvent": {
            "post": {
                "summary": "connection.status, .qr, .pairing_code or .deleted; signed"
                " (webhook-id, webhook-timestamp, webhook-signature)",
                "operationId": "connectionEvent",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ConnectionEvent"}
                        }
                    },
                },
                "responses": {
                    "2XX": {"description": "received; other answers are retried or given up"}
                },
            }
        }
    }
