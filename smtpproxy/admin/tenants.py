"""Tenants: add, list, update, suspend and resume, delete (only when nothing is left)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from smtpproxy.admin.common import (
    TENANT,
    UNSET,
    Confirm,
    Row,
    Unset,
    changed,
    insert,
    no_confirm,
    plural,
    set_status,
)
from smtpproxy.db.pool import Conn, one, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import ConflictError, NotFoundError, UsageError


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
        changed(conn, [TENANT], "tenant.update", name, before=_tenant_view(t), after=after)
    return after


def tenant(conn: Conn, name: str, *, lock: bool = False) -> Row:
    row = one(conn, Q.tenant_lock if lock else Q.tenant_by_name, (name,))
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
        tid = insert(conn, Q.tenant_insert, (name, monthly_limit, nets), f"tenant {name!r}")
        after = {
            "name": name,
            "status": "active",
            "monthly_limit": monthly_limit,
            "allowed_networks": nets,
        }
        changed(conn, [TENANT], "tenant.add", name, after=after)
    return tid


def list_tenants(conn: Conn) -> list[Row]:
    return rows(conn, Q.tenant_list, ())


def tenant_dependents(conn: Conn, tenant_id: int) -> dict[str, int]:
    """How many accounts, providers, routes and messages a tenant has."""
    row = one(conn, Q.tenant_dependents, {"id": tenant_id})
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
        action = "tenant.suspend" if status == "suspended" else "tenant.resume"
        set_status(
            conn,
            TENANT,
            Q.tenant_set_status,
            t,
            status,
            action=action,
            target=name,
            view=_tenant_view,
        )
    return True


def _deletable_tenant(conn: Conn, name: str, *, lock: bool) -> Row:
    t = tenant(conn, name, lock=lock)
    left = {k: v for k, v in tenant_dependents(conn, t["id"]).items() if v}
    if left:
        what = ", ".join(plural(n, k.rstrip("s")) for k, n in left.items())
        raise ConflictError(
            f"tenant {name!r} still has {what}: delete those first "
            "(`smtpproxy tenant show` lists them)"
        )
    return t


def delete_tenant(conn: Conn, name: str, confirm: Confirm = no_confirm) -> Row:
    """Delete a tenant that has nothing left: no accounts, providers, routes or messages."""
    with conn.transaction():
        _deletable_tenant(conn, name, lock=False)
        # ask before taking locks: a prompt must never hold up ingress; check again after
        confirm(f"Delete tenant {name!r}?")
        t = _deletable_tenant(conn, name, lock=True)
        conn.execute(Q.tenant_delete, (t["id"],))
        changed(conn, [TENANT], "tenant.delete", name, before=_tenant_view(t))
    return t
