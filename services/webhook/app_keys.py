"""Typed state of the webhook app."""

from aiohttp import web

from zapbus.dialects.base import Dialect

# The configured Baileys server dialect: parses its webhooks, fetches a QR it does not push.
dialect_key = web.AppKey("dialect", Dialect)
