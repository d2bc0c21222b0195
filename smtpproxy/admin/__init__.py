"""Administrative operations on tenants, accounts, providers and routing rules.

Each function takes an open connection and runs inside the caller's transaction (in a
savepoint of its own), so a CLI command either writes everything or nothing. Mistakes
become NotFoundError or ConflictError with one line naming what is wrong; secrets arrive
already hashed or encrypted and never leave as plain text.

Every change also, in the same transaction:
- appends an audit_log row (smtpproxy.audit.record) with secrets masked and without
  password hashes, and
- sends `NOTIFY smtpproxy_config, '<kind>'` (kind: tenant, account, provider, route), so
  running instances reload their configuration as soon as the change commits.

Deleting follows one rule: nothing is deleted that something else still needs.
- A tenant is deleted only when it has no accounts, providers, routes or messages left.
- An account is never deleted while it has live (queued, retrying, sending) messages,
  or while a device sends as it (smtpproxy.admin_devices).
  Its finished messages are kept too unless the caller asks for with_history, which
  deletes them with their delivery logs (their bodies become orphans that
  `fsck-storage` removes). Routing rules limited to the account go with it.
- A provider is deleted only when no routing rule uses it, as provider or fallback, and
  no live message was sent to it with `dlq retry --to-provider`.
Destructive functions take a `confirm(description)` callback, called after every check
has passed and before anything is deleted; it raises to cancel.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from smtpproxy import audit
from smtpproxy.db.queries import Q
from smtpproxy.delivery import providers
from smtpproxy.domains import GlobError, validate_glob
from smtpproxy.errors import ConflictError, NotFoundError, UsageError
from smtpproxy.ingress.limits import Rate

Conn = psycopg.Connection[Any]
Row = dict[str, Any]
Confirm = Callable[[str], None]

CHANNEL = "smtpproxy_config"
TENANT, ACCOUNT, PROVIDER, ROUTE = "tenant", "account", "provider", "route"
LIVE_STATUSES = ("queued", "retrying", "sending")


def _one(conn: Conn, query: Any, params: Any) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchone()


def _all(conn: Conn, query: Any, params: Any) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


class Unset(enum.Enum):
    """Marks an optional change that was not asked for (None means "clear it")."""

    UNSET = "unset"


UNSET = Unset.UNSET


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


def _changed(
    conn: Conn,
    kinds: Sequence[str],
    action: str,
    target: str,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Record one change: its audit row and the reload notifications."""
    audit.record(conn, action, target, before=before, after=after)
    for kind in kinds:
        conn.execute(Q.notify_config, (kind,))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _no_confirm(description: str) -> None:
    del description


# -- permissions -----------------------------------------------------------------------


class PermissionDenied(UsageError):
    """The connected database role lacks a privilege the command needs."""


def permission_denied(doing: str, role: str, user: str) -> PermissionDenied:
    """The one line a user sees when their database role may not do something."""
    return PermissionDenied(
        f"permission denied: your database role cannot {doing}; "
        f"ask an admin to run `smtpproxy db grant --role {role} {user}`"
    )


# -- tenants ---------------------------------------------------------------------------


def _tenant_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in ("name", "status", "monthly_limit", "allowed_networks")}


def normalise_networks(networks: Sequence[str]) -> list[str]:
    """CIDRs (or single addresses) in canonical form; UsageError naming a bad one."""
    out = []
    for text in networks:
        try:
            out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            raise UsageError(
                f"network {text!r}: expected an address or CIDR like 192.0.2.0/24"
            ) from None
    return sorted(set(out))


