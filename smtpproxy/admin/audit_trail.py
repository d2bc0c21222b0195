"""Reading the audit trail that every change writes (smtpproxy.admin.audit records it)."""

from __future__ import annotations

from datetime import datetime

from smtpproxy.admin.common import (
    Row,
)
from smtpproxy.db.pool import Conn, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import UsageError


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
    return rows(
        conn,
        Q.audit_list,
        {"since": since, "action": action, "target": target, "limit": limit},
    )
