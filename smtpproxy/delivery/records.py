"""What ends a claim, as values: the rows one delivery attempt leaves in PostgreSQL. Pure.

A consumer that claimed a message (status `sending`) ends the claim with exactly one
Finish: the message's next status (with the next attempt time, the provider that
carried it, the error), the delivery_logs rows of the attempt (a `failover` row for
each provider that failed transiently before the one that decided, then the decision's
row), and the child messages it creates (recipients a provider deferred, or the route
groups of a split). delivery/recorder.py writes Finishes in batches, and decides
nothing; nothing here does I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from smtpproxy.delivery.retry import Decision, RetryPolicy, decide
from smtpproxy.models import DEAD_LETTERED, FINAL, Outcome, Status, may_transition


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
    size: int = 0
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
            size=row.get("size") or 0,
            route_override=row.get("route_override"),
            age_from=row.get("age_from"),
        )

    def age(self) -> float:
        """Seconds since acceptance, or since an operator replayed it (for max_age)."""
        return (datetime.now(UTC) - (self.age_from or self.created_at)).total_seconds()


@attrs.frozen
class LogRow:
    """One delivery_logs row."""

    message_id: str
    account_id: int
    tenant_id: int
    provider_name: str
    status: str  # the message's status after the attempt, or "failover"
    error_message: str
    attempt_number: int
    duration_ms: int
    provider_message_id: str | None
    recipients: tuple[str, ...]


@attrs.frozen
class Child:
    """A message made from a claimed one: a route group of a split (queued now), or the
    recipients a provider deferred (retrying later, the parent's attempts carried)."""

    id: str
    rcpt_to: tuple[str, ...]
    deferred: bool = False
    next_attempt_at: datetime | None = None


@attrs.frozen
class Call:
    """A provider call, for /metrics: which provider, how it ended, how long it took
    (None when no provider was called)."""

    provider: str
    outcome: str
    duration_ms: int | None


@attrs.frozen
class Finish:
    """The end of one claim."""

    msg: Claimed
    # a claim ends only in a status models.TRANSITIONS allows after sending
    status: Status = attrs.field(validator=lambda _, __, s: _leaves_sending(s))
    next_attempt_at: datetime | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    last_error: str | None = None
    released: bool = False  # given back without counting the attempt (provider saturated)
    logs: tuple[LogRow, ...] = ()
    children: tuple[Child, ...] = ()
    calls: tuple[Call, ...] = ()
    # what to log once it is recorded: (level, text)
    says: tuple[tuple[str, str], ...] = ()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def dead_letter(self) -> bool:
        return self.status in DEAD_LETTERED


def _leaves_sending(status: Status) -> None:
    if not may_transition(Status.SENDING, status):
        raise ValueError(f"a claim cannot end in status {status.value}")


def when(delay: float | None) -> datetime | None:
    return None if delay is None else datetime.now(UTC) + timedelta(seconds=delay)


def log_row(  # noqa: PLR0917 - the columns of one delivery_logs row
    msg: Claimed, provider: str, status: str, outcome: Outcome, detail: str, duration_ms: int
) -> LogRow:
    return LogRow(
        message_id=msg.id,
        account_id=msg.account_id,
        tenant_id=msg.tenant_id,
        provider_name=provider,
        status=status,
        error_message=detail,
        attempt_number=msg.attempts,
        duration_ms=duration_ms,
        provider_message_id=outcome.provider_message_id,
        recipients=msg.rcpt_to,
    )


def failover(msg: Claimed, provider: str, outcome: Outcome, duration_ms: int) -> LogRow:
    """The row of a provider that failed transiently before the next one is tried."""
    return log_row(msg, provider, "failover", outcome, outcome.detail, duration_ms)


def attempt(
    msg: Claimed,
    provider: str,
    outcome: Outcome,
    policy: RetryPolicy,
    *,
    duration_ms: int | None = None,  # None: no provider was called
    note: str = "",
    failovers: tuple[tuple[LogRow, int], ...] = (),  # (row, duration) of providers passed
    decision: Decision | None = None,  # None: the retry policy decides
) -> Finish:
    """The Finish of an attempt whose outcome is known."""
    decision = decision or decide(outcome, msg.attempts, msg.age(), policy)
    status = decision.status
    called = duration_ms is not None
    duration = duration_ms or 0
    detail = "; ".join(
        part
        for part in (
            note,
            outcome.detail if status is not Status.DELIVERED else "",
            _partial(outcome),
        )
        if part
    )
    deferred = tuple(r for r in outcome.deferred if r in msg.rcpt_to)
    children: tuple[Child, ...] = ()
    says: list[tuple[str, str]] = []
    if status is Status.DELIVERED and deferred:
        delay = policy.delay(msg.attempts)
        children = (Child(f"{msg.id}.r{msg.attempts}", deferred, True, when(delay)),)
    error = None
    if status is not Status.DELIVERED:
        error = decision.reason or outcome.detail or None
    if status is Status.DELIVERED:
        says.append(("INFO", f"delivered in {duration} ms"))
    elif status is Status.RETRYING:
        says.append(
            (
                "WARNING",
                f"attempt {msg.attempts} failed, retry in {decision.delay or 0:.0f} s: "
                f"{outcome.detail}",
            )
        )
    else:
        says.append(("ERROR", f"{status.value}: {decision.reason or outcome.detail}"))
    if deferred:
        says.append(
            (
                "WARNING",
                f"{len(deferred)} recipient(s) deferred by {provider}; retried on their own",
            )
        )
    row = log_row(msg, provider, status.value, outcome, detail, duration)
    return Finish(
        msg=msg,
        status=status,
        next_attempt_at=when(decision.delay),
        provider=provider or None,
        provider_message_id=outcome.provider_message_id,
        last_error=error,
        logs=(*(r for r, _ in failovers), row),
        children=children,
        calls=(
            *(Call(r.provider_name, "failover", ms) for r, ms in failovers),
            Call(provider or "none", status.value, duration if called else None),
        ),
        says=tuple(says),
    )


def split(msg: Claimed, chunks: list[tuple[str, ...]]) -> Finish:
    """One child message per recipient group, queued on its own; the parent is final."""
    children = tuple(Child(f"{msg.id}.{n}", rcpts) for n, rcpts in enumerate(chunks, start=1))
    return Finish(
        msg=msg,
        status=Status.SPLIT,
        children=children,
        says=(("INFO", f"split into {len(children)} messages by route"),),
    )


def release(msg: Claimed, reason: str, delay: float) -> Finish:
    """Give the message back without counting an attempt; it is retried after delay."""
    return Finish(
        msg=msg,
        status=Status.RETRYING,
        next_attempt_at=when(delay),
        released=True,
        says=(("INFO", f"put back for later: {reason}"),),
    )


def paced(msg: Claimed, provider: str, reason: str, delay: float, policy: RetryPolicy) -> Finish:
    """The message waits for its sender's pace: back for later without counting an
    attempt, the reason kept for `message show`; dead-lettered when that would take it
    past delivery.max_age."""
    if msg.age() + delay > policy.max_age:
        give_up = Decision(Status.DLQ, reason=f"still {reason} at delivery.max_age")
        return attempt(msg, provider, Outcome.retry(reason), policy, decision=give_up)
    return Finish(
        msg=msg,
        status=Status.RETRYING,
        next_attempt_at=when(delay),
        last_error=reason,
        released=True,
        calls=(Call(provider, "paced", None),),
        says=(("INFO", f"{reason}: next try in {delay:.0f} s"),),
    )


def _partial(outcome: Outcome) -> str:
    parts = []
    if outcome.rejected:
        parts.append("rejected: " + ", ".join(outcome.rejected))
    if outcome.deferred:
        parts.append("deferred: " + ", ".join(outcome.deferred))
    return "; ".join(parts)
