"""Administrative operations on tenants, accounts, providers and routing rules.

Each function takes an open connection and runs inside the caller's transaction, so a
CLI command either writes everything or nothing. Mistakes become NotFoundError or
ConflictError with one line naming what is wrong; secrets arrive already hashed or
encrypted and never leave as plain text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from smtpproxy.db.queries import Q
from smtpproxy.delivery import providers
from smtpproxy.domains import GlobError, validate_glob
from smtpproxy.errors import ConflictError, NotFoundError, UsageError

Conn = psycopg.Connection[Any]
Row = dict[str, Any]


def _one(conn: Conn, query: Any, params: Any) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchone()


def _all(conn: Conn, query: Any, params: Any) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def _insert(conn: Conn, query: Any, params: Sequence[object], what: str) -> int:
    try:
        with conn.transaction():
            row = conn.execute(query, params).fetchone()
    except psycopg.errors.UniqueViolation:
        raise ConflictError(f"{what} already exists") from None
    except psycopg.errors.CheckViolation:
        raise UsageError(
            f"{what}: invalid name (use letters, digits, '.', '_' and '-', up to 63 characters)"
        ) from None
    assert row is not None
    return int(str(row[0]))


# -- tenants ---------------------------------------------------------------------------


def tenant(conn: Conn, name: str) -> Row:
    row = _one(conn, Q.tenant_by_name, (name,))
    if row is None:
        raise NotFoundError(f"no tenant named {name!r}")
    return row


def add_tenant(conn: Conn, name: str, monthly_limit: int | None = None) -> int:
    if monthly_limit is not None and monthly_limit < 0:
        raise UsageError("--monthly-limit must not be negative")
    return _insert(conn, Q.tenant_insert, (name, monthly_limit), f"tenant {name!r}")


def list_tenants(conn: Conn) -> list[Row]:
    return _all(conn, Q.tenant_list, ())


# -- accounts --------------------------------------------------------------------------


def normalise_domains(domains: Sequence[str]) -> list[str]:
    out = []
    for d in domains:
        try:
            out.append(validate_glob(d))
        except GlobError as exc:
            raise UsageError(str(exc)) from None
    return sorted(set(out))


def add_account(
    conn: Conn, username: str, tenant_name: str, password_hash: str, domains: Sequence[str]
) -> int:
    if not username or len(username) > 255 or any(c.isspace() for c in username):
        raise UsageError("username must be 1-255 characters without spaces")
    t = tenant(conn, tenant_name)
    return _insert(
        conn,
        Q.account_insert,
        (t["id"], username, password_hash, normalise_domains(domains)),
        f"account {username!r}",
    )


def list_accounts(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.account_list, {"tenant": tenant_name})


def account(conn: Conn, username: str) -> Row:
    row = _one(conn, Q.account_by_username, (username,))
    if row is None:
        raise NotFoundError(f"no account named {username!r}")
    return row


# -- providers -------------------------------------------------------------------------


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings; values that read as JSON numbers or booleans become them."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {pair!r}: expected key=value")
        low = value.strip().lower()
        parsed: Any = value
        if low in ("true", "false"):
            parsed = low == "true"
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out[key.strip()] = parsed
    return out


def add_provider(
    conn: Conn,
    tenant_name: str,
    name: str,
    ptype: str,
    *,
    endpoint: str | None,
    settings: Mapping[str, Any],
    secret: str | None,
    encrypt: Any,
) -> int:
    """Validate the provider against its type, then store it (secret encrypted)."""
    t = tenant(conn, tenant_name)
    if endpoint is not None and "://" not in endpoint:
        raise UsageError(f"--endpoint {endpoint!r}: expected a URL such as https://host")
    spec = providers.ProviderSpec(
        name=name, type=ptype, settings=dict(settings), endpoint=endpoint, secret=secret
    )
    try:
        providers.provider_type(ptype).validate(spec)
    except providers.ProviderConfigError as exc:
        raise UsageError(str(exc)) from None
    token = encrypt(secret) if secret else None
    return _insert(
        conn,
        Q.provider_insert,
        (t["id"], name, ptype, endpoint, Jsonb(dict(settings)), token),
        f"provider {name!r} of tenant {tenant_name!r}",
    )


def list_providers(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.provider_list, {"tenant": tenant_name})


def provider(conn: Conn, tenant_name: str, name: str) -> Row:
    tenant(conn, tenant_name)
    row = _one(conn, Q.provider_by_name, (tenant_name, name))
    if row is None:
        raise NotFoundError(f"tenant {tenant_name!r} has no provider named {name!r}")
    return row


# -- routes ----------------------------------------------------------------------------


def add_route(
    conn: Conn,
    tenant_name: str,
    provider_name: str,
    *,
    priority: int | None,
    sender_domain: str | None,
    recipient_domain: str | None,
    account_name: str | None,
    fallbacks: Sequence[str] = (),
) -> int:
    t = tenant(conn, tenant_name)
    p = provider(conn, tenant_name, provider_name)
    fallback_ids = [provider(conn, tenant_name, f)["id"] for f in fallbacks]
    account_id = None
    if account_name is not None:
        a = account(conn, account_name)
        if a["tenant_id"] != t["id"]:
            raise UsageError(f"account {account_name!r} belongs to tenant {a['tenant']!r}")
        account_id = a["id"]
    try:
        sender = validate_glob(sender_domain) if sender_domain else None
        recipient = validate_glob(recipient_domain) if recipient_domain else None
    except GlobError as exc:
        raise UsageError(str(exc)) from None
    if priority is None:
        row = conn.execute(Q.route_next_priority, (t["id"],)).fetchone()
        priority = int(str(row[0])) if row else 10
    return _insert(
        conn,
        Q.route_insert,
        (t["id"], priority, sender, recipient, account_id, p["id"], fallback_ids),
        "route",
    )


def list_routes(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.route_list, {"tenant": tenant_name})
