"""Accounts: add, list, update, disable and enable, passwords, delete (never while mail
of theirs is live or a device sends as them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from smtpproxy.admin.common import (
    ACCOUNT,
    ROUTE,
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
from smtpproxy.admin.tenants import (
    tenant,
)
from smtpproxy.db.pool import Conn, one, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import ConflictError, NotFoundError, UsageError
from smtpproxy.ingress.limits import Rate
from smtpproxy.mail.domains import GlobError, validate_glob


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
        changed(conn, [ACCOUNT], "account.update", username, before=_account_view(a), after=after)
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
        aid = insert(
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
        changed(conn, [ACCOUNT], "account.add", username, after=after)
    return aid


def list_accounts(conn: Conn, tenant_name: str | None = None) -> list[Row]:
    if tenant_name is not None:
        tenant(conn, tenant_name)
    return rows(conn, Q.account_list, {"tenant": tenant_name})


def account(conn: Conn, username: str, *, lock: bool = False) -> Row:
    row = one(conn, Q.account_lock if lock else Q.account_by_username, (username,))
    if row is None:
        raise NotFoundError(f"no account named {username!r}")
    return row


def account_messages(conn: Conn, account_id: int) -> dict[str, int]:
    """The account's messages: live (queued, retrying, sending) and finished."""
    row = one(conn, Q.account_messages, (account_id,))
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def account_devices(conn: Conn, account_id: int) -> list[str]:
    """The names of the devices that send as the account (smtpproxy device)."""
    return [str(r[0]) for r in conn.execute(Q.account_devices, (account_id,)).fetchall()]


def set_account_status(conn: Conn, username: str, status: str) -> bool:
    """Disable ('disabled') or enable ('active') an account; False when it already was.

    A disabled account cannot log in (SMTP AUTH checks the status); its queued mail is
    still delivered."""
    assert status in ("active", "disabled")
    with conn.transaction():
        a = account(conn, username, lock=True)
        if a["status"] == status:
            return False
        action = "account.disable" if status == "disabled" else "account.enable"
        set_status(
            conn,
            ACCOUNT,
            Q.account_set_status,
            a,
            status,
            action=action,
            target=username,
            view=_account_view,
        )
    return True


def set_password(conn: Conn, username: str, password_hash: str) -> Row:
    """Replace an account's password (given hashed); the audit row says only that it changed."""
    with conn.transaction():
        a = account(conn, username, lock=True)
        conn.execute(Q.account_set_password, (password_hash, a["id"]))
        changed(conn, [ACCOUNT], "account.passwd", username, after={"password": "changed"})
    return a


def _deletable_account(
    conn: Conn, username: str, with_history: bool, *, lock: bool
) -> tuple[Row, dict[str, int], list[int]]:
    a = account(conn, username, lock=lock)
    used_by = account_devices(conn, a["id"])
    if used_by:
        raise ConflictError(
            f"account {username!r} is used by {plural(len(used_by), 'device')} "
            f"({', '.join(used_by)}): remove them first (`smtpproxy device remove`)"
        )
    msgs = account_messages(conn, a["id"])
    if msgs["live"]:
        raise ConflictError(
            f"account {username!r} has {plural(msgs['live'], 'message')} still being "
            "delivered (queued, retrying or sending): disable it with "
            "`smtpproxy account disable` and delete it once they are finished"
        )
    if msgs["finished"] and not with_history:
        raise ConflictError(
            f"account {username!r} has {plural(msgs['finished'], 'finished message')} "
            "in its history: add --with-history to delete them and their delivery logs "
            "too, or disable the account instead"
        )
    routes = [int(r["id"]) for r in rows(conn, Q.account_routes, (a["id"],))]
    return a, msgs, routes


def delete_account(
    conn: Conn, username: str, *, with_history: bool = False, confirm: Confirm = no_confirm
) -> Row:
    """Delete an account, the routing rules limited to it and, with with_history, its
    finished messages and their delivery logs. Refused while it has live messages, and
    while it has finished ones unless with_history. Returns the account with `routes`
    (ids of the rules removed) and `messages` (finished messages removed)."""
    with conn.transaction():
        _, msgs, routes = _deletable_account(conn, username, with_history, lock=False)
        extra = []
        if routes:
            extra.append(f"{plural(len(routes), 'routing rule')} limited to it")
        if msgs["finished"]:
            extra.append(f"{plural(msgs['finished'], 'finished message')} and their logs")
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
        changed(conn, kinds, "account.delete", username, before=before)
    return {**a, "routes": routes, "messages": msgs["finished"]}
