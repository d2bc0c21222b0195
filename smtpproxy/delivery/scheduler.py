"""Background work that keeps the stream in step with PostgreSQL.

* the retry scheduler moves due `retrying` rows back to `queued` and XADDs them, in one
  database transaction (a failed XADD rolls the status change back), so a retry never
  waits in memory (invariant 6);
* the reconciler re-enqueues live rows that have no stream entry: queued longer than a
  grace period, or stuck in `sending` past the visibility timeout. This is how a Redis
  that restarted empty, or a deleted stream, is rebuilt from PostgreSQL (invariant 3);
* the directory reload keeps the routing snapshot current.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import trio
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.queries import Q
from smtpproxy.delivery import directory
from smtpproxy.delivery.consumer import DirectoryHolder
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable
from smtpproxy.resources import Resources

BATCH = 500


def _fields(row: dict[str, Any]) -> dict[str, str]:
    return {
        "id": row["id"],
        "tenant_id": str(row["tenant_id"]),
        "account_id": str(row["account_id"]),
    }


def enqueue_due_retries(res: Resources, limit: int = BATCH) -> int:
    """Blocking: one batch of due retries; returns how many were re-enqueued."""

    def work(conn: Any) -> int:
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(Q.take_due_retries, {"limit": limit}).fetchall()
        if rows:
            res.streams.add_many([_fields(r) for r in rows])  # failure rolls back the UPDATE
        return len(rows)

    return res.db.call(work)


def _touch(conn: Any, ids: list[str]) -> None:
    conn.execute(Q.touch_queued, (ids,))


def reconcile(res: Resources, grace: float, visibility: float) -> int:
    """Blocking: re-enqueue live rows missing from the stream; returns how many."""
    on_stream = set(res.streams.queued_message_ids())

    def stale(conn: Any) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            rows: list[dict[str, Any]] = cur.execute(
                Q.stale_queued, {"grace": grace, "visibility": visibility}
            ).fetchall()
        return rows

    missing = [r for r in res.db.call(stale) if r["id"] not in on_stream]
    for start in range(0, len(missing), BATCH):
        chunk = missing[start : start + BATCH]
        ids = [r["id"] for r in chunk]
        res.db.call(partial(_touch, ids=ids))
        res.streams.add_many([_fields(r) for r in chunk])
        for mid in ids:
            logger.bind(message_id=mid).warning("re-enqueued: it was not on the stream")
    return len(missing)


async def run_scheduler(
    res: Resources, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    interval = res.cfg.delivery.scheduler_interval
    task_status.started()
    while True:
        try:
            n = await res.db.offload(enqueue_due_retries, res)
        except (DatabaseUnavailable, QueueUnavailable) as exc:
            logger.warning("retry scheduler: {}", exc)
            n = 0
        if n:
            logger.info("re-enqueued {} due retries", n)
        await trio.sleep(0 if n >= BATCH else interval)


async def run_reconciler(
    res: Resources,
    *,
    interval: float = 60.0,
    grace: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    visibility = res.cfg.delivery.visibility_timeout
    task_status.started()
    while True:
        try:
            n = await res.db.offload(reconcile, res, grace, visibility)
        except (DatabaseUnavailable, QueueUnavailable) as exc:
            logger.warning("reconciler: {}", exc)
        else:
            if n:
                logger.warning("reconciler re-enqueued {} messages", n)
        await trio.sleep(interval)


async def run_directory_reload(
    res: Resources,
    holder: DirectoryHolder,
    pool: directory.ProviderPool,
    *,
    interval: float = 2.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            holder.snapshot = await res.db.run(lambda conn: directory.load(conn, res.cfg, res.box))
        except DatabaseUnavailable as exc:
            logger.warning("routing reload: {}", exc)
        await pool.aclose_retired()
