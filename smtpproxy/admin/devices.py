"""Administrative operations on devices (`smtpproxy device`): networks that may send as
an account without AUTH, on the device listeners only.

As in smtpproxy.admin, each function runs inside the caller's transaction (in a
savepoint of its own), raises NotFoundError, ConflictError or UsageError with one line
naming what is wrong, and with every change appends an audit_log row and sends
`NOTIFY smtpproxy_config, 'device'`, so running instances reload their device table as
soon as the change commits.

Refused: a network that overlaps another device's (an address belongs to one device at
most; the database's exclusion constraint holds even against concurrent adds), one
wider than the rule in smtpproxy.ingress.devices allows, one outside the tenant's allowed
networks (its devices could never send), and an unknown account.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row

from smtpproxy import admin
from smtpproxy.admin import audit
from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.errors import ConflictError, NotFoundError, UsageError
from smtpproxy.ingress import devices

Row = dict[str, Any]

DEVICE = "device"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_VIEW = ("name", "network", "account", "tenant", "enabled", "note")


def _view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _VIEW}


def changed(conn: Conn, action: str, name: str, **values: Mapping[str, Any] | None) -> None:
    audit.record(conn, action, name, **values)
    conn.execute(Q.notify_config, (DEVICE,))


def _overlap(conn: Conn, network: str) -> ConflictError:
    with conn.cursor(row_factory=dict_row) as cur:
        other = cur.execute(Q.device_overlapping, (network,)).fetchone()
    where = f"device {other['name']!r} ({other['network']})" if other else "another device"
    return ConflictError(
        f"network {network} overlaps {where}: an address can belong to one device only"
    )


def _check_tenant_networks(conn: Conn, network: str, tenant_name: str) -> None:
    t = admin.tenant(conn, tenant_name)
    allowed = t["allowed_networks"] or []
    if not allowed:
        return
    row = conn.execute(Q.tenant_network_admits, (network, t["id"])).fetchone()
    if not row or not row[0]:
        raise UsageError(
            f"network {network} is outside the allowed networks of tenant {tenant_name!r} "
            f"({', '.join(allowed)}): its devices could never send"
        )


def device(conn: Conn, name: str, *, lock: bool = False) -> Row:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(Q.device_lock if lock else Q.device_by_name, (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no device named {name!r}")
    return row


def list_devices(conn: Conn) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(Q.device_list).fetchall()


def add_device(conn: Conn, name: str, network: str, username: str, note: str = "") -> Row:
    """Register a device network for an account; returns its view with its id."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"device {name!r}: invalid name (use letters, digits, '.', '_' and '-', "
            "up to 63 characters)"
        )
    try:
        net = devices.device_network(network)
    except devices.NetworkError as exc:
        raise UsageError(str(exc)) from None
    with conn.transaction():
        a = admin.account(conn, username)
        _check_tenant_networks(conn, str(net), a["tenant"])
        try:
            with conn.transaction():
                row = conn.execute(Q.device_insert, (name, str(net), a["id"], note)).fetchone()
        except psycopg.errors.UniqueViolation:
            raise ConflictError(f"device {name!r} already exists") from None
        except psycopg.errors.ExclusionViolation:
            raise _overlap(conn, str(net)) from None
        assert row is not None
        view = {
            "name": name,
            "network": str(net),
            "account": username,
            "tenant": a["tenant"],
            "enabled": True,
            "note": note,
        }
        changed(conn, "device.add", name, after=view)
    return {"id": int(str(row[0])), **view}


def set_device_enabled(conn: Conn, name: str, enabled: bool) -> bool:
    """Enable or disable a device; False when it already was."""
    with conn.transaction():
        d = device(conn, name, lock=True)
        if d["enabled"] == enabled:
            return False
        conn.execute(Q.device_set_enabled, (enabled, d["id"]))
        before = _view(d)
        action = "device.enable" if enabled else "device.disable"
        changed(conn, action, name, before=before, after={**before, "enabled": enabled})
    return True


def remove_device(conn: Conn, name: str) -> Row:
    """Remove a device: its network must log in again from the next transaction."""
    with conn.transaction():
        d = device(conn, name, lock=True)
        conn.execute(Q.device_delete, (d["id"],))
        changed(conn, "device.remove", name, before=_view(d))
    return d
