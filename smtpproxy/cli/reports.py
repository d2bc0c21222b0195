"""`smtpproxy logs` and `smtpproxy stats`: what happened to delivery attempts.

Both read delivery_logs only (never write), in UTC. `logs` pages through attempts newest
first with a cursor; `stats` sums a time range up by status, provider, account and
tenant, with an optional chart per hour or day.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from smtpproxy.cli.common import JsonOption, console, database, say

STATUS_STYLE = {"delivered": "green", "retried": "yellow", "failed": "red"}
ERROR_WIDTH = 60
MAX_LIMIT = 10_000
MAX_BUCKETS = 2000
PIPE_WIDTH = 400

if TYPE_CHECKING:
    import psycopg

    Conn = psycopg.Connection[Any]


# -- shared ------------------------------------------------------------------------------


def utc_session(conn: Conn) -> datetime:
    """Make the connection read-only and UTC (timestamps and day/hour buckets), and
    return the server's now."""
    from smtpproxy.db.queries import Q

    conn.read_only = True
    conn.execute("SET TIME ZONE 'UTC'")
    row = conn.execute(Q.report_now).fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


def rows(conn: Conn, query: Any, params: Any) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def resolve_filters(
    conn: Conn, tenant: str | None, account: str | None
) -> tuple[int | None, int | None]:
    """Tenant and account ids for --tenant/--account; an unknown name is an error, and
    so is an account of another tenant."""
    from smtpproxy import admin
    from smtpproxy.errors import UsageError

    tenant_id = account_id = None
    if tenant is not None:
        tenant_id = int(admin.tenant(conn, tenant)["id"])
    if account is not None:
        acc = admin.account(conn, account)
        account_id = int(acc["id"])
        if tenant_id is not None and int(acc["tenant_id"]) != tenant_id:
            raise UsageError(
                f"account {account!r} belongs to tenant {acc['tenant']!r}, not {tenant!r}"
            )
    return tenant_id, account_id


def print_table(table: RenderableType) -> None:
    """A table (or panel) on stdout. On a terminal it fits the screen; in a pipe (a
    script, a file, `| grep`) it gets the width it needs, so a row is not wrapped or cut."""
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update(width=PIPE_WIDTH), table).maximum
    wide = Console(width=max(console.width, min(width, PIPE_WIDTH)), highlight=False)
    wide.print(table)


def status_text(status: str) -> Text:
    from smtpproxy.reports import outcome_class

    return Text(status, style=STATUS_STYLE[outcome_class(status)])


def dump_json(obj: Any) -> None:
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.astimezone(UTC).isoformat()
        raise TypeError(type(value).__name__)

    print(json.dumps(obj, indent=2, default=plain))


# -- logs --------------------------------------------------------------------------------


def _logs(
    ctx: typer.Context,
    *,
    tenant: str | None,
    account: str | None,
    provider: str | None,
    status: str | None,
    recipient: str | None,
    since: str | None,
    until: str | None,
    message_id: str | None,
    limit: int,
    page: int,
    before: int | None,
    as_json: bool,
) -> None:
    from smtpproxy.db.queries import Q
    from smtpproxy.errors import NotFoundError, UsageError
    from smtpproxy.reports import LOG_STATUSES, header_id, time_range

    if not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"--limit must be between 1 and {MAX_LIMIT}")
    if page < 1:
        raise UsageError("--page must be 1 or more")
    if status is not None and status not in LOG_STATUSES:
        raise UsageError(f"--status {status!r}: expected one of {', '.join(LOG_STATUSES)}")
    with database(ctx) as conn:
        now = utc_session(conn)
        start, end = time_range(since, until, now)
        tenant_id, account_id = resolve_filters(conn, tenant, account)
        message_ids = None
        if message_id is not None:
            wanted = header_id(message_id)
            message_ids = [
                r["id"] for r in rows(conn, Q.report_message_family, {"message": wanted})
            ]
            if not message_ids:
                raise NotFoundError(f"no message with the id or Message-ID {message_id!r}")
        before_at = None
        if before is not None:
            cursor = conn.execute(Q.report_log_cursor, (before,)).fetchone()
            if cursor is None:
                raise NotFoundError(f"--before {before}: no delivery log with that id")
            before_at = cursor[1]
        found = rows(
            conn,
            Q.report_logs,
            {
                "since": start,
                "until": end,
                "before_at": before_at,
                "before_id": before,
                "tenant_id": tenant_id,
                "account_id": account_id,
                "provider": provider,
                "status": status,
                "recipient": recipient.strip() if recipient else None,
                "message_ids": message_ids,
                "limit": limit + 1,
                "offset": (page - 1) * limit,
            },
        )
    more = len(found) > limit
    found = found[:limit]
    next_before = found[-1]["id"] if more and found else None
    if as_json:
        dump_json(
            {
                "logs": [
                    {k: v for k, v in r.items() if k not in ("tenant_id", "account_id")}
                    for r in found
                ],
                "limit": limit,
                "page": page,
                "next_before": next_before,
            }
        )
        return
    _logs_table(found)
    if next_before is not None:
        say(f"{len(found)} shown, newest first; more with --before {next_before}")
    elif found:
        say(f"{len(found)} shown, newest first; no more")


