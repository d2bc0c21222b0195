"""What every admin operation shares: row helpers, the unique/check-violation mapping,
the audit-and-notify step of every change, and the permission-denied error."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from smtpproxy.admin import audit
from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.errors import ConflictError, UsageError

Row = dict[str, Any]
Confirm = Callable[[str], None]

CHANNEL = "smtpproxy_config"
TENANT, ACCOUNT, PROVIDER, ROUTE = "tenant", "account", "provider", "route"


class Unset(enum.Enum):
    """Marks an optional change that was not asked for (None means "clear it")."""

    UNSET = "unset"


UNSET = Unset.UNSET


def insert(conn: Conn, query: Any, params: Sequence[object], what: str) -> int:
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


def changed(
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


def set_status(
    conn: Conn,
    kind: str,
    query: Any,
    row: Row,
    status: str,
    *,
    action: str,
    target: str,
    view: Callable[[Row], dict[str, Any]],
) -> None:
    """Write a tenant's or account's new status and record the change."""
    conn.execute(query, (status, row["id"]))
    before = view(row)
    changed(conn, [kind], action, target, before=before, after={**before, "status": status})


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def no_confirm(description: str) -> None:
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
