"""The audit trail: every administrative change, who made it and what it changed.

`record()` runs inside the caller's transaction, so a change and its audit row commit
together or not at all. Who: the database role (PostgreSQL's current_user, filled in by
the column default) and the operating-system user running the CLI. Secrets never reach
the trail: callers pass before/after values with secrets already masked (mask()).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

MASK = "********"
_SECRET_KEYS = ("secret", "password", "token", "api_key", "key")


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        return str(os.getuid())


def mask(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A copy with secret-looking values masked (recursively)."""
    if values is None:
        return None
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = mask(value)
        elif any(word in key.lower() for word in _SECRET_KEYS) and value not in (None, "", False):
            out[key] = MASK if not isinstance(value, bool) else value
        else:
            out[key] = value
    return out


def record(
    conn: psycopg.Connection[Any],
    action: str,
    target: str = "",
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row in the current transaction."""
    b, a = mask(before), mask(after)
    conn.execute(
        "INSERT INTO audit_log (os_user, action, target, before, after)"
        " VALUES (%s, %s, %s, %s, %s)",
        (
            os_user(),
            action,
            target,
            Jsonb(b) if b is not None else None,
            Jsonb(a) if a is not None else None,
        ),
    )