def _logs_table(found: list[dict[str, Any]]) -> None:
    from smtpproxy.reports import format_ms, format_time, recipients_cell, shorten

    if not found:
        say("no delivery attempts match")
        return
    table = Table(title="delivery attempts (UTC)", title_justify="left")
    for name in ("time", "message id", "tenant", "account", "provider", "status"):
        table.add_column(name, no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("error", overflow="fold")
    table.add_column("recipients", overflow="fold")
    for r in found:
        table.add_row(
            Text(format_time(r["time"])),
            Text(r["message_id"]),
            Text(r["tenant"] or f"#{r['tenant_id']}"),
            Text(r["account"] or f"#{r['account_id']}"),
            Text(r["provider"] or "-"),
            status_text(r["status"]),
            Text(str(r["attempt"])),
            Text(format_ms(r["duration_ms"])),
            Text(shorten(r["error"], ERROR_WIDTH) or "-"),
            Text(recipients_cell(r["recipients"])),
        )
    print_table(table)


# -- stats -------------------------------------------------------------------------------


def _stats(
    ctx: typer.Context,
    *,
    since: str,
    until: str | None,
    tenant: str | None,
    account: str | None,
    provider: str | None,
    by: str | None,
    as_json: bool,
) -> None:
    from smtpproxy.db.queries import Q
    from smtpproxy.errors import UsageError
    from smtpproxy.reports import bucket_count, series, summarise, time_range

    if by is not None and by not in ("hour", "day"):
        raise UsageError(f"--by {by!r}: expected hour or day")
    with database(ctx) as conn:
        now = utc_session(conn)
        start, end = time_range(since, until, now)
        assert start is not None
        end = end or now
        if by is not None and bucket_count(start, end, by) > MAX_BUCKETS:
            raise UsageError(
                f"--by {by} over this range makes more than {MAX_BUCKETS} bars: "
                "narrow the range or use --by day"
            )
        tenant_id, account_id = resolve_filters(conn, tenant, account)
        params = {
            "since": start,
            "until": end,
            "tenant_id": tenant_id,
            "account_id": account_id,
            "provider": provider,
        }
        groups = rows(conn, Q.report_stats_groups, {**params, "bucket": by})
        p95 = {r["provider_name"]: r["p95_ms"] for r in rows(conn, Q.report_stats_p95, params)}
    report: dict[str, Any] = {
        "since": start,
        "until": end,
        "filters": {"tenant": tenant, "account": account, "provider": provider},
        **summarise(groups, p95),
    }
    if by is not None:
        report["series"] = {"by": by, "buckets": series(groups, start, end, by)}
    if as_json:
        dump_json(report)
    else:
        _stats_human(report)


def _stats_human(report: dict[str, Any]) -> None:
    from smtpproxy.reports import format_ms, format_rate, format_time

    filters = ", ".join(f"{k} {v}" for k, v in report["filters"].items() if v is not None)
    say(
        f"delivery attempts from {format_time(report['since'])} to "
        f"{format_time(report['until'])} UTC" + (f" ({filters})" if filters else "")
    )
    total = report["total"]
    if not total["attempts"]:
        say("no delivery attempts in this range")
        return
    say(
        f"{total['attempts']:,} attempts: {total['delivered']:,} delivered, "
        f"{total['retried']:,} retried, {total['failed']:,} failed; "
        f"success rate {format_rate(total['success_rate'])}"
    )

    by_status = Table(title="by status", title_justify="left")
    by_status.add_column("status")
    by_status.add_column("attempts", justify="right")
    by_status.add_column("share", justify="right")
    for status, n in report["by_status"].items():
        by_status.add_row(
            status_text(status), Text(f"{n:,}"), Text(format_rate(n / total["attempts"]))
        )
    print_table(by_status)

    providers = _counts_table("by provider", "provider")
    providers.add_column("avg", justify="right")
    providers.add_column("p95", justify="right")
    for r in report["by_provider"]:
        providers.add_row(
            *_count_cells(r["provider"] or "(none)", r),
            Text(format_ms(r["avg_ms"])),
            Text(format_ms(r["p95_ms"])),
        )
    print_table(providers)

    tenants = _counts_table("by tenant", "tenant")
    for r in report["by_tenant"]:
        tenants.add_row(*_count_cells(r["tenant"], r))
    print_table(tenants)

    accounts = _counts_table("by account", "account", extra="tenant")
    for r in report["by_account"]:
        accounts.add_row(*_count_cells(r["account"], r, r["tenant"]))
    print_table(accounts)

    if "series" in report:
        _chart(report["series"])


def _counts_table(title: str, key: str, extra: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(key, no_wrap=True)
    if extra:
        table.add_column(extra, no_wrap=True)
    for name in ("attempts", "delivered", "retried", "failed", "success"):
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _count_cells(name: str, r: dict[str, Any], extra: str | None = None) -> list[Text]:
    from smtpproxy.reports import format_rate

    cells = [Text(name)]
    if extra is not None:
        cells.append(Text(extra))
    cells += [Text(f"{r[k]:,}") for k in ("attempts", "delivered", "retried", "failed")]
    cells.append(Text(format_rate(r["success_rate"])))
    return cells


def _chart(series: dict[str, Any]) -> None:
    """One line per bucket: a bar stacked from delivered, retried and failed attempts,
    scaled to the busiest bucket, then the numbers."""
    from smtpproxy.reports import BAR_CHARS, bar_cells, bucket_label

    buckets = series["buckets"]
    by = series["by"]
    classes = ("delivered", "retried", "failed")
    peak = max((b["attempts"] for b in buckets), default=0)
    labels = [bucket_label(b["start"], by) for b in buckets]
    numbers = [
        f"{b['attempts']:>{len(f'{peak:,}')},} ({b['delivered']:,} ok, "
        f"{b['retried']:,} retried, {b['failed']:,} failed)"
        for b in buckets
    ]
    label_w = max((len(x) for x in labels), default=0)
    numbers_w = max((len(x) for x in numbers), default=0)
    width = max(10, min(60, console.width - label_w - numbers_w - 4))
    legend = Text("per " + by + ":  ")
    for cls in classes:
        legend.append(BAR_CHARS[cls] * 2, style=STATUS_STYLE[cls])
        legend.append(f" {cls}  ")
    console.print(legend)
    for label, nums, b in zip(labels, numbers, buckets, strict=True):
        line = Text(label.ljust(label_w) + "  ")
        cells = bar_cells([b[c] for c in classes], peak, width)
        for cls, n in zip(classes, cells, strict=True):
            line.append(BAR_CHARS[cls] * n, style=STATUS_STYLE[cls])
        line.append(" " * (width - sum(cells)) + "  " + nums)
        console.print(line, no_wrap=True, overflow="ignore", crop=False)


# -- registration ------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    @app.command("logs")
    def logs(
        ctx: typer.Context,
        tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant's attempts."),
        account: str = typer.Option(None, "--account", "-a", help="Only this SMTP account's."),
        provider: str = typer.Option(None, "--provider", "-p", help="Only this provider's."),
        status: str = typer.Option(
            None,
            "--status",
            "-s",
            help="Only attempts with this outcome: delivered, retrying, failover, failed, "
            "dlq, storage_error.",
        ),
        recipient: str = typer.Option(
            None, "--recipient", "-r", help="Only attempts to this address (any case)."
        ),
        since: str = typer.Option(
            None, "--since", help="From WHEN: 30m, 2h, 7d back, or 2024-05-01[T10:00] (UTC)."
        ),
        until: str = typer.Option(None, "--until", help="Before WHEN (same forms as --since)."),
        message_id: str = typer.Option(
            None,
            "--message-id",
            "-m",
            help="One message: our id or its Message-ID header (with its split children).",
        ),
        limit: int = typer.Option(50, "--limit", "-n", help="Attempts per page."),
        page: int = typer.Option(1, "--page", help="Page number (1 = newest)."),
        before: int = typer.Option(
            None,
            "--before",
            metavar="LOG_ID",
            help="Cursor: attempts older than this log id (printed as the next page).",
        ),
        as_json: bool = JsonOption,
    ) -> None:
        """Delivery attempts, newest first: what happened to each message, and where.

        Each row is one attempt: when, which message, tenant and account, provider,
        outcome, attempt number, duration, error and recipients. Filters combine; pages
        continue with the printed --before cursor (or --page N).

        Example: [bold]smtpproxy logs --tenant acme --status failed --since 2h[/bold]
        """
        _logs(
            ctx,
            tenant=tenant,
            account=account,
            provider=provider,
            status=status,
            recipient=recipient,
            since=since,
            until=until,
            message_id=message_id,
            limit=limit,
            page=page,
            before=before,
            as_json=as_json,
        )

    @app.command("stats")
    def stats(
        ctx: typer.Context,
        since: str = typer.Option(
            "24h", "--since", help="From WHEN: 30m, 2h, 7d back, or 2024-05-01[T10:00] (UTC)."
        ),
        until: str = typer.Option(None, "--until", help="Before WHEN (default: now)."),
        tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant."),
        account: str = typer.Option(None, "--account", "-a", help="Only this SMTP account."),
        provider: str = typer.Option(None, "--provider", "-p", help="Only this provider."),
        by: str = typer.Option(
            None, "--by", metavar="hour|day", help="Also chart the attempts per hour or per day."
        ),
        as_json: bool = JsonOption,
    ) -> None:
        """Delivery statistics for a time range: by status, provider, tenant and account.

        Per provider: success rate, average and 95th percentile duration. A success
        rate is delivered attempts over all attempts; `retried` counts retrying and
        failover attempts, `failed` the final failures (failed, dlq, storage_error).

        Example: [bold]smtpproxy stats --since 7d --tenant acme --by day[/bold]
        """
        _stats(
            ctx,
            since=since,
            until=until,
            tenant=tenant,
            account=account,
            provider=provider,
            by=by,
            as_json=as_json,
        )
