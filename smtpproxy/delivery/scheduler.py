"""Background work that keeps the stream in step with PostgreSQL.

* the retry scheduler moves due `retrying` rows back to `queued` and XADDs them, in one
  database transaction (a failed XADD rolls the status change back), so a retry never
  waits in memory (invariant 6);
* the reconciler re-enqueues live rows that have no stream entry: queued longer than a
  grace period, or stuck in `sending` past the visibility timeout. This is how a Redis
  that restarted empty, or a deleted stream, is rebuilt from PostgreSQL (invariant 3);
* the storage checker runs every check of fsck.py with repairs, hourly by default;
"""

from __future__ import annotations

from typing import Any

import trio
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable, StoreUnavailable
from smtpproxy.ops import fsck
from smtpproxy.runtime.resources import Resources

BATCH = 500


def _fields(row: dict[str, Any]) -> dict[str, str]:
    return {
        "id": row["id"],
        "tenant_id": str(row["tenant_id"]),
        "account_id": str(row["account_id"]),
    }


def enqueue_due_retries(res: Resources, limit: int = BATCH) -> int:
    """Blocking: one batch of due retries; returns how many were re-enqueued."""

    def work(conn: Conn) -> int:
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(Q.take_due_retries, {"limit": limit}).fetchall()
        if rows:
            res.streams.add_many([_fields(r) for r in rows])  # failure rolls back the UPDATE
        return len(rows)

    return res.db.call(work)


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
    res: Resources, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Every delivery.reconcile_interval, re-enqueue live rows that lost their stream
    entry (the storage checker's stream check, with delivery.reconcile_grace)."""
    interval = res.cfg.delivery.reconcile_interval
    opts = fsck.options_from_config(res, repair=True, grace=res.cfg.delivery.reconcile_grace)
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            result = await res.db.offload(fsck.Checker(res, opts).reconcile_stream)
        except fsck.AlreadyRunning:
            continue  # another instance is doing it
        except (DatabaseUnavailable, QueueUnavailable) as exc:
            logger.warning("reconciler: {}", exc)
            continue
        if result.repaired:
            logger.warning("reconciler re-enqueued {} messages", result.repaired)


async def run_checker(
    res: Resources, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The full storage check with repairs, every storage.check_interval."""
    interval = res.cfg.storage.check_interval
    opts = fsck.options_from_config(res, repair=True)
    task_status.started()
    while interval:
        await trio.sleep(interval)
        try:
            results = await res.db.offload(fsck.Checker(res, opts).run)
        except fsck.AlreadyRunning:
            continue
        except (DatabaseUnavailable, QueueUnavailable, StoreUnavailable) as exc:
            logger.warning("storage check: {}", exc)
            continue
        for r in results:
            if r.problems or r.repaired:
                logger.warning(
                    "storage check {}: {} checked, {} problems, {} repaired",
                    r.name,
                    r.checked,
                    r.problems,
                    r.repaired,
                )
    await trio.sleep_forever()