def update_tenant(
    conn: Conn,
    name: str,
    *,
    monthly_limit: int | Unset | None = UNSET,
    networks: Sequence[str] | None = None,
) -> Row:
    """Change a tenant's monthly quota and/or allowed networks; returns the new view."""
    if isinstance(monthly_limit, int) and monthly_limit < 0:
        raise UsageError("--monthly-limit must not be negative")
    with conn.transaction():
        t = tenant(conn, name, lock=True)
        limit = t["monthly_limit"] if isinstance(monthly_limit, Unset) else monthly_limit
        nets = (
            list(t["allowed_networks"] or []) if networks is None else normalise_networks(networks)
        )
        conn.execute(Q.tenant_set_limits, (limit, nets, t["id"]))
        after = {**_tenant_view(t), "monthly_limit": limit, "allowed_networks": nets}
        _changed(conn, [TENANT], "tenant.update", name, before=_tenant_view(t), after=after)
    return after


def tenant(conn: Conn, name: str, *, lock: bool = False) -> Row:
    row = _one(conn, Q.tenant_lock if lock else Q.tenant_by_name, (name,))
    if row is None:
        raise NotFoundError(f"no tenant named {name!r}")
    return row


def add_tenant(
    conn: Conn, name: str, monthly_limit: int | None = None, networks: Sequence[str] = ()
) -> int:
    if monthly_limit is not None and monthly_limit < 0:
        raise UsageError("--monthly-limit must not be negative")
    nets = normalise_networks(networks)
    with conn.transaction():
        tid = _insert(conn, Q.tenant_insert, (name, monthly_limit, nets), f"tenant {name!r}")
        after = {
            "name": name,
            "status": "active",
            "monthly_limit": monthly_limit,
            "allowed_networks": nets,
        }
        _changed(conn, [TENANT], "tenant.add", name, after=after)
    return tid


def list_tenants(conn: Conn) -> list[Row]:
    return _all(conn, Q.tenant_list, ())


def tenant_dependents(conn: Conn, tenant_id: int) -> dict[str, int]:
    """How many accounts, providers, routes and messages a tenant has."""
    row = _one(conn, Q.tenant_dependents, {"id": tenant_id})
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def set_tenant_status(conn: Conn, name: str, status: str) -> bool:
    """Suspend ('suspended') or resume ('active') a tenant; False when it already was.

    A suspended tenant's accounts cannot log in (SMTP AUTH checks the status)."""
    assert status in ("active", "suspended")
    with conn.transaction():
        t = tenant(conn, name, lock=True)
        if t["status"] == status:
            return False
        conn.execute(Q.tenant_set_status, (status, t["id"]))
        action = "tenant.suspend" if status == "suspended" else "tenant.resume"
        _changed(
            conn,
            [TENANT],
            action,
            name,
            before=_tenant_view(t),
            after={**_tenant_view(t), "status": status},
        )
    return True


def _deletable_tenant(conn: Conn, name: str, *, lock: bool) -> Row:
    t = tenant(conn, name, lock=lock)
    left = {k: v for k, v in tenant_dependents(conn, t["id"]).items() if v}
    if left:
        what = ", ".join(_plural(n, k.rstrip("s")) for k, n in left.items())
        raise ConflictError(
            f"tenant {name!r} still has {what}: delete those first "
            "(`smtpproxy tenant show` lists them)"
        )
    return t


def delete_tenant(conn: Conn, name: str, confirm: Confirm = _no_confirm) -> Row:
    """Delete a tenant that has nothing left: no accounts, providers, routes or messages."""
    with conn.transaction():
        _deletable_tenant(conn, name, lock=False)
        # ask before taking locks: a prompt must never hold up ingress; check again after
        confirm(f"Delete tenant {name!r}?")
        t = _deletable_tenant(conn, name, lock=True)
        conn.execute(Q.tenant_delete, (t["id"],))
        _changed(conn, [TENANT], "tenant.delete", name, before=_tenant_view(t))
    return t


# -- accounts --------------------------------------------------------------------------


def _account_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: row.get(k) for k in ("username", "tenant", "status", "allowed_domains", "rate_limit")
    }


