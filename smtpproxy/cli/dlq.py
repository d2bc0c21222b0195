"""`smtpproxy dlq list|retry|purge`: the dead letters (status dlq, failed, storage_error).

`retry` puts messages back in the queue with a fresh attempt count (optionally through
another provider), `purge` removes them with their bodies; both can be previewed with
--dry-run and are recorded in the audit trail (who replayed or purged what).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from smtpproxy import models
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
from smtpproxy.db.pool import Conn

app = typer.Typer(no_args_is_help=True)

DEAD = list(models.values(models.DEAD))
COLUMNS = ["id", "tenant", "account", "status", "attempts", "provider", "finished_at", "last_error"]


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    from smtpproxy.config import ConfigValueError, parse_duration
    from smtpproxy.errors import UsageError

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ConfigValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration like 2h or 7d, or a date"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _select(
    conn: Conn,
    *,
    ids: list[str] | None,
    tenant: str | None,
    provider: str | None,
    since: str | None,
    reason: str | None,
    status: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    from smtpproxy import admin
    from smtpproxy.db.queries import Q
    from smtpproxy.errors import UsageError

    if tenant is not None:
        admin.tenant(conn, tenant)
    if status is not None and status not in DEAD:
        raise UsageError(f"--status must be one of {', '.join(DEAD)}")
    params = {
        "statuses": [status] if status else DEAD,
        "ids": ids or None,
        "tenant": tenant,
        "provider": provider,
        "since": _since(since),
        "reason": reason,
        "limit": limit,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        rows: list[dict[str, Any]] = cur.execute(Q.dlq_select, params).fetchall()
    return rows


def _chosen(
    conn: Conn, ids: list[str] | None, limit: int, **filters: str | None
) -> list[dict[str, Any]]:
    """The dead letters a retry or purge acts on: the ids named (each must be one) or
    those the filters select; with neither, nothing (refused)."""
    from smtpproxy.errors import UsageError

    if not ids and not any(filters.values()):
        raise UsageError("name message ids or give a filter (--tenant, --since, ...)")
    rows = _select(conn, ids=ids, limit=limit, **filters)
    if ids:
        missing = sorted(set(ids) - {r["id"] for r in rows})
        if missing:
            raise UsageError(f"not dead letters: {', '.join(missing)}")
    return rows


@contextmanager
def _streams(cfg: Any) -> Iterator[Any]:
    """The installation's Redis streams, for one command."""
    from smtpproxy.queue.streams import Streams, connect
    from smtpproxy.runtime import embedded

    client = connect(embedded.redis_url(cfg), socket_timeout=cfg.redis.socket_timeout)
    try:
        yield Streams(client, cfg.redis.key_prefix)
    finally:
        client.close()


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
    with admin_database(ctx, "read dead letters", "viewer") as conn:
        rows = _select(
            conn,
            ids=None,
            tenant=tenant,
            provider=provider,
            since=since,
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
    from smtpproxy.admin import audit
    from smtpproxy.db.queries import Q

    cfg = config(ctx)
    with admin_database(ctx, "retry dead letters", "operator") as conn:
        rows = _chosen(
            conn,
            ids,
            limit,
            tenant=tenant,
            provider=provider,
            since=since,
            reason=reason,
            status=status,
        )
        usable = [
            r for r in rows if r["body_deleted_at"] is None and r["status"] != "storage_error"
        ]
        skipped = [r["id"] for r in rows if r not in usable]
        if to_provider is not None:
            _check_provider(conn, cfg, {r["tenant"] for r in usable}, to_provider)
        if dry_run or not usable:
            _report(usable, skipped, as_json, dry_run=dry_run)
            return
        confirmer(yes)(f"Retry {len(usable)} messages?")
        requeued = conn.execute(
            Q.dlq_requeue, {"ids": [r["id"] for r in usable], "provider": to_provider}
        ).fetchall()
        audit.record(
            conn,
            "dlq.retry",
            f"{len(requeued)} messages",
            after={"ids": [str(r[0]) for r in requeued][:1000], "to_provider": to_provider},
        )
    _enqueue(cfg, requeued)
    _report([r for r in usable if r["id"] in {str(q[0]) for q in requeued}], skipped, as_json)


def _check_provider(conn: Conn, cfg: Any, tenants: set[str], name: str) -> None:
    from smtpproxy import admin
    from smtpproxy.errors import NotFoundError

    if name in cfg.providers:
        return
    for tenant in tenants:
        try:
            admin.provider(conn, tenant, name)
        except NotFoundError:
            raise NotFoundError(f"tenant {tenant!r} has no provider named {name!r}") from None


def _enqueue(cfg: Any, rows: list[Any]) -> None:
    """XADD the requeued messages; if Redis is down the reconciler picks them up."""
    from smtpproxy.errors import QueueUnavailable

    try:
        with _streams(cfg) as streams:
            streams.add_many(
                [{"id": str(r[0]), "tenant_id": str(r[1]), "account_id": str(r[2])} for r in rows]
            )
    except QueueUnavailable:
        say(
            "note: Redis is unavailable; the messages are queued in PostgreSQL and will be "
            "enqueued by a running instance within a minute"
        )


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
    from smtpproxy.admin import audit
    from smtpproxy.db.queries import Q
    from smtpproxy.store import open_store

    cfg = config(ctx)
    with admin_database(ctx, "purge dead letters (it deletes message history)", "admin") as conn:
        rows = _chosen(
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
        deleted = conn.execute(Q.dlq_delete, {"ids": [r["id"] for r in rows]}).fetchall()
        keys = {str(r[1]) for r in deleted}
        unused = [k for k in keys if not _key_in_use(conn, k)]
        audit.record(
            conn,
            "dlq.purge",
            f"{len(deleted)} messages",
            before={"ids": [str(r[0]) for r in deleted][:1000]},
        )
    store = open_store(cfg)
    try:
        for key in unused:
            store.delete(key)
    finally:
        store.close()
    _forget_dead_letters(cfg, {str(r[0]) for r in deleted})
    done(f"purged {len(deleted)} messages", as_json, ids=sorted(str(r[0]) for r in deleted))


def _key_in_use(conn: Conn, key: str) -> bool:
    from smtpproxy.db.queries import Q

    row = conn.execute(Q.storage_key_in_use, (key,)).fetchone()
    return bool(row and row[0])


def _forget_dead_letters(cfg: Any, ids: set[str]) -> None:
    """Remove the purged messages' entries from the dead-letter stream."""
    from smtpproxy.errors import QueueUnavailable

    try:
        with _streams(cfg) as streams:
            streams.delete_dead_letters(ids)
    except QueueUnavailable:
        say("note: Redis is unavailable; dead-letter stream entries were left in place")
