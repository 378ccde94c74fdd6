"""Typed app keys of the gateway's long-lived objects (own module: no import cycles)."""

from aiohttp import web

from services.gateway.live import ChangeHub
from services.gateway.outbox import OutboxRelay

relay_key = web.AppKey("outbox_relay", OutboxRelay)
hub_key = web.AppKey("change_hub", ChangeHub)