def normalise_rate(rate: str | None) -> str | None:
    if rate is None:
        return None
    try:
        return str(Rate.parse(rate))
    except ValueError as exc:
        raise UsageError(f"--rate-limit: {exc}") from None


def update_account(
    conn: Conn,
    username: str,
    *,
    domains: Sequence[str] | None = None,
    rate_limit: str | Unset | None = UNSET,
) -> Row:
    """Change an account's allowed sender domains and/or sending rate."""
    with conn.transaction():
        a = account(conn, username, lock=True)
        allowed = list(a["allowed_domains"]) if domains is None else normalise_domains(domains)
        rate = a["rate_limit"] if isinstance(rate_limit, Unset) else normalise_rate(rate_limit)
        conn.execute(Q.account_set_limits, (allowed, rate, a["id"]))
        after = {**_account_view(a), "allowed_domains": allowed, "rate_limit": rate}
        _changed(conn, [ACCOUNT], "account.update", username, before=_account_view(a), after=after)
    return after


def normalise_domains(domains: Sequence[str]) -> list[str]:
    out = []
    for d in domains:
        try:
            out.append(validate_glob(d))
        except GlobError as exc:
            raise UsageError(str(exc)) from None
    return sorted(set(out))


def add_account(
    conn: Conn,
    username: str,
    tenant_name: str,
    password_hash: str,
    domains: Sequence[str],
    *,
    rate_limit: str | None = None,
) -> int:
    if not username or len(username) > 255 or any(c.isspace() for c in username):
        raise UsageError("username must be 1-255 characters without spaces")
    with conn.transaction():
        t = tenant(conn, tenant_name)
        allowed = normalise_domains(domains)
        rate = normalise_rate(rate_limit)
        aid = _insert(
            conn,
            Q.account_insert,
            (t["id"], username, password_hash, allowed, rate),
            f"account {username!r}",
        )
        after = {
            "username": username,
            "tenant": tenant_name,
            "status": "active",
            "allowed_domains": allowed,
            "rate_limit": rate,
            "password": "set",  # masked by audit.record; the hash never goes there
        }
        _changed(conn, [ACCOUNT], "account.add", username, after=after)
    return aid


def list_accounts(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.account_list, {"tenant": tenant_name})


def account(conn: Conn, username: str, *, lock: bool = False) -> Row:
    row = _one(conn, Q.account_lock if lock else Q.account_by_username, (username,))
    if row is None:
        raise NotFoundError(f"no account named {username!r}")
    return row


def account_messages(conn: Conn, account_id: int) -> dict[str, int]:
    """The account's messages: live (queued, retrying, sending) and finished."""
    row = _one(conn, Q.account_messages, (account_id,))
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def set_account_status(conn: Conn, username: str, status: str) -> bool:
    """Disable ('disabled') or enable ('active') an account; False when it already was.

    A disabled account cannot log in (SMTP AUTH checks the status); its queued mail is
    still delivered."""
    assert status in ("active", "disabled")
    with conn.transaction():
        a = account(conn, username, lock=True)
        if a["status"] == status:
            return False
        conn.execute(Q.account_set_status, (status, a["id"]))
        action = "account.disable" if status == "disabled" else "account.enable"
        _changed(
            conn,
            [ACCOUNT],
            action,
            username,
            before=_account_view(a),
            after={**_account_view(a), "status": status},
        )
    return True


def set_password(conn: Conn, username: str, password_hash: str) -> Row:
    """Replace an account's password (given hashed); the audit row says only that it changed."""
    with conn.transaction():
        a = account(conn, username, lock=True)
        conn.execute(Q.account_set_password, (password_hash, a["id"]))
        _changed(conn, [ACCOUNT], "account.passwd", username, after={"password": "changed"})
    return a


