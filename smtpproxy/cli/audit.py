"""`smtpproxy audit`: the trail of administrative changes, newest first."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from smtpproxy.cli.common import emit_rows
from smtpproxy.errors import UsageError

JSON_COLUMNS = ["id", "at", "db_role", "os_user", "action", "target", "before", "after"]


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'30m', '7d' (that long ago) or an ISO date or time ('2025-01-31', '2025-01-31T08:00',
    local time unless it names its offset)."""
    from smtpproxy.config import ConfigValueError, parse_duration

    now = now or datetime.now(UTC)
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ConfigValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration like 7d or 12h, or a date like 2025-01-31"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


_IDENTITY = ("id", "name", "username", "tenant")  # already in the target column


def summarise(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """One line for people (--json has the full values): what a new thing was given,
    what a removed thing was, or which values changed how."""

    def values(d: dict[str, Any]) -> str:
        shown = [
            f"{k}={_value(v)}"
            for k, v in d.items()
            if k not in _IDENTITY and v not in (None, [], {}, "")
        ]
        return ", ".join(shown)

    if before is None:
        return values(after) if after is not None else ""
    if after is None:
        return f"was: {values(before)}"
    keys = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    return ", ".join(f"{k}: {_value(before.get(k))} -> {_value(after.get(k))}" for k in keys)


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_(
        ctx: typer.Context,
        since: str = typer.Option(
            None,
            "--since",
            help="Only changes since then: a duration (30m, 12h, 7d) or a date or time "
            "(2025-01-31, 2025-01-31T08:00).",
            metavar="WHEN",
        ),
        action: str = typer.Option(
            None,
            "--action",
            help="Only actions starting with this, e.g. account. or provider.update.",
            metavar="PREFIX",
        ),
        target: str = typer.Option(
            None,
            "--target",
            help="Only changes to this target and what it contains (acme also matches "
            "acme/sg and acme/route/3).",
            metavar="TARGET",
        ),
        limit: int = typer.Option(100, "--limit", "-n", help="At most this many rows."),
        as_json: bool = typer.Option(
            False, "--json", help="Print JSON, with the full before and after values."
        ),
    ) -> None:
        """Show who changed what, newest first.

        Every administrative change, with the database role and operating-system user
        that made it. Secrets and password hashes are never recorded.

        Example: [bold]smtpproxy audit --since 7d --action account.[/bold]
        """
        from smtpproxy import admin
        from smtpproxy.cli.common import admin_database

        when = parse_since(since) if since is not None else None
        with admin_database(ctx, "read the audit log", "viewer") as conn:
            rows = admin.audit_entries(conn, since=when, action=action, target=target, limit=limit)
        if as_json or not rows:
            emit_rows(rows, JSON_COLUMNS, as_json, title="audit log entries")
            return
        _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    """The human table: nothing is cut short (long values fold onto more lines), and
    user data is printed as text, never as markup."""
    from rich.table import Table
    from rich.text import Text

    from smtpproxy.cli.common import console

    table = Table(title="audit log", title_justify="left")
    table.add_column("at")
    table.add_column("who")
    table.add_column("action", no_wrap=True)
    table.add_column("target", overflow="fold")
    table.add_column("change", overflow="fold", ratio=1)
    for r in rows:
        table.add_row(
            Text(r["at"].strftime("%Y-%m-%d %H:%M:%S")),
            Text(f"{r['db_role']} ({r['os_user']})" if r["os_user"] else r["db_role"]),
            Text(r["action"]),
            Text(r["target"]),
            Text(summarise(r["before"], r["after"])),
        )
    console.print(table)
