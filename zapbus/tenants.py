"""Tenants and their API keys (stored as sha256; the key itself is shown once)."""

from __future__ import annotations

import unicodedata
import uuid

import asyncpg
import msgspec

from zapbus.tokens import hash_api_key, new_api_key

# Control and format characters, and line/paragraph separators: never in a tenant name.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str


def check_tenant_name(name: str) -> str:
    """``name`` if it can name a tenant: not blank, without control or format characters
    (newlines, escapes, bidi overrides); else ValueError saying why."""
    if not name.strip():
        raise ValueError("a tenant name must not be empty or blank")
    bad = next((ch for ch in name if unicodedata.category(ch) in _UNPRINTABLE), None)
    if bad is not None:
        raise ValueError(f"a tenant name must not hold control characters (found {bad!r})")
    return name


async def create_tenant(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, api_key: str | None = None
) -> tuple[Tenant, str]:
    """Create a tenant; return it and its API key (a new random one unless given).
    ValueError for a name ``check_tenant_name`` refuses."""
    check_tenant_name(name)
    key = api_key or new_api_key()
    tenant = Tenant(id=uuid.uuid4(), name=name)
    await conn.execute(
        "INSERT INTO tenants (id, name, api_key_hash) VALUES ($1, $2, $3)",
        tenant.id,
        name,
        hash_api_key(key),
    )
    return tenant, key


async def ensure_tenant(conn: asyncpg.Connection | asyncpg.Pool, name: str, api_key: str) -> Tenant:
    """Create the tenant with this key, or give an existing one of that name this key."""
    row = await conn.fetchrow(
        "INSERT INTO tenants (id, name, api_key_hash) VALUES ($1, $2, $3)"
        " ON CONFLICT (name) DO UPDATE SET api_key_hash = EXCLUDED.api_key_hash"
        " RETURNING id, name",
        uuid.uuid4(),
        name,
        hash_api_key(api_key),
    )
    return Tenant(id=row["id"], name=row["name"])


async def rotate_key(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> str | None:
    """Give a tenant a new key (the old one stops working at once); None if no such tenant."""
    key = new_api_key()
    done = await conn.execute(
        "UPDATE tenants SET api_key_hash = $2 WHERE name = $1", name, hash_api_key(key)
    )
    return key if done.endswith(" 1") else None


async def list_tenants(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT t.name, t.id, t.created_at, count(c.id) AS connections FROM tenants t"
            " LEFT JOIN connections c ON c.tenant_id = t.id GROUP BY t.id ORDER BY t.name"
        )
    )


async def tenant_for_key(conn: asyncpg.Connection | asyncpg.Pool, api_key: str) -> Tenant | None:
    row = await conn.fetchrow(
        "SELECT id, name FROM tenants WHERE api_key_hash = $1", hash_api_key(api_key)
    )
    return Tenant(id=row["id"], name=row["name"]) if row else None
