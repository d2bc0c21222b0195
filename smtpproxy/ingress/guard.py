"""Shared counters behind the SMTP-time limits (trio side; decisions in ingress/limits.py).

* mail(): at MAIL FROM, for an account with a rate limit or a tenant with a monthly
  quota: one Redis round trip counts this transaction in the account's rate window and
  reads the tenant's month counter (rebuilt from PostgreSQL when missing, e.g. after
  Redis restarted empty);
* count_accepted(): after a batch is committed, its messages are added to their tenants'
  month counters;
* run_backlog_monitor(): keeps the delivery backlog (stream length) fresh in the gate,
  so backpressure is a plain comparison on the ingress thread.

Redis being down never refuses mail here: limits are then not enforced (and logged),
and ingress itself answers 451 if it cannot enqueue.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

import trio
from loguru import logger

from smtpproxy.db.pool import mapped_errors
from smtpproxy.db.queries import Q
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable
from smtpproxy.ingress import limits
from smtpproxy.ingress.gate import Gate
from smtpproxy.models import AccountIdentity, Submission
from smtpproxy.queue.streams import mapped_errors as redis_errors
from smtpproxy.runtime.resources import Resources

MONTH_TTL = 40 * 86400  # a month counter outlives its month by a little


class Guard:
    def __init__(self, res: Resources, gate: Gate) -> None:
        self._res = res
        self._gate = gate
        self._prefix = res.cfg.redis.key_prefix

    # -- MAIL FROM -----------------------------------------------------------------
    async def mail(self, account: AccountIdentity) -> str | None:
        """A refusal reply for this transaction, or None to go on."""
        try:
            return await self._res.redis_offload(self._mail_sync, account)
        except (QueueUnavailable, DatabaseUnavailable) as exc:
            logger.bind(account=account.username).warning("limits not checked: {}", exc)
            return None

    def _mail_sync(self, account: AccountIdentity) -> str | None:
        now = time.time()
        client = self._res.redis
        rate = limits.Rate.parse(account.rate_limit) if account.rate_limit else None
        month = limits.month_of(datetime.now(UTC))
        qkey = limits.quota_key(self._prefix, account.tenant_id, month)
        with redis_errors():
            pipe = client.pipeline(transaction=False)
            if rate is not None:
                window, _ = limits.rate_window(rate, now)
                rkey = limits.rate_key(self._prefix, account.account_id, rate, window)
                pipe.incr(rkey)
                pipe.expire(rkey, rate.per * 2)
            if account.monthly_limit is not None:
                pipe.get(qkey)
            results = pipe.execute()
        if rate is not None:
            count = int(results[0])
            if count > rate.count:
                _, retry_in = limits.rate_window(rate, now)
                return limits.over_rate_reply(retry_in)
        if account.monthly_limit is not None:
            used = results[-1]
            if used is None:
                used = self._rebuild_quota(account.tenant_id, qkey)
            if int(used) >= account.monthly_limit:
                return limits.QUOTA_REPLY
        return None

    def _rebuild_quota(self, tenant_id: int, key: str) -> int:
        """The month's count from PostgreSQL, stored unless another instance was first."""
        with mapped_errors(), self._res.db.connection() as conn:
            row = conn.execute(Q.quota_month_count, (tenant_id,)).fetchone()
        count = int(str(row[0])) if row else 0
        with redis_errors():
            self._res.redis.set(key, count, nx=True, ex=MONTH_TTL)
            return int(self._res.redis.get(key) or count)

    # -- after commit --------------------------------------------------------------
    async def count_accepted(self, subs: list[Submission]) -> None:
        tenants: dict[int, int] = {}
        for s in subs:
            if s.account.monthly_limit is not None:
                tenants[s.account.tenant_id] = tenants.get(s.account.tenant_id, 0) + 1
        if not tenants:
            return
        try:
            await self._res.redis_offload(self._count_sync, tenants)
        except QueueUnavailable as exc:
            logger.warning("monthly quota counters not updated: {}", exc)

    def _count_sync(self, tenants: dict[int, int]) -> None:
        month = limits.month_of(datetime.now(UTC))
        with redis_errors():
            pipe = self._res.redis.pipeline(transaction=False)
            for tenant_id, n in tenants.items():
                key = limits.quota_key(self._prefix, tenant_id, month)
                # only counters that exist: a missing one is rebuilt from PostgreSQL,
                # which already counts these messages
                pipe.eval(
                    "if redis.call('exists', KEYS[1]) == 1 then "
                    "return redis.call('incrby', KEYS[1], ARGV[1]) end return 0",
                    1,
                    key,
                    n,
                )
            pipe.execute()

    # -- backpressure ----------------------------------------------------------------
    async def run_backlog_monitor(
        self,
        *,
        interval: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            with contextlib.suppress(QueueUnavailable):  # readiness reports Redis itself
                self._gate.backlog = await self._res.redis_offload(self._res.streams.length)
            await trio.sleep(interval)
