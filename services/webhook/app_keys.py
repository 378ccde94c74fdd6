"""Typed state of the webhook app."""

from aiohttp import web

from zapbus.batchpub import GroupCommit
from zapbus.dialects.base import Dialect

# The configured Baileys server dialect: parses its webhooks, fetches a QR it does not push.
dialect_key = web.AppKey("dialect", Dialect)
# One dialect per server of the pool (by name), for the QR fetch: the one the session is on.
server_dialects_key = web.AppKey("server_dialects", dict[str, Dialect])
# Concurrent requests' events go to JetStream together, one atomic batch per round.
publisher_key = web.AppKey("publisher", GroupCommit)
