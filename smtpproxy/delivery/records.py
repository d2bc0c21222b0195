"""Recording what happened to a claimed message, in PostgreSQL (and the dead-letter stream).

Every write is one transaction that ends the consumer's claim with a compare-and-set
(`WHERE status = 'sending' AND claimed_by = <this consumer>`): a consumer that lost its
claim (it was too slow and another took the message over) records nothing. Writes are
retried while PostgreSQL is unreachable, so an outcome is not lost to an outage.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
import trio

from smtpproxy.db.queries import Q
from smtpproxy.delivery.retry import Decision, RetryPolicy, decide
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable
from smtpproxy.models import Outcome, Status
from smtpproxy.queue.streams import dead_letter_fields
from smtpproxy.resources import Resources

T = TypeVar("T")


@attrs.frozen
class Claimed:
    """A message this consumer holds (status `sending`)."""

    id: str
    tenant_id: int
    account_id: int
    mail_from: str
    rcpt_to: tuple[str, ...]
    storage_key: str
    attempts: int
    created_at: datetime
    route_override: str | None = None
    age_from: datetime | None = None  # replayed_at of a replayed dead letter

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claimed:
        return cls(
            id=row["id"],
            tenant_id=row["tenant_id"],
            account_id=row["account_id"],
            mail_from=row["mail_from"],
            rcpt_to=tuple(row["rcpt_to"]),
            storage_key=row["storage_key"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            route_override=row.get("route_override"),
            age_from=row.get("age_from"),
        )

    def age(self) -> float:
        """Seconds since acceptance, or since an operator replayed it (for max_age)."""
        return (datetime.now(UTC) - (self.age_from or self.created_at)).total_seconds()


def _when(delay: float | None) -> datetime | None:
    return None if delay is None else datetime.now(UTC) + timedelta(seconds=delay)


class Recorder:
    def __init__(self, res: Resources, consumer: str, policy: RetryPolicy) -> None:
        self._res = res
        self.consumer = consumer
        self.policy = policy

    async def db_retrying(self, fn: Callable[[Any], T], log: Any) -> T:
        """Run fn(conn) until PostgreSQL answers."""
        delay = 0.5
        while True:
            try:
                return await self._res.db.run(fn)
            except DatabaseUnavailable as exc:
                log.warning("database unavailable, retrying in {:.1f} s: {}", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 10)

    # -- one attempt ------------------------------------------------------------------
    async def outcome(
        self,
        msg: Claimed,
        provider: str,
        outcome: Outcome,
        *,
        log: Any,
        duration_ms: int | None = None,  # None: no provider was called
        note: str = "",
    ) -> Decision:
        """Decide what the outcome means for the message (retry policy) and record it."""
        decision = decide(outcome, msg.attempts, msg.age(), self.policy)
        await self.write(
            msg, provider, outcome, decision, log=log, duration_ms=duration_ms, note=note
        )
        return decision

    async def write(
        self,
        msg: Claimed,
        provider: str,
        outcome: Outcome,
        decision: Decision,
        *,
        log: Any,
        duration_ms: int | None = None,  # None: no provider was called
        note: str = "",
    ) -> None:
        called = duration_ms is not None
        duration_ms = duration_ms or 0
        detail = "; ".join(
            part
            for part in (
                note,
                outcome.detail if decision.status is not Status.DELIVERED else "",
                _partial(outcome),
            )
            if part
        )
        deferred = [r for r in outcome.deferred if r in msg.rcpt_to]
        delay = self.policy.delay(msg.attempts) if deferred else None

        def write(conn: Any) -> bool:
            conn.execute(
                Q.insert_delivery_log,
                self._log_row(msg, provider, decision.status.value, outcome, detail, duration_ms),
            )
            if decision.status is Status.DELIVERED and deferred:
                conn.execute(
                    Q.defer_recipients,
                    {
                        "child_id": f"{msg.id}.r{msg.attempts}",
                        "parent_id": msg.id,
                        "rcpt_to": deferred,
                        "next_attempt_at": _when(delay),
                    },
                )
            return self._finish_row(conn, msg, decision, provider, outcome)

        if not await self.db_retrying(write, log):
            log.warning("outcome not recorded: another consumer took the message over")
            return
        self._count(msg, provider, decision.status.value, duration_ms if called else None)
        self._log(msg, provider, outcome, decision, duration_ms=duration_ms, log=log)
        if deferred:
            log.warning(
                "{} recipient(s) deferred by {}; retried on their own", len(deferred), provider
            )
        if decision.status in (Status.DLQ, Status.STORAGE_ERROR):
            await self.dead_letter(msg, decision, log)

    async def failover(
        self, msg: Claimed, provider: str, outcome: Outcome, *, duration_ms: int, log: Any
    ) -> None:
        """A transient failure of one provider before the next one is tried."""
        row = self._log_row(msg, provider, "failover", outcome, outcome.detail, duration_ms)
        await self.db_retrying(lambda conn: conn.execute(Q.insert_delivery_log, row), log)
        self._count(msg, provider, "failover", duration_ms)
        log.bind(provider=provider).warning("failing over after: {}", outcome.detail)

    def _count(self, msg: Claimed, provider: str, outcome: str, duration_ms: int | None) -> None:
        metrics = self._res.metrics
        tenant = str(msg.tenant_id)  # two tenants' providers may share a name
        provider = provider or "none"  # no provider was chosen (no route, body unreadable)
        metrics.deliveries.inc(tenant, provider, outcome)
        if duration_ms is not None:
            metrics.delivery_seconds.observe(duration_ms / 1000, tenant, provider)

    @staticmethod
    def _log_row(  # noqa: PLR0917 - the columns of one delivery_logs row
        msg: Claimed, provider: str, status: str, outcome: Outcome, detail: str, duration_ms: int
    ) -> dict[str, Any]:
        return {
            "message_id": msg.id,
            "account_id": msg.account_id,
            "tenant_id": msg.tenant_id,
            "provider_name": provider,
            "status": status,
            "error_message": detail,
            "attempt_number": msg.attempts,
            "duration_ms": duration_ms,
            "provider_message_id": outcome.provider_message_id,
            "recipients": list(msg.rcpt_to),
        }

    @staticmethod
    def _log(
        msg: Claimed,
        provider: str,
        outcome: Outcome,
        decision: Decision,
        *,
        duration_ms: int,
        log: Any,
    ) -> None:
        plog = log.bind(provider=provider)
        if decision.status is Status.DELIVERED:
            plog.bind(provider_message_id=outcome.provider_message_id).info(
                "delivered in {} ms", duration_ms
            )
        elif decision.status is Status.RETRYING:
            plog.warning(
                "attempt {} failed, retry in {:.0f} s: {}",
                msg.attempts,
                decision.delay,
                outcome.detail,
            )
        else:
            plog.error("{}: {}", decision.status.value, decision.reason or outcome.detail)

    def _finish_row(
        self, conn: Any, msg: Claimed, decision: Decision, provider: str, outcome: Outcome | None
    ) -> bool:
        error = None
        if decision.status is not Status.DELIVERED:
            error = decision.reason or (outcome.detail if outcome else "") or None
        row = conn.execute(
            Q.finish_attempt,
            {
                "id": msg.id,
                "consumer": self.consumer,
                "status": decision.status.value,
                "next_attempt_at": _when(decision.delay),
                "provider_name": provider or None,
                "provider_message_id": outcome.provider_message_id if outcome else None,
                "last_error": error,
                "final": decision.status not in (Status.RETRYING, Status.QUEUED),
            },
        ).fetchone()
        if row is None:
            conn.rollback()
            return False
        return True

    # -- other endings of a claim -----------------------------------------------------
    async def split(self, msg: Claimed, chunks: list[tuple[str, ...]], log: Any) -> None:
        """One child message per recipient group, queued on its own; the parent is final."""
        children = [(f"{msg.id}.{n}", rcpts) for n, rcpts in enumerate(chunks, start=1)]

        def split(conn: Any) -> bool:
            for child_id, rcpts in children:
                conn.execute(
                    Q.split_message,
                    {"child_id": child_id, "parent_id": msg.id, "rcpt_to": list(rcpts)},
                )
            return self._finish_row(conn, msg, Decision(Status.SPLIT), "", None)

        if not await self.db_retrying(split, log):
            log.warning("lost the claim before splitting; another consumer has it")
            return
        log.info("split into {} messages by route", len(children))
        fields = [
            {"id": cid, "tenant_id": str(msg.tenant_id), "account_id": str(msg.account_id)}
            for cid, _ in children
        ]
        try:
            await self._res.redis_offload(self._res.streams.add_many, fields)
        except QueueUnavailable as exc:
            log.warning("could not enqueue split messages (the reconciler will): {}", exc)

    async def release(self, msg: Claimed, reason: str, log: Any) -> None:
        """Give the message back without counting an attempt; it is retried shortly."""
        params = {
            "id": msg.id,
            "consumer": self.consumer,
            "next_attempt_at": _when(random.uniform(5.0, 15.0)),  # noqa: S311 - jitter
        }
        await self.db_retrying(lambda conn: conn.execute(Q.release_claim, params), log)
        log.info("put back for later: {}", reason)

    async def dead_letter(self, msg: Claimed, decision: Decision, log: Any) -> None:
        fields = dead_letter_fields(
            msg.id,
            msg.tenant_id,
            msg.account_id,
            status=decision.status,
            attempts=msg.attempts,
            reason=decision.reason,
        )
        try:
            await self._res.redis_offload(self._res.streams.add_dead_letter, fields)
        except QueueUnavailable as exc:
            log.warning("could not add to the dead-letter stream: {}", exc)


def _partial(outcome: Outcome) -> str:
    parts = []
    if outcome.rejected:
        parts.append("rejected: " + ", ".join(outcome.rejected))
    if outcome.deferred:
        parts.append("deferred: " + ", ".join(outcome.deferred))
    return "; ".join(parts)
