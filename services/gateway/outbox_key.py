"""Typed app key of the outbox relay (its own module so handlers need not import the relay)."""

from aiohttp import web

from services.gateway.outbox import OutboxRelay

relay_key = web.AppKey("outbox_relay", OutboxRelay)
