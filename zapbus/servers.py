"""The Baileys servers of a deployment: ``ZAPBUS_BAILEYS_URLS`` (or the single
``ZAPBUS_BAILEYS_URL``, a pool of one), parsed into named specs.

``ZAPBUS_BAILEYS_URLS`` is a comma-separated list of ``name=url``; a bare ``url`` is named by
its ``host:port``. Every server uses ``ZAPBUS_BAILEYS_API_KEY`` unless
``ZAPBUS_BAILEYS_API_KEYS`` (``name=key,...``) gives it its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

_NAME = re.compile(r"^[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]{0,62}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """One Baileys server of the pool (its key never shows in a repr)."""

    name: str
    url: str
    api_key: str = field(default="", repr=False)

    @property
    def public_url(self) -> str:
        """The URL without credentials, query or fragment (fit for logs, metrics, the CLI)."""
        return public_url(self.url)


def public_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _checked_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError as exc:
        host = parts.hostname or "?"
        raise ValueError(f"{where}: bad port in the URL of {host} ({exc})") from exc
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{where}: {public_url(url)!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        # routes are appended to the base URL: a query or fragment would swallow them
        raise ValueError(f"{where}: the URL of {public_url(url)!r} has a query or fragment")
    return url


def default_name(url: str) -> str:
    """A bare URL's name: its ``host:port`` (the scheme's port when none is given)."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pairs(text: str, what: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        head, sep, tail = item.partition("=")
        # "name=url": the name has no "/" or ":" before the "=" that a URL would have
        if sep and "/" not in head and "://" not in head:
            if not head.strip():
                raise ValueError("an item starts with '=' (no name before it)")
            out.append((head.strip(), tail.strip()))
        elif what == "url":
            out.append((None, item))
        else:
            raise ValueError("expected name=key items")
    return out


def _same_server(a: str, b: str) -> bool:
    def key(url: str) -> tuple[str, str, int, str]:
        p = urlsplit(url)
        port = p.port or _DEFAULT_PORTS.get(p.scheme, 0)
        return (p.scheme, (p.hostname or "").lower(), port, p.path.rstrip("/"))

    return key(a) == key(b)


def parse_servers(
    urls: str, single_url: str, api_key: str, api_keys: str = ""
) -> tuple[ServerSpec, ...]:
    """The pool from ``ZAPBUS_BAILEYS_URLS`` (when not empty) or ``ZAPBUS_BAILEYS_URL``.
    Raises ValueError saying what is wrong (never with a key in the message)."""
    keys: dict[str, str] = {}
    try:
        pairs = _pairs(api_keys, "key")
    except ValueError as exc:
        raise ValueError(f"ZAPBUS_BAILEYS_API_KEYS: {exc}") from None
    for name, key in pairs:
        assert name is not None
        if name in keys:
            raise ValueError(f"ZAPBUS_BAILEYS_API_KEYS: server name {name!r} appears twice")
        keys[name] = key
    specs: list[ServerSpec] = []
    if urls.strip():
        try:
            items = _pairs(urls, "url")
        except ValueError as exc:
            raise ValueError(f"ZAPBUS_BAILEYS_URLS: {exc}") from None
        for name, url in items:
            _checked_url(url, "ZAPBUS_BAILEYS_URLS")
            name = name or default_name(url)
            if not _NAME.match(name):
                raise ValueError(
                    f"ZAPBUS_BAILEYS_URLS: server name {name!r} must be 1-63 letters, digits"
                    " or . _ : - (starting with a letter or digit)"
                )
            if any(s.name == name for s in specs):
                raise ValueError(f"ZAPBUS_BAILEYS_URLS: server name {name!r} appears twice")
            same = next((s for s in specs if _same_server(s.url, url)), None)
            if same is not None:
                raise ValueError(
                    f"ZAPBUS_BAILEYS_URLS: {name!r} and {same.name!r} are the same server"
                    f" ({public_url(url)}): it would count twice"
                )
            specs.append(ServerSpec(name=name, url=url, api_key=keys.get(name, api_key)))
        if not specs:
            raise ValueError("ZAPBUS_BAILEYS_URLS: no server given")
    else:
        _checked_url(single_url, "ZAPBUS_BAILEYS_URL")
        name = default_name(single_url)
        specs.append(ServerSpec(name=name, url=single_url, api_key=keys.get(name, api_key)))
    unknown = set(keys) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"ZAPBUS_BAILEYS_API_KEYS: no server named {', '.join(sorted(unknown))}")
    return tuple(specs)
