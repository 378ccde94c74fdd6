"""Typed app keys of the gateway's long-lived objects (own module: no import cycles)."""

from aiohttp import web

from services.gateway.live import ChangeHub
from services.gateway.qr import QrRenderer
from services.gateway.sse import StreamSlots
from zapbus.relay import OutboxRelay

relay_key = web.AppKey("outbox_relay", OutboxRelay)
hub_key = web.AppKey("change_hub", ChangeHub)
qr_renderer_key = web.AppKey("qr_renderer", QrRenderer)
stream_slots_key = web.AppKey("stream_slots", StreamSlots)
