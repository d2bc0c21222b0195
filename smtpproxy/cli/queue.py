"""`smtpproxy queue status`: the delivery queue as PostgreSQL and Redis see it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from smtpproxy.cli.common import JsonOption, config, database, error_line, say
from smtpproxy.models import CLAIMABLE, DEAD, values

app = typer.Typer(no_args_is_help=True)


@app.command()
def status(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Show the queue per tenant (PostgreSQL) and per stream and consumer (Redis).

    Per tenant: messages queued, retrying (and when the next retry is due), being
    sent, the age of the oldest one waiting, and dead letters (dlq, failed,
    storage_error). From Redis: entries on every stream, entries a consumer read but has
    not finished, and the dead-letter stream.

    When Redis does not answer, the PostgreSQL numbers are still shown, and the command
    says so and exits 1.

    Example: [bold]smtpproxy queue status[/bold]
    """
    from smtpproxy.cli.reports import dump_json
    from smtpproxy.ops.lookup import queue_status

    cfg = config(ctx)
    with database(ctx) as conn:
        report, now, redis_error = queue_status(conn, cfg)
    if as_json:
        dump_json(report)
    else:
        _human(report, now)
    if redis_error:
        error_line(f"error: {redis_error}")
        raise typer.Exit(1)


def _human(report: dict[str, Any], now: datetime) -> None:
    from smtpproxy.cli.reports import print_table
    from smtpproxy.ops.reports import format_age, format_due

    redis = report["redis"]
    totals = report["totals"]
    say(
        f"PostgreSQL: {totals['queued']:,} queued, {totals['retrying']:,} retrying, "
        f"{totals['sending']:,} sending; oldest waiting {format_age(totals['oldest_live_age_s'])}"
        f"; next retry {format_due(totals['next_retry_at'], now)}; "
        f"{totals['dead']:,} dead letters ({totals['dlq']:,} dlq, {totals['failed']:,} failed, "
        f"{totals['storage_error']:,} storage_error)"
    )
    if redis["available"]:
        say(
            f"Redis: {redis['stream_length']:,} entries on {len(redis['streams'])} "
            f"stream{'s' if len(redis['streams']) != 1 else ''}, "
            f"{redis['pending']:,} read by a consumer and not finished; dead-letter stream "
            f"{redis['dlq_stream']}: {redis['dlq_stream_length']:,} entries"
        )
    else:
        say(f"Redis unavailable ({redis['error']}): stream numbers are missing")

    if report["tenants"]:
        table = Table(title="per tenant (UTC)", title_justify="left")
        table.add_column("tenant", no_wrap=True)
        for name in values(CLAIMABLE):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("next retry", no_wrap=True)
        table.add_column("sending", justify="right", no_wrap=True)
        table.add_column("oldest", justify="right", no_wrap=True)
        if redis["available"]:
            table.add_column("on stream", justify="right", no_wrap=True)
            table.add_column("pending", justify="right", no_wrap=True)
        for name in values(DEAD):
            table.add_column(name.replace("_", " "), justify="right", no_wrap=True)
        for t in report["tenants"]:
            cells = [
                Text(t["tenant"]),
                Text(f"{t['queued']:,}"),
                Text(f"{t['retrying']:,}"),
                Text(format_due(t["next_retry_at"], now)),
                Text(f"{t['sending']:,}"),
                Text(format_age(t["oldest_live_age_s"])),
            ]
            if redis["available"]:
                cells += [Text(f"{t['stream_length']:,}"), Text(f"{t['stream_pending']:,}")]
            cells += [Text(f"{t[k]:,}") for k in values(DEAD)]
            table.add_row(*cells)
        print_table(table)
    else:
        say("no messages waiting and no dead letters")

    if redis["available"] and redis["consumers"]:
        consumers = Table(title="pending per consumer", title_justify="left")
        consumers.add_column("consumer", no_wrap=True)
        consumers.add_column("pending", justify="right")
        for name, n in redis["consumers"].items():
            consumers.add_row(Text(name), Text(f"{n:,}"))
        print_table(consumers)
