"""Providers of a tenant: add (settings validated by their type), list, update, enable
and disable, delete (only when no routing rule or live message needs them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from smtpproxy.admin.common import (
    PROVIDER,
    Confirm,
    Row,
    changed,
    insert,
    no_confirm,
    plural,
)
from smtpproxy.admin.tenants import (
    tenant,
)
from smtpproxy.db.pool import Conn, one, rows
from smtpproxy.db.queries import Q
from smtpproxy.delivery import providers
from smtpproxy.errors import ConflictError, NotFoundError, UsageError


def _provider_target(tenant_name: str, name: str) -> str:
    return f"{tenant_name}/{name}"


def _provider_view(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in ("tenant", "name", "type", "endpoint", "settings", "enabled")}
    out["secret"] = "stored" if row["has_secret"] else None  # masked by audit.record
    return out


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


def _check_endpoint(endpoint: str | None) -> None:
    if endpoint is not None and "://" not in endpoint:
        raise UsageError(f"--endpoint {endpoint!r}: expected a URL such as https://host")


def _validate(spec: providers.ProviderSpec) -> None:
    """Setting names, required settings and the secret, then the values: the provider is
    built (no connection is made) so a bad region or timeout is refused now, not at the
    first delivery."""
    try:
        providers.build(spec)
    except providers.ProviderConfigError as exc:
        raise UsageError(str(exc)) from None


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
    with conn.transaction():
        t = tenant(conn, tenant_name)
        _check_endpoint(endpoint)
        _validate(
            providers.ProviderSpec(
                name=name, type=ptype, settings=dict(settings), endpoint=endpoint, secret=secret
            )
        )
        token = encrypt(secret) if secret else None
        pid = insert(
            conn,
            Q.provider_insert,
            (t["id"], name, ptype, endpoint, Jsonb(dict(settings)), token),
            f"provider {name!r} of tenant {tenant_name!r}",
        )
        after = {
            "tenant": tenant_name,
            "name": name,
            "type": ptype,
            "endpoint": endpoint,
            "settings": dict(settings),
            "enabled": True,
            "secret": "stored" if token else None,
        }
        changed(conn, [PROVIDER], "provider.add", _provider_target(tenant_name, name), after=after)
    return pid


def list_providers(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return rows(conn, Q.provider_list, {"tenant": tenant_name})


def provider(conn: Conn, tenant_name: str, name: str, *, lock: bool = False) -> Row:
    tenant(conn, tenant_name)
    row = one(conn, Q.provider_lock if lock else Q.provider_by_name, (tenant_name, name))
    if row is None:
        raise NotFoundError(f"tenant {tenant_name!r} has no provider named {name!r}")
    return row


def update_provider(
    conn: Conn,
    tenant_name: str,
    name: str,
    *,
    endpoint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    unset: Sequence[str] = (),
    secret: str | None = None,
    encrypt: Any = None,
) -> tuple[Row, Row]:
    """Change a provider's endpoint (an empty string restores the type's default),
    settings (set and unset keys) or secret; validated as a whole against its type.
    Returns (before, after) as audit views; both equal when nothing changed."""
    settings = dict(settings or {})
    if endpoint is None and not settings and not unset and secret is None:
        raise UsageError("nothing to change: give --endpoint, --set, --unset or --secret-stdin")
    both = sorted(set(settings) & set(unset))
    if both:
        raise UsageError(f"setting {both[0]!r} is both set and unset")
    with conn.transaction():
        p = provider(conn, tenant_name, name, lock=True)
        new_settings = dict(p["settings"] or {})
        for key in unset:
            if key not in new_settings:
                raise UsageError(f"provider {name!r} has no setting {key!r} to unset")
            del new_settings[key]
        new_settings.update(settings)
        new_endpoint = p["endpoint"] if endpoint is None else (endpoint or None)
        _check_endpoint(new_endpoint)
        _validate(
            providers.ProviderSpec(
                name=name,
                type=p["type"],
                settings=new_settings,
                endpoint=new_endpoint,
                # validation only asks whether there is one; the stored one is not decrypted
                secret=secret if secret is not None else ("stored" if p["has_secret"] else None),
            )
        )
        before = _provider_view(p)
        after = {
            **before,
            "endpoint": new_endpoint,
            "settings": new_settings,
            "secret": "stored" if (secret or p["has_secret"]) else None,
        }
        if before == after and secret is None:
            return before, after
        if secret is not None:
            after["secret_changed"] = True  # a boolean: kept by audit.mask, tells it changed
        conn.execute(
            Q.provider_update,
            {
                "id": p["id"],
                "endpoint": new_endpoint,
                "settings": Jsonb(new_settings),
                "secret": encrypt(secret) if secret is not None else None,
            },
        )
        changed(
            conn,
            [PROVIDER],
            "provider.update",
            _provider_target(tenant_name, name),
            before=before,
            after=after,
        )
    return before, after


def set_provider_enabled(conn: Conn, tenant_name: str, name: str, enabled: bool) -> bool:
    """Enable or disable a provider; False when it already was."""
    with conn.transaction():
        p = provider(conn, tenant_name, name, lock=True)
        if p["enabled"] == enabled:
            return False
        conn.execute(Q.provider_set_enabled, (enabled, p["id"]))
        before = _provider_view(p)
        changed(
            conn,
            [PROVIDER],
            "provider.enable" if enabled else "provider.disable",
            _provider_target(tenant_name, name),
            before=before,
            after={**before, "enabled": enabled},
        )
    return True


def provider_rules(conn: Conn, provider_id: int) -> list[Row]:
    """The routing rules that use a provider, as their provider or as a fallback."""
    return rows(conn, Q.provider_rules, {"id": provider_id})


def _deletable_provider(conn: Conn, tenant_name: str, name: str, *, lock: bool) -> Row:
    p = provider(conn, tenant_name, name, lock=lock)
    rules = provider_rules(conn, p["id"])
    if rules:
        used = ", ".join(
            f"#{r['id']} (priority {r['priority']}, "
            f"{'provider' if r['as_provider'] else 'fallback'})"
            for r in rules
        )
        raise ConflictError(
            f"provider {name!r} of tenant {tenant_name!r} is used by routing "
            f"{'rule' if len(rules) == 1 else 'rules'} {used}: "
            "delete or change those first"
        )
    row = conn.execute(Q.provider_live_overrides, (p["tenant_id"], name)).fetchone()
    overrides = int(row[0]) if row else 0
    if overrides:
        raise ConflictError(
            f"provider {name!r} of tenant {tenant_name!r} still has "
            f"{plural(overrides, 'live message')} sent to it with --to-provider"
        )
    return p


def delete_provider(conn: Conn, tenant_name: str, name: str, confirm: Confirm = no_confirm) -> Row:
    """Delete a provider no routing rule uses and no live message was redirected to."""
    with conn.transaction():
        p = _deletable_provider(conn, tenant_name, name, lock=False)
        # ask before taking locks; check again after
        confirm(f"Delete provider {name!r} ({p['type']}) of tenant {tenant_name!r}?")
        p = _deletable_provider(conn, tenant_name, name, lock=True)
        conn.execute(Q.provider_delete, (p["id"],))
        changed(
            conn,
            [PROVIDER],
            "provider.delete",
            _provider_target(tenant_name, name),
            before=_provider_view(p),
        )
    return p


def provider_spec(
    conn: Conn, tenant_name: str, name: str, decrypt: Callable[[bytes], str]
) -> providers.ProviderSpec:
    """The spec the delivery service would build for this provider, secret decrypted
    (as delivery/directory.py does). Reads the secret column: operator and admin only."""
    p = provider(conn, tenant_name, name)
    row = conn.execute(Q.provider_secret, (p["id"],)).fetchone()
    token = row[0] if row else None
    return providers.ProviderSpec(
        name=p["name"],
        type=p["type"],
        settings=p["settings"] or {},
        endpoint=p["endpoint"],
        secret=decrypt(token) if token is not None else None,
        tenant_id=p["tenant_id"],
        enabled=p["enabled"],
    )
