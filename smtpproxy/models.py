"""Pure values shared across smtpproxy: message statuses and their transitions, the
accepted-message record, and delivery outcomes.

No I/O here. The status table below is the one place that says which status may follow
which; the database adapter asserts against it, and the tests read it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs


class Status(enum.StrEnum):
    """Lifecycle of a message row in PostgreSQL."""

    # (in the order reports show them)
    QUEUED = "queued"  # durable, on the stream (or to be re-enqueued), waiting for a consumer
    RETRYING = "retrying"  # a transient failure; next_attempt_at says when
    SENDING = "sending"  # claimed by one consumer, provider call in flight
    DELIVERED = "delivered"  # a provider accepted it
    DLQ = "dlq"  # gave up after max attempts/age; on the dead-letter stream
    FAILED = "failed"  # permanent failure (the provider refused it, or no route)
    ENQUEUE_FAILED = "enqueue_failed"  # the client was told 451: must never be delivered
    STORAGE_ERROR = "storage_error"  # the body is gone; dead-lettered
    SPLIT = "split"  # its recipients route to several providers: one child row per route


FINAL = frozenset(
    {
        Status.DELIVERED,
        Status.FAILED,
        Status.DLQ,
        Status.ENQUEUE_FAILED,
        Status.STORAGE_ERROR,
        Status.SPLIT,
    }
)
LIVE = frozenset({Status.QUEUED, Status.SENDING, Status.RETRYING})  # still to be delivered
CLAIMABLE = frozenset({Status.QUEUED, Status.RETRYING})  # a consumer may take it
# what an operator lists, replays and purges as dead letters (`smtpproxy dlq`)
DEAD = frozenset({Status.DLQ, Status.FAILED, Status.STORAGE_ERROR})
# put on the dead-letter stream when they end
DEAD_LETTERED = frozenset({Status.DLQ, Status.STORAGE_ERROR})

TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset(
        {Status.SENDING, Status.ENQUEUE_FAILED, Status.STORAGE_ERROR, Status.DLQ}
    ),
    Status.SENDING: frozenset(
        {
            Status.DELIVERED,
            Status.RETRYING,
            Status.FAILED,
            Status.DLQ,
            Status.STORAGE_ERROR,
            Status.QUEUED,  # reclaimed from a consumer that died mid-send
            Status.SPLIT,
        }
    ),
    Status.RETRYING: frozenset({Status.SENDING, Status.QUEUED, Status.DLQ, Status.STORAGE_ERROR}),
    # an operator may replay the dead letters
    Status.DLQ: frozenset({Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.STORAGE_ERROR: frozenset(),
    Status.SPLIT: frozenset(),
    Status.DELIVERED: frozenset(),
    Status.ENQUEUE_FAILED: frozenset(),
}


def may_transition(old: Status, new: Status) -> bool:
    """True when a message in status old may move to status new."""
    return new in TRANSITIONS[old]


def values(statuses: frozenset[Status]) -> tuple[str, ...]:
    """The statuses as strings in the enum's order: for SQL parameters and tables."""
    return tuple(s.value for s in Status if s in statuses)


class OutcomeKind(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"
    # the provider will take it later, for a reason of the sender's own (a mailbox's
    # 429): not a failed attempt, and the provider itself is healthy
    PACED = "paced"


@attrs.frozen
class Outcome:
    """What one provider call came to: a pure value made by a provider's classifier.

    A DELIVERED outcome may name recipients the provider deferred (to be retried on their
    own, without re-sending to the others) or rejected permanently (reported, not retried).
    """

    kind: OutcomeKind
    detail: str = ""  # a short reason for people: never a secret, never a body
    provider_message_id: str | None = None
    retry_after: float | None = None  # seconds the provider asked us to wait
    deferred: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()

    @classmethod
    def delivered(cls, provider_message_id: str | None = None, detail: str = "") -> Outcome:
        return cls(OutcomeKind.DELIVERED, detail, provider_message_id)

    @classmethod
    def retry(cls, detail: str, retry_after: float | None = None) -> Outcome:
        return cls(OutcomeKind.RETRY, detail, retry_after=retry_after)

    @classmethod
    def permanent(cls, detail: str) -> Outcome:
        return cls(OutcomeKind.PERMANENT, detail)

    @classmethod
    def paced(cls, detail: str, retry_after: float) -> Outcome:
        return cls(OutcomeKind.PACED, detail, retry_after=retry_after)


@attrs.frozen
class AccountIdentity:
    """The authenticated SMTP account of a session, as ingress needs it."""

    account_id: int
    tenant_id: int
    username: str
    tenant_name: str
    allowed_domains: tuple[str, ...]
    rate_limit: str | None = None  # 'N/s', 'N/m' or 'N/h'
    monthly_limit: int | None = None  # the tenant's accepted messages per month
    networks: tuple[str, ...] = ()  # the tenant's allowed client networks (CIDR)

    @property
    def limited(self) -> bool:
        """Whether MAIL must consult the shared counters."""
        return self.rate_limit is not None or self.monthly_limit is not None


@attrs.frozen
class HeaderSummary:
    """The few headers kept in PostgreSQL for search and display."""

    subject: str = ""
    message_id: str = ""
    from_: str = ""
    to: str = ""
    cc: str = ""


@attrs.frozen
class Submission:
    """A message received over SMTP, before it is made durable."""

    message_id: str
    account: AccountIdentity
    mail_from: str
    rcpt_to: tuple[str, ...]
    body: bytes
    client_ip: str
    headers: HeaderSummary
    storage_key: str
    sha256: str
    device: str | None = None  # the registered device that sent it without AUTH