def _deletable_account(
    conn: Conn, username: str, with_history: bool, *, lock: bool
) -> tuple[Row, dict[str, int], list[int]]:
    a = account(conn, username, lock=lock)
    used_by = [str(r[0]) for r in conn.execute(Q.account_devices, (a["id"],)).fetchall()]
    if used_by:
        raise ConflictError(
            f"account {username!r} is used by {_plural(len(used_by), 'device')} "
            f"({', '.join(used_by)}): remove them first (`smtpproxy device remove`)"
        )
    msgs = account_messages(conn, a["id"])
    if msgs["live"]:
        raise ConflictError(
            f"account {username!r} has {_plural(msgs['live'], 'message')} still being "
            "delivered (queued, retrying or sending): disable it with "
            "`smtpproxy account disable` and delete it once they are finished"
        )
    if msgs["finished"] and not with_history:
        raise ConflictError(
            f"account {username!r} has {_plural(msgs['finished'], 'finished message')} "
            "in its history: add --with-history to delete them and their delivery logs "
            "too, or disable the account instead"
        )
    routes = [int(r["id"]) for r in _all(conn, Q.account_routes, (a["id"],))]
    return a, msgs, routes


def delete_account(
    conn: Conn, username: str, *, with_history: bool = False, confirm: Confirm = _no_confirm
) -> Row:
    """Delete an account, the routing rules limited to it and, with with_history, its
    finished messages and their delivery logs. Refused while it has live messages, and
    while it has finished ones unless with_history. Returns the account with `routes`
    (ids of the rules removed) and `messages` (finished messages removed)."""
    with conn.transaction():
        _, msgs, routes = _deletable_account(conn, username, with_history, lock=False)
        extra = []
        if routes:
            extra.append(f"{_plural(len(routes), 'routing rule')} limited to it")
        if msgs["finished"]:
            extra.append(f"{_plural(msgs['finished'], 'finished message')} and their logs")
        # ask before taking locks: a prompt must never hold up ingress; check again after
        confirm(
            f"Delete account {username!r}" + (f" with {' and '.join(extra)}" if extra else "") + "?"
        )
        # the row lock makes ingress wait, so no message can be added behind our count
        a, msgs, routes = _deletable_account(conn, username, with_history, lock=True)
        if msgs["finished"]:
            conn.execute(Q.account_delete_history, (a["id"],))
        conn.execute(Q.account_delete, (a["id"],))  # its routing rules cascade
        before = {**_account_view(a), "routes": routes, "messages": msgs["finished"]}
        kinds = [ACCOUNT, ROUTE] if routes else [ACCOUNT]
        _changed(conn, kinds, "account.delete", username, before=before)
    return {**a, "routes": routes, "messages": msgs["finished"]}


