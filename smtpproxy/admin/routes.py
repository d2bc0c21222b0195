"""Routing rules: add, list, move (priorities renumbered), delete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from smtpproxy.admin.accounts import (
    account,
)
from smtpproxy.admin.common import (
    ROUTE,
    Confirm,
    Row,
    changed,
    insert,
    no_confirm,
)
from smtpproxy.admin.providers import (
    provider,
)
from smtpproxy.admin.tenants import (
    tenant,
)
from smtpproxy.db.pool import Conn, one, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import NotFoundError, UsageError
from smtpproxy.mail.domains import GlobError, validate_glob


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
        rid = insert(
            conn,
            Q.route_insert,
            (t["id"], priority, sender, recipient, account_id, p["id"], fallback_ids),
            "route",
        )
        created = route(conn, rid)
        changed(conn, [ROUTE], "route.add", _route_target(created), after=_route_view(created))
    return rid


def list_routes(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return rows(conn, Q.route_list, {"tenant": tenant_name})


def route(conn: Conn, route_id: int) -> Row:
    row = one(conn, Q.route_by_id, (route_id,))
    if row is None:
        raise NotFoundError(f"no route with id {route_id}")
    return row


def delete_route(conn: Conn, route_id: int, confirm: Confirm = no_confirm) -> Row:
    with conn.transaction():
        r = route(conn, route_id)
        confirm(f"Delete route {route_id} of tenant {r['tenant']!r} (-> {r['provider']})?")
        conn.execute(Q.route_lock_tenant, (r["tenant_id"],))
        r = route(conn, route_id)  # it may have changed (or gone) while we asked
        conn.execute(Q.route_delete, (route_id,))
        changed(conn, [ROUTE], "route.delete", _route_target(r), before=_route_view(r))
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
        changed(
            conn,
            [ROUTE],
            "route.move",
            _route_target(r),
            before={"priority": r["priority"]},
            after=after_view,
        )
    return changes
