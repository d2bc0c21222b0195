"""`smtpproxy queue status`: the delivery queue as PostgreSQL and Redis see it."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from smtpproxy.cli.common import JsonOption, config, database, error_line, say

if TYPE_CHECKING:
    from smtpproxy.config import Config

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
    from smtpproxy.cli.reports import dump_json, rows, utc_session
    from smtpproxy.db.queries import Q
    from smtpproxy.reports import queue_report

    cfg = config(ctx)
    with database(ctx) as conn:
        now = utc_session(conn)
        live = rows(conn, Q.report_queue_live, ())
        dead = rows(conn, Q.report_queue_dead, ())
        names = {int(r["id"]): str(r["name"]) for r in rows(conn, Q.report_tenant_names, ())}
    redis, redis_error = read_redis(cfg)
    report: dict[str, Any] = {
        **queue_report(live, dead, names, redis, now),
        "redis": {"available": True, **redis}
        if redis is not None
        else {"available": False, "error": redis_error},
    }
    if as_json:
        dump_json(report)
    else:
        _human(report, now)
    if redis is None:
        error_line(f"error: {redis_error}")
        raise typer.Exit(1)


def read_redis(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """Lengths and pending entries of every stream, or (None, why not)."""
    import redis

    from smtpproxy import embedded
    from smtpproxy.errors import UnavailableError
    from smtpproxy.queue.streams import Streams, connect, mapped_errors

    try:
        client = connect(embedded.redis_url(cfg), socket_timeout=cfg.redis.socket_timeout)
        try:
            streams = Streams(client, cfg.redis.key_prefix)
            keys = streams.all_streams()
            with mapped_errors():
                pipe = streams.client.pipeline(transaction=False)
                for key in [*keys, streams.dead_letters]:
                    pipe.xlen(key)
                lengths = [int(n) for n in pipe.execute()]
            pending = [streams.pending(key) for key in keys]
        finally:
            client.close()
    except UnavailableError as exc:
        return None, str(exc) if "redis" in str(exc) else f"redis unavailable: {exc}"
    except redis.RedisError as exc:
        return None, f"redis: {exc}"
    tenant_prefix = streams.stream_for("")
    consumers: dict[str, int] = {}
    for p in pending:
        for name, n in p.consumers.items():
            consumers[name] = consumers.get(name, 0) + n
    out = [
        {
            "stream": key,
            "tenant_id": _tenant_id(key, tenant_prefix),
            "length": length,
            "pending": p.count,
        }
        for key, length, p in zip(keys, lengths[:-1], pending, strict=True)
    ]
    return {
        "stream_length": sum(s["length"] for s in out),
        "pending": sum(s["pending"] for s in out),
        "consumers": dict(sorted(consumers.items())),
        "streams": out,
        "dlq_stream": streams.dead_letters,
        "dlq_stream_length": lengths[-1],
    }, ""


def _tenant_id(key: str, tenant_prefix: str) -> int | None:
    suffix = key[len(tenant_prefix) :] if key.startswith(tenant_prefix) else ""
    return int(suffix) if suffix.isdigit() else None


def _human(report: dict[str, Any], now: datetime) -> None:
    from smtpproxy.cli.reports import print_table
    from smtpproxy.reports import format_age, format_due

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
        for name in ("queued", "retrying"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("next retry", no_wrap=True)
        table.add_column("sending", justify="right", no_wrap=True)
        table.add_column("oldest", justify="right", no_wrap=True)
        if redis["available"]:
            table.add_column("on stream", justify="right", no_wrap=True)
            table.add_column("pending", justify="right", no_wrap=True)
        for name in ("dlq", "failed", "storage error"):
            table.add_column(name, justify="right", no_wrap=True)
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
            cells += [Text(f"{t[k]:,}") for k in ("dlq", "failed", "storage_error")]
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
