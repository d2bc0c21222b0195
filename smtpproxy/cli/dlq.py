"""`smtpproxy dlq list|retry|purge`: the dead letters (status dlq, failed, storage_error).

`retry` puts messages back in the queue with a fresh attempt count (optionally through
another provider), `purge` removes them with their bodies; both can be previewed with
--dry-run and are recorded in the audit trail (who replayed or purged what).
"""

from __future__ import annotations

from typing import Any

import typer

from smtpproxy.cli.common import (
    JsonOption,
    YesOption,
    admin_database,
    config,
    confirmer,
    done,
    emit_rows,
    say,
)

app = typer.Typer(no_args_is_help=True)

COLUMNS = ["id", "tenant", "account", "status", "attempts", "provider", "finished_at", "last_error"]


TenantOpt = typer.Option(None, "--tenant", "-t", help="Only this tenant's messages.")
ProviderOpt = typer.Option(None, "--provider", help="Only messages last tried with this provider.")
SinceOpt = typer.Option(None, "--since", help="Only messages that ended since (2h, 7d, or a date).")
ReasonOpt = typer.Option(
    None, "--reason", help="Only messages whose last error contains this text."
)
StatusOpt = typer.Option(None, "--status", help="Only dlq, failed or storage_error.")


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = TenantOpt,
    provider: str = ProviderOpt,
    since: str = SinceOpt,
    reason: str = ReasonOpt,
    status: str = StatusOpt,
    limit: int = typer.Option(100, "--limit", help="At most this many (newest first)."),
    as_json: bool = JsonOption,
) -> None:
    """List dead letters, newest first.

    Example: [bold]smtpproxy dlq list --tenant acme --since 1d --reason 429[/bold]
    """
    from smtpproxy.ops import dead_letters

    with admin_database(ctx, "read dead letters", "viewer") as conn:
        rows = dead_letters.select(
            conn,
            ids=None,
            tenant=tenant,
            provider=provider,
            since_text=since,
            reason=reason,
            status=status,
            limit=limit,
        )
    emit_rows(rows, COLUMNS, as_json, title="dead letters")


@app.command()
def retry(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(None, help="Message ids (or use the filters)."),
    tenant: str = TenantOpt,
    provider: str = ProviderOpt,
    since: str = SinceOpt,
    reason: str = ReasonOpt,
    status: str = StatusOpt,
    to_provider: str = typer.Option(
        None, "--to-provider", help="Send them through this provider instead of routing them."
    ),
    limit: int = typer.Option(10000, "--limit", help="At most this many."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be retried; change nothing."
    ),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Put dead letters back in the queue with a fresh attempt count.

    Messages whose body is gone cannot be retried and are skipped. The replay is
    recorded in the audit trail.

    Example: [bold]smtpproxy dlq retry --tenant acme --since 2h --to-provider backup --yes[/bold]
    """
    from smtpproxy.ops import dead_letters

    cfg = config(ctx)
    with admin_database(ctx, "retry dead letters", "operator") as conn:
        rows = dead_letters.chosen(
            conn,
            ids,
            limit,
            tenant=tenant,
            provider=provider,
            since=since,
            reason=reason,
            status=status,
        )
        usable, skipped = dead_letters.retryable(rows)
        if to_provider is not None:
            tenants = {r["tenant"] for r in usable}
            dead_letters.check_provider(conn, cfg, tenants, to_provider)
        if dry_run or not usable:
            _report(usable, skipped, as_json, dry_run=dry_run)
            return
        confirmer(yes)(f"Retry {len(usable)} messages?")
        requeued = dead_letters.requeue(conn, usable, to_provider)
    if not dead_letters.enqueue(cfg, requeued):
        say(
            "note: Redis is unavailable; the messages are queued in PostgreSQL and will be "
            "enqueued by a running instance within a minute"
        )
    _report([r for r in usable if r["id"] in {str(q[0]) for q in requeued}], skipped, as_json)


def _report(
    rows: list[dict[str, Any]], skipped: list[str], as_json: bool, dry_run: bool = False
) -> None:
    if dry_run:
        summary = f"would retry {len(rows)} messages"
    else:
        summary = f"retried {len(rows)} messages" if rows else "nothing to retry"
    done(
        summary + (f"; skipped {len(skipped)} without a body" if skipped else ""),
        as_json,
        dry_run=dry_run,
        ids=[r["id"] for r in rows],
        skipped=skipped,
    )
    if not as_json and dry_run and rows:
        emit_rows(rows, COLUMNS, False, title="would retry")


@app.command()
def purge(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(None, help="Message ids (or use the filters)."),
    tenant: str = TenantOpt,
    provider: str = ProviderOpt,
    since: str = SinceOpt,
    reason: str = ReasonOpt,
    status: str = StatusOpt,
    limit: int = typer.Option(10000, "--limit", help="At most this many."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be purged; change nothing."
    ),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete dead letters: their rows, delivery logs, bodies and dead-letter entries.

    It deletes message history, so a database role needs the admin grant for it
    (an operator may list and retry dead letters).

    Example: [bold]smtpproxy dlq purge --status failed --since 30d --dry-run[/bold]
    """
    from smtpproxy.ops import dead_letters

    cfg = config(ctx)
    with admin_database(ctx, "purge dead letters (it deletes message history)", "admin") as conn:
        rows = dead_letters.chosen(
            conn,
            ids,
            limit,
            tenant=tenant,
            provider=provider,
            since=since,
            reason=reason,
            status=status,
        )
        if dry_run or not rows:
            done(
                f"would purge {len(rows)} messages" if dry_run else "nothing to purge",
                as_json,
                dry_run=True,
                ids=[r["id"] for r in rows],
            )
            if not as_json and dry_run and rows:
                emit_rows(rows, COLUMNS, False, title="would purge")
            return
        confirmer(yes)(f"Purge {len(rows)} messages?")
        deleted, unused = dead_letters.delete(conn, rows)
    dead_letters.remove_bodies(cfg, unused)
    if not dead_letters.forget(cfg, set(deleted)):
        say("note: Redis is unavailable; dead-letter stream entries were left in place")
    done(f"purged {len(deleted)} messages", as_json, ids=sorted(deleted))
