"""Retry policy: what a delivery outcome means for the message. Pure.

Transient failures are retried on a schedule (30 s, 1 m, 2 m, 5 m, 15 m, then every
30 m by default) with +/-20 % jitter so a provider outage does not end in a thundering
herd; a provider's Retry-After is honoured when it asks for longer. A message that has
used delivery.max_attempts attempts, or is older than delivery.max_age, is
dead-lettered. Permanent failures are never retried.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from smtpproxy.models import Outcome, OutcomeKind, Status


@attrs.frozen
class RetryPolicy:
    schedule: tuple[float, ...] = (30, 60, 120, 300, 900, 1800)
    max_attempts: int = 10
    max_age: float = 2 * 86400
    jitter: float = 0.2
    # the source of randomness, replaceable so tests can pin the schedule
    uniform: Callable[[float, float], float] = attrs.field(default=random.uniform, eq=False)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the attempt numbered `attempts` (1-based) failed."""
        base = self.schedule[min(attempts, len(self.schedule)) - 1]
        delay = base * self.uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


@attrs.frozen
class Decision:
    status: Status
    delay: float | None = None  # for RETRYING: seconds until the next attempt
    reason: str = ""


def decide(outcome: Outcome, attempts: int, age: float, policy: RetryPolicy) -> Decision:
    """The message's next status after an attempt with this outcome.

    attempts counts the attempt that just ended; age is seconds since acceptance.
    """
    if outcome.kind is OutcomeKind.DELIVERED:
        return Decision(Status.DELIVERED)
    if outcome.kind is OutcomeKind.PERMANENT:
        return Decision(Status.FAILED, reason=outcome.detail)
    if attempts >= policy.max_attempts:
        return Decision(Status.DLQ, reason=f"gave up after {attempts} attempts: {outcome.detail}")
    delay = policy.delay(attempts, outcome.retry_after)
    if age + delay > policy.max_age:
        return Decision(
            Status.DLQ, reason=f"gave up after {attempts} attempts (too old): {outcome.detail}"
        )
    return Decision(Status.RETRYING, delay=delay, reason=outcome.detail)
