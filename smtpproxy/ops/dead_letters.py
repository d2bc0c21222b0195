"""Dead letters (status dlq, failed, storage_error): select them, put them back in the
queue, purge them with their bodies and dead-letter stream entries.

Every function that changes something runs in the caller's transaction and records the
change in the audit trail there; what touches Redis or the store after the commit
(`enqueue`, `remove_bodies`, `forget`) says whether it could, so the caller can tell the
user, and loses nothing when it cannot (the reconciler enqueues requeued rows, fsck
removes orphan bodies).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from smtpproxy import admin, models
from smtpproxy.admin import audit
from smtpproxy.config import Config, ConfigValueError, parse_duration
from smtpproxy.db.pool import Conn, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import NotFoundError, QueueUnavailable, UsageError
from smtpproxy.queue.streams import Streams, connect
from smtpproxy.runtime import embedded
from smtpproxy.store import open_store

DEAD = list(models.values(models.DEAD))
Row = dict[str, Any]


def since(text: str | None) -> datetime | None:
    """--since: a duration back from now (2h, 7d) or a date."""
    if text is None:
        return None
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


def select(
    conn: Conn,
    *,
    ids: Sequence[str] | None,
    tenant: str | None,
    provider: str | None,
    since_text: str | None,
    reason: str | None,
    status: str | None,
    limit: int,
) -> list[Row]:
    """Dead letters, newest first, as the filters select them."""
    if tenant is not None:
        admin.tenant(conn, tenant)
    if status is not None and status not in DEAD:
        raise UsageError(f"--status must be one of {', '.join(DEAD)}")
    params = {
        "statuses": [status] if status else DEAD,
        "ids": list(ids) if ids else None,
        "tenant": tenant,
        "provider": provider,
        "since": since(since_text),
        "reason": reason,
        "limit": limit,
    }
    return rows(conn, Q.dlq_select, params)


def chosen(conn: Conn, ids: Sequence[str] | None, limit: int, **filters: str | None) -> list[Row]:
    """The dead letters a retry or purge acts on: the ids named (each must be one) or
    those the filters select; with neither, nothing (refused)."""
    if not ids and not any(filters.values()):
        raise UsageError("name message ids or give a filter (--tenant, --since, ...)")
    found = select(
        conn,
        ids=ids,
        limit=limit,
        tenant=filters.get("tenant"),
        provider=filters.get("provider"),
        since_text=filters.get("since"),
        reason=filters.get("reason"),
        status=filters.get("status"),
    )
    if ids:
        missing = sorted(set(ids) - {r["id"] for r in found})
        if missing:
            raise UsageError(f"not dead letters: {', '.join(missing)}")
    return found


def retryable(rows: list[Row]) -> tuple[list[Row], list[str]]:
    """Those that can be sent again, and the ids of those whose body is gone."""
    usable = [r for r in rows if r["body_deleted_at"] is None and r["status"] != "storage_error"]
    return usable, [r["id"] for r in rows if r not in usable]


def check_provider(conn: Conn, cfg: Config, tenants: set[str], name: str) -> None:
    """--to-provider must name a provider of the config file or of every tenant."""
    if name in cfg.providers:
        return
    for tenant in tenants:
        try:
            admin.provider(conn, tenant, name)
        except NotFoundError:
            raise NotFoundError(f"tenant {tenant!r} has no provider named {name!r}") from None


def requeue(conn: Conn, rows: list[Row], to_provider: str | None) -> list[tuple[Any, ...]]:
    """Back to the queue with a fresh attempt count; (id, tenant_id, account_id) of each."""
    requeued: list[tuple[Any, ...]] = conn.execute(
        Q.dlq_requeue, {"ids": [r["id"] for r in rows], "provider": to_provider}
    ).fetchall()
    audit.record(
        conn,
        "dlq.retry",
        f"{len(requeued)} messages",
        after={"ids": [str(r[0]) for r in requeued][:1000], "to_provider": to_provider},
    )
    return requeued


def delete(conn: Conn, rows: list[Row]) -> tuple[list[str], list[str]]:
    """Delete the rows with their delivery logs: (ids deleted, storage keys no message
    uses any more)."""
    deleted = conn.execute(Q.dlq_delete, {"ids": [r["id"] for r in rows]}).fetchall()
    keys = {str(r[1]) for r in deleted}
    unused = [k for k in keys if not _key_in_use(conn, k)]
    audit.record(
        conn,
        "dlq.purge",
        f"{len(deleted)} messages",
        before={"ids": [str(r[0]) for r in deleted][:1000]},
    )
    return [str(r[0]) for r in deleted], unused


def _key_in_use(conn: Conn, key: str) -> bool:
    row = conn.execute(Q.storage_key_in_use, (key,)).fetchone()
    return bool(row and row[0])


@contextmanager
def _streams(cfg: Config) -> Iterator[Streams]:
    """The installation's Redis streams, for one command."""
    client = connect(embedded.redis_url(cfg), socket_timeout=cfg.redis.socket_timeout)
    try:
        yield Streams(client, cfg.redis.key_prefix)
    finally:
        client.close()


def enqueue(cfg: Config, requeued: list[tuple[Any, ...]]) -> bool:
    """XADD the requeued messages; False when Redis is down (the reconciler of a
    running instance enqueues them within a minute)."""
    try:
        with _streams(cfg) as streams:
            streams.add_many(
                [
                    {"id": str(r[0]), "tenant_id": str(r[1]), "account_id": str(r[2])}
                    for r in requeued
                ]
            )
    except QueueUnavailable:
        return False
    return True


def remove_bodies(cfg: Config, keys: list[str]) -> None:
    """Delete the purged messages' bodies from the store."""
    store = open_store(cfg)
    try:
        for key in keys:
            store.delete(key)
    finally:
        store.close()


def forget(cfg: Config, ids: set[str]) -> bool:
    """Remove the purged messages' entries from the dead-letter stream; False when
    Redis is down (they stay, pointing at nothing)."""
    try:
        with _streams(cfg) as streams:
            streams.delete_dead_letters(ids)
    except QueueUnavailable:
        return False
    return True