# -- providers -------------------------------------------------------------------------


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
        pid = _insert(
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
        _changed(conn, [PROVIDER], "provider.add", _provider_target(tenant_name, name), after=after)
    return pid


def list_providers(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.provider_list, {"tenant": tenant_name})


def provider(conn: Conn, tenant_name: str, name: str, *, lock: bool = False) -> Row:
    tenant(conn, tenant_name)
    row = _one(conn, Q.provider_lock if lock else Q.provider_by_name, (tenant_name, name))
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
        _changed(
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
        _changed(
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
    return _all(conn, Q.provider_rules, {"id": provider_id})


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
            f"{_plural(overrides, 'live message')} sent to it with --to-provider"
        )
    return p


def delete_provider(conn: Conn, tenant_name: str, name: str, confirm: Confirm = _no_confirm) -> Row:
    """Delete a provider no routing rule uses and no live message was redirected to."""
    with conn.transaction():
        p = _deletable_provider(conn, tenant_name, name, lock=False)
        # ask before taking locks; check again after
        confirm(f"Delete provider {name!r} ({p['type']}) of tenant {tenant_name!r}?")
        p = _deletable_provider(conn, tenant_name, name, lock=True)
        conn.execute(Q.provider_delete, (p["id"],))
        _changed(
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


# -- routes ----------------------------------------------------------------------------


def _route_target(row: Mapping[str, Any]) -> str:
    return f"{row['tenant']}/route/{row['id']}"


ROUTE_FIELDS = (
    "id",
    "tenant",
    "priority",
    "sender_domain",
    "recipient_domain",
    "account",
    "provider",
    "fallbacks",
    "enabled",
)


def _route_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ROUTE_FIELDS}


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
    with conn.transaction():
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
        rid = _insert(
            conn,
            Q.route_insert,
            (t["id"], priority, sender, recipient, account_id, p["id"], fallback_ids),
            "route",
        )
        created = route(conn, rid)
        _changed(conn, [ROUTE], "route.add", _route_target(created), after=_route_view(created))
    return rid


def list_routes(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return _all(conn, Q.route_list, {"tenant": tenant_name})


def route(conn: Conn, route_id: int) -> Row:
    row = _one(conn, Q.route_by_id, (route_id,))
    if row is None:
        raise NotFoundError(f"no route with id {route_id}")
    return row


def delete_route(conn: Conn, route_id: int, confirm: Confirm = _no_confirm) -> Row:
    with conn.transaction():
        r = route(conn, route_id)
        confirm(f"Delete route {route_id} of tenant {r['tenant']!r} (-> {r['provider']})?")
        conn.execute(Q.route_lock_tenant, (r["tenant_id"],))
        r = route(conn, route_id)  # it may have changed (or gone) while we asked
        conn.execute(Q.route_delete, (route_id,))
        _changed(conn, [ROUTE], "route.delete", _route_target(r), before=_route_view(r))
    return r


def _placed(
    order: Sequence[tuple[int, int]], route_id: int, anchor: int, before: bool
) -> dict[int, int]:
    """New priorities that put route_id just before or after anchor in order (a list of
    (id, priority) in evaluation order): the moved rule alone when there is room between
    its new neighbours (above 0 in first place), else the whole list renumbered 10, 20,
    30, ..."""
    rest = [(i, p) for i, p in order if i != route_id]
    at = next(n for n, (i, _) in enumerate(rest) if i == anchor) + (0 if before else 1)
    lo = rest[at - 1][1] if at > 0 else 0  # first place: keep priorities positive
    hi = rest[at][1] if at < len(rest) else None
    if hi is None:
        return {route_id: lo + 10}
    if hi - lo >= 2:
        return {route_id: (lo + hi) // 2}
    ids = [i for i, _ in rest]
    ids.insert(at, route_id)
    current = dict(order)
    return {i: 10 * (n + 1) for n, i in enumerate(ids) if current[i] != 10 * (n + 1)}


def move_route(
    conn: Conn,
    route_id: int,
    *,
    priority: int | None = None,
    before: int | None = None,
    after: int | None = None,
) -> dict[int, int]:
    """Give a rule a new priority, or place it just before or after another rule of its
    tenant. Returns {route id: new priority} for every rule whose priority changed."""
    given = [x for x in (priority, before, after) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --priority, --before and --after")
    with conn.transaction():
        r = route(conn, route_id)
        order = [
            (int(i), int(p))
            for i, p in conn.execute(Q.route_lock_tenant, (r["tenant_id"],)).fetchall()
        ]
        if priority is not None:
            changes = {route_id: priority} if r["priority"] != priority else {}
        else:
            anchor = before if before is not None else after
            assert anchor is not None
            if anchor == route_id:
                raise UsageError("a route cannot be moved relative to itself")
            other = route(conn, anchor)
            if other["tenant_id"] != r["tenant_id"]:
                raise UsageError(
                    f"route {anchor} belongs to tenant {other['tenant']!r}, "
                    f"route {route_id} to tenant {r['tenant']!r}"
                )
            current = dict(order)
            placed = _placed(order, route_id, anchor, before is not None)
            changes = {i: p for i, p in placed.items() if current[i] != p}
        if not changes:
            return {}
        for rid, prio in changes.items():
            conn.execute(Q.route_set_priority, (prio, rid))
        after_view: dict[str, Any] = {"priority": changes.get(route_id, r["priority"])}
        others = {str(i): p for i, p in changes.items() if i != route_id}
        if others:
            after_view["renumbered"] = others
        _changed(
            conn,
            [ROUTE],
            "route.move",
            _route_target(r),
            before={"priority": r["priority"]},
            after=after_view,
        )
    return changes


# -- audit trail -----------------------------------------------------------------------


def audit_entries(
    conn: Conn,
    *,
    since: datetime | None = None,
    action: str | None = None,
    target: str | None = None,
    limit: int = 100,
) -> list[Row]:
    """Audit rows, newest first. action is a prefix ("account." or "account.disable");
    target matches itself and what lies under it ("acme" also matches "acme/sg")."""
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    return _all(
        conn,
        Q.audit_list,
        {"since": since, "action": action, "target": target, "limit": limit},
    )


# -- access control --------------------------------------------------------------------

ROLES = ("viewer", "operator", "admin")
DEFAULT_ROLE_PREFIX = "smtpproxy"

# what a viewer may not read, even though it may read the rest of the table
_HIDDEN_COLUMNS = {"accounts": ("password_hash",), "providers": ("secret",)}
_VIEWER_TABLES = (
    "tenants",
    "accounts",
    "providers",
    "routing_rules",
    "devices",
    "messages",
    "delivery_logs",
    "audit_log",
    "schema_migrations",
)
_OPERATOR_MANAGES = ("accounts", "providers", "routing_rules", "devices")
# the columns a dead-letter replay changes
_MESSAGE_STATUS_COLUMNS = (
    "status",
    "attempts",
    "next_attempt_at",
    "claimed_by",
    "claimed_at",
    "last_error",
    "route_override",
    "replayed_at",
    "provider_name",
    "provider_message_id",
    "updated_at",
    "finished_at",
)


def role_name(role: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    if role not in ROLES:
        raise UsageError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    if not prefix or not all(c.isalnum() or c == "_" for c in prefix) or len(prefix) > 40:
        raise UsageError(f"--role-prefix {prefix!r}: expected letters, digits and '_'")
    return f"{prefix}_{role}"


def _role_exists(conn: Conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def _columns(conn: Conn, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _grant_columns(
    conn: Conn, privilege: LiteralString, table: str, columns: Sequence[str], to: str
) -> None:
    conn.execute(
        sql.SQL("GRANT {} ({}) ON {} TO {}").format(
            sql.SQL(privilege),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.Identifier(table),
            sql.Identifier(to),
        )
    )


def setup_roles(conn: Conn, prefix: str = DEFAULT_ROLE_PREFIX) -> dict[str, str]:
    """Create the three NOLOGIN group roles when missing and set their privileges on this
    database to exactly what they should be (safe to repeat; repeat after migrations).

    viewer:   reads tenants, accounts (not password hashes), providers (not secrets),
              routing rules, devices, messages, delivery logs and the audit log
    operator: viewer, plus manages accounts, providers, routes and devices, reads
              provider secrets (for `provider test`), updates message status columns
              (dead-letter replay) and writes audit rows
    admin:    operator, plus everything on every table (tenants, deleting history, ...)
              and CREATE on the schema
    """
    names = {role: role_name(role, prefix) for role in ROLES}
    ident = {role: sql.Identifier(name) for role, name in names.items()}
    require_owner(conn, "grant roles")
    for name in names.values():
        if not _role_exists(conn, name):
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateObject:
                pass  # created by a concurrent `db grant`
    row = conn.execute("SELECT current_database(), current_schema()").fetchone()
    assert row is not None
    database, schema = sql.Identifier(str(row[0])), sql.Identifier(str(row[1]))
    # start from nothing, so repeating this converges on exactly the privileges below
    for role in ROLES:
        conn.execute(
            sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(schema, ident[role])
        )
        conn.execute(
            sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(schema, ident[role])
        )
    conn.execute(sql.SQL("GRANT {} TO {}").format(ident["viewer"], ident["operator"]))
    conn.execute(sql.SQL("GRANT {} TO {}").format(ident["operator"], ident["admin"]))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, ident["viewer"]))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident["viewer"]))

    for table in _VIEWER_TABLES:
        hidden = _HIDDEN_COLUMNS.get(table)
        if hidden:
            visible = [c for c in _columns(conn, table) if c not in hidden]
            _grant_columns(conn, "SELECT", table, visible, names["viewer"])
        else:
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), ident["viewer"])
            )

    for table in _OPERATOR_MANAGES:
        conn.execute(
            sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.Identifier(table), ident["operator"]
            )
        )
    _grant_columns(conn, "SELECT", "providers", ["secret"], names["operator"])
    _grant_columns(conn, "UPDATE", "messages", _MESSAGE_STATUS_COLUMNS, names["operator"])
    conn.execute(sql.SQL("GRANT INSERT ON audit_log TO {}").format(ident["operator"]))
    for table in (*_OPERATOR_MANAGES, "audit_log"):
        seq = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = pg_get_serial_sequence(%s, 'id')::regclass",
            (table,),
        ).fetchone()
        if seq is not None:
            conn.execute(
                sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                    sql.Identifier(str(seq[0]), str(seq[1])), ident["operator"]
                )
            )

    conn.execute(
        sql.SQL("GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA {} TO {}").format(
            schema, ident["admin"]
        )
    )
    conn.execute(
        sql.SQL("GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            schema, ident["admin"]
        )
    )
    conn.execute(sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(schema, ident["admin"]))
    conn.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(database, ident["admin"]))
    return names


