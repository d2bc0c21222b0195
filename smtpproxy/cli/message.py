"""`smtpproxy message show`: one message's whole story, read from PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from smtpproxy.cli.common import JsonOption, database, say
from smtpproxy.models import CLAIMABLE, LIVE

app = typer.Typer(no_args_is_help=True)

MATCH_COLUMNS = ("id", "created_at", "tenant", "account", "status", "mail_from", "subject")


@app.command()
def show(
    ctx: typer.Context,
    ident: str = typer.Argument(
        ...,
        metavar="ID",
        help="Our message id, or the Message-ID header of the message (with or without <>).",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Show one message's whole story, from SMTP acceptance to its last attempt.

    Envelope, tenant and account, split children, every attempt with its provider,
    outcome, duration and error, the current status and next attempt, and whether the
    body is still stored.

    When a Message-ID header belongs to several messages, they are listed (exit 1): show
    one of them by its id.

    Example: [bold]smtpproxy message show 01HZX4J9Q8M4T3V6K2N5R7W1AB[/bold]
    """
    from smtpproxy.cli.reports import dump_json
    from smtpproxy.ops.lookup import AmbiguousMessage, message_story

    with database(ctx) as conn:
        try:
            result, now = message_story(conn, ident)
        except AmbiguousMessage as exc:
            _list_matches(exc.matches, as_json)
            raise
    if as_json:
        dump_json(result)
        return
    _human(result, now)


def _list_matches(matches: list[dict[str, Any]], as_json: bool) -> None:
    from smtpproxy.cli.reports import dump_json, print_table
    from smtpproxy.ops.reports import format_time

    shown = matches[:100]
    if as_json:
        dump_json({"matches": [{c: m[c] for c in MATCH_COLUMNS} for m in shown]})
        return
    table = Table(title="messages with this Message-ID (UTC)", title_justify="left")
    for c in MATCH_COLUMNS:
        table.add_column(c.replace("_", " "), no_wrap=c in ("id", "created_at"))
    for m in shown:
        table.add_row(
            *(Text(format_time(m[c]) if c == "created_at" else str(m[c])) for c in MATCH_COLUMNS)
        )
    print_table(table)


def _human(r: dict[str, Any], now: datetime) -> None:  # noqa: PLR0912 - one row per fact
    from smtpproxy.cli.reports import print_table, status_text
    from smtpproxy.ops.reports import format_age, format_time

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    def row(label: str, value: str | Text) -> None:
        grid.add_row(Text(label), value if isinstance(value, Text) else Text(value))

    status = status_text(r["status"]) if r["status"] != "split" else Text("split")
    status.append(f"  after {r['attempts']} attempt{'s' if r['attempts'] != 1 else ''}")
    if r["status"] in CLAIMABLE and r["next_attempt_at"] is not None:
        status.append(f", next attempt at {format_time(r['next_attempt_at'])} UTC")
    if r["status"] == "sending":
        status.append(f", claimed by {r['claimed_by']} at {format_time(r['claimed_at'])} UTC")
    row("status", status)
    row("tenant", f"{r['tenant']}  (account {r['account']})")
    device = f", device {r['device']}" if r.get("device") else ""
    row("accepted", f"{format_time(r['created_at'])} UTC from {r['client_ip'] or '-'}{device}")
    row("from", r["mail_from"] or "<>")
    row("to", ", ".join(r["rcpt_to"]))
    row("subject", r["subject"] or "-")
    row("Message-ID", f"<{r['header_message_id']}>" if r["header_message_id"] else "-")
    row("size", f"{r['size']:,} bytes")
    if r["provider_name"]:
        via = r["provider_name"]
        if r["provider_message_id"]:
            via += f"  (provider's id {r['provider_message_id']})"
        row("provider", via)
    if r["route_override"]:
        row("route", f"replayed through {r['route_override']}")
    if r["last_error"]:
        row("last error", r["last_error"])
    if r["finished_at"] is not None:
        row("finished", f"{format_time(r['finished_at'])} UTC")
    body = r["body"]
    if body["state"] == "deleted":
        row("body", f"deleted at {format_time(body['deleted_at'])} UTC (retention)")
    elif body["state"] == "missing":
        row("body", "missing from the store")
    else:
        row("body", f"stored ({body['storage_key']})")
    if r["parent"]:
        p = r["parent"]
        row("parent", f"{p['id']}  ({p['status']})")
    if r["children"]:
        row(
            "children",
            "\n".join(
                f"{c['id']}  {c['status']}  {', '.join(c['rcpt_to'])}" for c in r["children"]
            ),
        )
    if r["status"] in LIVE:
        row("age", format_age((now - r["created_at"]).total_seconds()))
    print_table(
        Panel(Group(grid), title=Text(f"message {r['id']}"), title_align="left", expand=False)
    )
    _timeline(r)


def _timeline(r: dict[str, Any]) -> None:
    from smtpproxy.cli.reports import print_table
    from smtpproxy.ops.reports import format_time

    table = Table(title="timeline (UTC)", title_justify="left")
    table.add_column("time", no_wrap=True)
    table.add_column("event", no_wrap=True)
    if any(e["message_id"] != r["id"] for e in r["timeline"]):
        table.add_column("message", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for e in r["timeline"]:
        cells = [Text(format_time(e["at"])), _event_text(e)]
        if len(table.columns) == 4:
            cells.append(Text(e["message_id"]))
        cells.append(Text(e["detail"]))
        table.add_row(*cells)
    print_table(table)
    if not r["delivery_attempts"]:
        say("no delivery attempts yet")


def _event_text(event: dict[str, Any]) -> Text:
    from smtpproxy.cli.reports import STATUS_STYLE
    from smtpproxy.ops.reports import outcome_class

    if "status" in event:
        return Text(event["event"], style=STATUS_STYLE[outcome_class(event["status"])])
    return Text(event["event"])
