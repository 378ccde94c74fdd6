"""Typed state of the simulator app."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import SimConfig
from .dialects.base import SimDialect
from .metrics import SimMetrics
from .sessions import SessionRegistry

CONFIG_KEY = web.AppKey("config", SimConfig)
METRICS_KEY = web.AppKey("metrics", SimMetrics)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
REGISTRY_KEY = web.AppKey("registry", SessionRegistry)
DIALECT_KEY = web.AppKey("dialect", SimDialect)
