"""What the operator reports read: delivery attempts (`logs`), their sums (`stats`), one
message's story (`message show`) and the queue (`queue status`), from PostgreSQL and
Redis. The sums, time ranges and timelines are pure functions in ops/reports.py; this
module runs the queries and hands their rows to them.

Reads only: every session is made read-only and UTC (timestamps and day/hour buckets).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs
import redis

from smtpproxy import admin
from smtpproxy.config import Config
from smtpproxy.db.pool import Conn, rows
from smtpproxy.db.queries import Q
from smtpproxy.errors import NotFoundError, UnavailableError, UsageError
from smtpproxy.ops.reports import (
    LOG_STATUSES,
    body_state,
    bucket_count,
    header_id,
    queue_report,
    series,
    summarise,
    time_range,
    timeline,
)
from smtpproxy.queue.streams import Streams, connect, mapped_errors
from smtpproxy.runtime import embedded

Row = dict[str, Any]
MAX_BUCKETS = 2000  # bars in a --by series
PARENT_FIELDS = ("id", "status", "rcpt_to", "finished_at")


def utc_session(conn: Conn) -> datetime:
    """Make the connection read-only and UTC, and return the server's now."""
    conn.read_only = True
    conn.execute("SET TIME ZONE 'UTC'")
    row = conn.execute(Q.report_now).fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


def resolve_filters(
    conn: Conn, tenant: str | None, account: str | None
) -> tuple[int | None, int | None]:
    """Tenant and account ids for --tenant/--account; an unknown name is an error, and
    so is an account of another tenant."""
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


# -- logs --------------------------------------------------------------------------------


@attrs.frozen
class LogFilter:
    tenant: str | None = None
    account: str | None = None
    provider: str | None = None
    status: str | None = None
    recipient: str | None = None
    since: str | None = None
    until: str | None = None
    message_id: str | None = None


def delivery_logs(
    conn: Conn, f: LogFilter, *, limit: int, page: int, before: int | None
) -> tuple[list[Row], int | None]:
    """A page of delivery attempts, newest first, and the --before that continues it
    (None: no more)."""
    if f.status is not None and f.status not in LOG_STATUSES:
        raise UsageError(f"--status {f.status!r}: expected one of {', '.join(LOG_STATUSES)}")
    now = utc_session(conn)
    start, end = time_range(f.since, f.until, now)
    tenant_id, account_id = resolve_filters(conn, f.tenant, f.account)
    message_ids = None
    if f.message_id is not None:
        wanted = header_id(f.message_id)
        message_ids = [r["id"] for r in rows(conn, Q.report_message_family, {"message": wanted})]
        if not message_ids:
            raise NotFoundError(f"no message with the id or Message-ID {f.message_id!r}")
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
            "provider": f.provider,
            "status": f.status,
            "recipient": f.recipient.strip() if f.recipient else None,
            "message_ids": message_ids,
            "limit": limit + 1,
            "offset": (page - 1) * limit,
        },
    )
    more = len(found) > limit
    found = found[:limit]
    return found, (found[-1]["id"] if more and found else None)


# -- stats -------------------------------------------------------------------------------


def delivery_stats(
    conn: Conn,
    *,
    since: str,
    until: str | None,
    tenant: str | None,
    account: str | None,
    provider: str | None,
    by: str | None,
) -> dict[str, Any]:
    """Delivery attempts summed up by outcome, provider, tenant and account, and with
    --by a series of hour or day buckets."""
    if by is not None and by not in ("hour", "day"):
        raise UsageError(f"--by {by!r}: expected hour or day")
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
    return report


# -- one message -------------------------------------------------------------------------


class AmbiguousMessage(UsageError):
    """A Message-ID header that several messages carry: show one by its id."""

    def __init__(self, wanted: str, matches: list[Row]) -> None:
        shown = "100+" if len(matches) > 100 else str(len(matches))
        super().__init__(
            f"{shown} messages have the Message-ID <{header_id(wanted)}>: "
            "show one of them by its id"
        )
        self.matches = matches


def message_story(conn: Conn, ident: str) -> tuple[dict[str, Any], datetime]:
    """One message (by our id or its Message-ID header) with its split children, every
    attempt, its body's state and its timeline; and the server's now."""
    wanted = ident.strip()
    now = utc_session(conn)
    found = rows(conn, Q.report_message_find, {"id": wanted, "header_id": header_id(wanted)})
    exact = [m for m in found if m["id"] == wanted]
    ids = {m["id"] for m in found}
    # children of a split carry their parent's Message-ID: count only the roots
    roots = exact or [m for m in found if m["parent_id"] not in ids]
    if not roots:
        raise NotFoundError(f"no message with the id or Message-ID {wanted!r}")
    if len(roots) > 1:
        raise AmbiguousMessage(wanted, roots)
    message = rows(conn, Q.report_message, (roots[0]["id"],))[0]
    children = rows(conn, Q.report_message_descendants, {"id": message["id"]})
    attempts = rows(
        conn, Q.report_message_attempts, ([message["id"], *(c["id"] for c in children)],)
    )
    parent = None
    if message["parent_id"] is not None:
        found_parent = rows(conn, Q.report_message, (message["parent_id"],))
        if found_parent:
            parent = {k: found_parent[0][k] for k in PARENT_FIELDS}
    story = {
        **{k: v for k, v in message.items() if k not in ("storage_key", "body_deleted_at")},
        "body": body_state(message),
        "parent": parent,
        "children": children,
        "delivery_attempts": attempts,
        "timeline": timeline(message, children, attempts),
    }
    return story, now


# -- the queue ---------------------------------------------------------------------------


def queue_status(conn: Conn, cfg: Config) -> tuple[dict[str, Any], datetime, str]:
    """The queue per tenant (PostgreSQL) and per stream and consumer (Redis); the
    server's now; and why Redis did not answer ("" when it did)."""
    now = utc_session(conn)
    live = rows(conn, Q.report_queue_live, ())
    dead = rows(conn, Q.report_queue_dead, ())
    names = {int(r["id"]): str(r["name"]) for r in rows(conn, Q.report_tenant_names, ())}
    streams, redis_error = read_redis(cfg)
    report: dict[str, Any] = {
        **queue_report(live, dead, names, streams, now),
        "redis": {"available": True, **streams}
        if streams is not None
        else {"available": False, "error": redis_error},
    }
    return report, now, redis_error


def read_redis(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """Lengths and pending entries of every stream, or (None, why not)."""
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
