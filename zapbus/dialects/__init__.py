"""Baileys server dialects: one module per server, chosen by ``ZAPBUS_BAILEYS_KIND``.

See ``base.py`` for the interface. Adding a server is adding ``<kind>.py`` with one ``Dialect``
subclass and naming it in ``KINDS``.
"""

from __future__ import annotations

import importlib

import aiohttp

from zapbus.dialects.base import Dialect

KINDS = ("seed", "evolution", "waha", "fazer")


def dialect_class(kind: str) -> type[Dialect]:
    """The Dialect subclass of ``kind`` (ValueError naming the known kinds otherwise)."""
    if kind not in KINDS:
        raise ValueError(f"unknown Baileys server kind {kind!r}; known: {', '.join(KINDS)}")
    module = importlib.import_module(f"zapbus.dialects.{kind}")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Dialect)
        and value is not Dialect
        and getattr(value, "kind", None) == kind
    ]
    assert len(found) == 1, f"zapbus.dialects.{kind} must define one Dialect of kind {kind!r}"
    return found[0]


def make_dialect(
    kind: str, http: aiohttp.ClientSession, base_url: str, api_key: str, timeout_seconds: float
) -> Dialect:
    return dialect_class(kind)(http, base_url, api_key, timeout_seconds)