def role_admin_denied(doing: str) -> PermissionDenied:
    return PermissionDenied(
        f"permission denied: your database role cannot {doing}; run it as the owner of "
        "smtpproxy's tables (with CREATEROLE) or as a superuser"
    )


def require_owner(conn: Conn, doing: str) -> None:
    """Only the owner of the tables may change privileges on them: anyone else would get
    mere warnings from GRANT and REVOKE."""
    owner = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class"
        " WHERE oid = 'tenants'::regclass"
    ).fetchone()
    if not owner or not owner[0]:
        raise role_admin_denied(doing)


def _check_user(conn: Conn, user: str, prefix: str) -> None:
    if not _role_exists(conn, user):
        raise NotFoundError(
            f"no database role named {user!r}: create it first, for example in psql as a "
            f"superuser: CREATE ROLE \"{user}\" LOGIN PASSWORD '...'; then run this again"
        )
    if user in {role_name(r, prefix) for r in ROLES}:
        raise UsageError(f"{user!r} is one of smtpproxy's group roles, not a user")


def grant_role(conn: Conn, role: str, user: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    """Set up the roles (setup_roles), then make user a member of the chosen one."""
    group = role_name(role, prefix)
    with conn.transaction():
        _check_user(conn, user, prefix)
        setup_roles(conn, prefix)
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(user)))
        audit.record(conn, "db.grant", user, after={"role": group})
    return group


def revoke_role(conn: Conn, role: str, user: str, prefix: str = DEFAULT_ROLE_PREFIX) -> bool:
    """End user's membership of the chosen role; False when it was not a member."""
    group = role_name(role, prefix)
    with conn.transaction():
        require_owner(conn, "revoke roles")
        _check_user(conn, user, prefix)
        member = conn.execute(
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE g.rolname = %s AND u.rolname = %s",
            (group, user),
        ).fetchone()
        if member is None:
            return False
        conn.execute(
            sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(user))
        )
        audit.record(conn, "db.revoke", user, before={"role": group})
    return True
