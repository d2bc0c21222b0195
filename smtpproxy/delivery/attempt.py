"""One delivery attempt of a claimed message: body, route, provider (with fallbacks), and
the Finish that records it (delivery/records.py; the recorder writes it).

* The body comes read (the consumer reads a batch's bodies at once); a missing one is
  read again after delivery.body_read_retries, and still missing then is a
  storage_error (dead-lettered); a store that is down is a transient failure.
* Routing picks a provider per recipient (or the replay override of `dlq retry
  --to-provider`); recipients on different providers, or more than a provider takes in
  one request, are split into child messages.
* The route's provider is tried, then its fallbacks in order, when a provider fails
  transiently or its circuit is open; each failed try is logged ("failover") and the
  final record says which provider carried the message and why.
* A provider whose concurrency limit is reached does not get to hold this consumer's
  slot: after delivery.provider_wait the message is put back without counting an
  attempt, so a slow provider cannot stall mail for others.
* A provider that sends as mailboxes (msgraph) names the sending mailbox and its limits
  (delivery/pacing.py): a message over that mailbox's pace, or past its concurrent
  sends, or whose mailbox the provider throttled (429), waits for its turn without
  counting an attempt; other mailboxes are not held up.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import attrs
import trio

from smtpproxy.delivery import providers, records, routing
from smtpproxy.delivery.breaker import ProviderHealth, Throttle
from smtpproxy.delivery.directory import DirectoryHolder, ProviderPool, Snapshot
from smtpproxy.delivery.pacing import Admission, Pace, Pacer, waiting_reason
from smtpproxy.delivery.records import Claimed, Finish, LogRow
from smtpproxy.delivery.retry import Decision, RetryPolicy
from smtpproxy.errors import BodyNotFound, QueueUnavailable, StoreUnavailable
from smtpproxy.models import Outcome, OutcomeKind, Status
from smtpproxy.runtime.resources import Resources
from smtpproxy.store.base import StoreError

if TYPE_CHECKING:
    from loguru import Logger

NO_ROUTE = "no routing rule matches and no default route"
_HOLD = Admission(allowed=False, limit="hold")


@attrs.define
class _Tried:
    """What the candidates of a route came to so far."""

    first: str  # the route's own provider
    passed_over: list[str] = attrs.Factory(list)  # why candidates were not used
    failovers: list[tuple[LogRow, int]] = attrs.Factory(list)
    wait_for_circuit: float | None = None

    def circuit_open(self, name: str, retry_in: float) -> None:
        if self.wait_for_circuit is None or retry_in < self.wait_for_circuit:
            self.wait_for_circuit = retry_in
        self.passed_over.append(f"{name}: circuit open")

    def failed_over(self, row: LogRow, duration_ms: int) -> None:
        self.failovers.append((row, duration_ms))

    def note(self, name: str) -> str:
        """Said of the attempt when it was not the route's provider that decided it."""
        if name == self.first and not self.passed_over:
            return ""
        after = f" after {'; '.join(self.passed_over)}" if self.passed_over else ""
        return f"via {name}{after}"


def _jitter() -> float:
    """Seconds a message put back waits: 5 to 15, so a crowd does not come back at once."""
    return random.uniform(5.0, 15.0)  # noqa: S311 - not for security


BODY_MISSING = "body missing from the message store"


class Deliverer:
    def __init__(
        self,
        res: Resources,
        directory: DirectoryHolder,
        pool: ProviderPool,
        health: ProviderHealth,
        policy: RetryPolicy,
    ) -> None:
        self._res = res
        self._directory = directory
        self._pool = pool
        self._health = health
        self._policy = policy
        self._pacer = Pacer(res.redis, res.cfg.redis.key_prefix)
        cfg = res.cfg.delivery
        self._body_retries = cfg.body_read_retries
        self._provider_wait = cfg.provider_wait
        self._concurrency = cfg.concurrency

    async def deliver(self, msg: Claimed, body: bytes | StoreError, log: Logger) -> Finish:
        """One attempt; body is what the batch read found (bytes, BodyNotFound or
        StoreUnavailable)."""
        if isinstance(body, BodyNotFound):
            body = await self._read_again(msg, log)
        if isinstance(body, StoreUnavailable):
            return records.attempt(msg, "", Outcome.retry(str(body)), self._policy)
        if not isinstance(body, bytes):
            log.error("{}; dead-lettered", BODY_MISSING)
            decision = Decision(Status.STORAGE_ERROR, reason=BODY_MISSING)
            return records.attempt(
                msg, "", Outcome.permanent(BODY_MISSING), self._policy, decision=decision
            )
        snapshot: Snapshot = self._directory.snapshot
        if msg.route_override:
            groups = [routing.RouteGroup(msg.route_override, msg.rcpt_to)]
            unrouted: list[str] = []
        else:
            groups, unrouted = routing.route(
                snapshot.rules_for(msg.tenant_id),
                account_id=msg.account_id,
                mail_from=msg.mail_from,
                recipients=msg.rcpt_to,
                default_route=snapshot.default_route,
            )
        chunks = self._chunks(snapshot, msg.tenant_id, groups)
        if unrouted:
            chunks.append(tuple(unrouted))
        if len(chunks) > 1:
            return records.split(msg, chunks)
        if unrouted:
            return records.attempt(msg, "", Outcome.permanent(NO_ROUTE), self._policy)
        return await self._send(msg, groups[0], body, snapshot, log)

    def _chunks(
        self, snapshot: Snapshot, tenant_id: int, groups: list[routing.RouteGroup]
    ) -> list[tuple[str, ...]]:
        """Recipient groups, each small enough for its provider's per-request limit."""
        out: list[tuple[str, ...]] = []
        for group in groups:
            spec = snapshot.spec(tenant_id, group.provider)
            limit = None
            if spec is not None and spec.type in providers.TYPES:
                limit = providers.TYPES[spec.type].max_recipients
            size = limit or len(group.recipients) or 1
            out.extend(
                group.recipients[i : i + size] for i in range(0, len(group.recipients), size)
            )
        return out

    async def _send(
        self, msg: Claimed, group: routing.RouteGroup, body: bytes, snapshot: Snapshot, log: Logger
    ) -> Finish:
        delivery = providers.Delivery(
            message_id=msg.id,
            tenant_id=msg.tenant_id,
            account_id=msg.account_id,
            mail_from=msg.mail_from,
            recipients=group.recipients,
            body=body,
        )
        tried = _Tried(group.provider)
        candidates = [group.provider, *group.fallbacks]
        for i, name in enumerate(candidates):
            last = i == len(candidates) - 1
            finish = await self._try(msg, name, delivery, snapshot, tried, last=last, log=log)
            if finish is not None:
                return finish
        # no candidate delivered or refused the message: the ones after a transient
        # failure or an open circuit were missing, disabled or misconfigured
        reason = "; ".join(tried.passed_over)
        if tried.wait_for_circuit is not None or tried.failovers:
            # something only temporarily unavailable stood in the way: try again later
            outcome = Outcome.retry(
                f"no provider available ({reason})", retry_after=tried.wait_for_circuit
            )
        else:
            outcome = Outcome.permanent(reason)
        return records.attempt(
            msg, group.provider, outcome, self._policy, failovers=tuple(tried.failovers)
        )

    async def _try(
        self,
        msg: Claimed,
        name: str,
        delivery: providers.Delivery,
        snapshot: Snapshot,
        tried: _Tried,
        *,
        last: bool,
        log: Logger,
    ) -> Finish | None:
        """One candidate provider: the Finish when it decided the attempt, None when the
        next one is to be tried (why is added to `tried`)."""
        found = self._provider(msg.tenant_id, name, snapshot, tried)
        if found is None:
            return None
        spec, provider = found
        key = (spec.tenant_id, name)
        breaker = self._health.breaker(key)
        default = providers.provider_type(spec.type).max_connections
        ceiling = min(spec.positive_int("max_connections", default), self._concurrency)
        throttle = self._health.throttle(key, ceiling)
        if not await throttle.acquire(self._provider_wait):
            return records.release(msg, f"provider {name} is at its concurrency limit", _jitter())
        now = trio.current_time()
        if not breaker.allow(now):
            throttle.release(None)
            tried.circuit_open(name, breaker.retry_in(now))
            return None
        called = await self._call_in_turn(msg, name, provider, delivery, log)
        if isinstance(called, Finish):
            throttle.release(None)  # not an answer about the provider's health
            return called
        outcome, duration_ms = called
        transient = outcome.kind in (OutcomeKind.RETRY, OutcomeKind.PACED)
        throttle.release(not transient)
        breaker.record(not transient, trio.current_time())
        if transient and not last:
            log.bind(provider=name).warning("failing over after: {}", outcome.detail)
            tried.failed_over(records.failover(msg, name, outcome, duration_ms), duration_ms)
            tried.passed_over.append(f"{name}: {outcome.detail}")
            return None
        return records.attempt(
            msg,
            name,
            outcome,
            self._policy,
            duration_ms=duration_ms,
            note=tried.note(name),
            failovers=tuple(tried.failovers),
        )

    def _provider(
        self, tenant_id: int, name: str, snapshot: Snapshot, tried: _Tried
    ) -> tuple[providers.ProviderSpec, providers.Provider] | None:
        """The usable provider of that name, or None after saying in `tried` why not."""
        spec = snapshot.spec(tenant_id, name)
        if spec is None or not spec.enabled:
            why = snapshot.why_missing(tenant_id, name) if spec is None else "disabled"
            tried.passed_over.append(f"{name}: {why}")
            return None
        try:
            return spec, self._pool.get(spec)
        except providers.ProviderConfigError as exc:
            tried.passed_over.append(f"{name}: {exc}")
            return None

    async def _call_in_turn(
        self,
        msg: Claimed,
        name: str,
        provider: providers.Provider,
        delivery: providers.Delivery,
        log: Logger,
    ) -> tuple[Outcome, int] | Finish:
        """Call the provider, in the sending mailbox's turn if it paces its senders:
        (outcome, milliseconds), or the Finish of a message that must wait its turn."""
        pace = provider.pace(delivery) if isinstance(provider, providers.Paced) else None
        turn = await self._turn(msg, name, pace, log)
        if isinstance(turn, Finish):
            return turn
        try:
            outcome, duration_ms = await self._call(provider, delivery)
        finally:
            if turn is not None:
                turn.release(None)
        if outcome.kind is OutcomeKind.PACED and pace is not None:
            return await self._held(msg, name, pace, outcome, log)
        return outcome, duration_ms

    async def _turn(
        self, msg: Claimed, provider: str, pace: Pace | None, log: Logger
    ) -> Throttle | Finish | None:
        """For a paced sender: its concurrency slot (to release after the call), or the
        Finish that puts the message back until its turn. None when nothing is paced, or
        Redis cannot tell (the provider's own 429s then pace the mailbox)."""
        if pace is None:
            return None
        mailbox = self._health.throttle((None, f"pace:{pace.key}"), pace.concurrency)
        if not await mailbox.acquire(self._provider_wait):
            reason = f"mailbox {pace.label} is at its {pace.concurrency} sends at once"
            return records.release(msg, reason, _jitter())
        try:
            admission = await self._res.redis_offload(
                self._pacer.admit, pace, msg.id, len(msg.rcpt_to)
            )
        except QueueUnavailable as exc:
            log.warning("cannot pace mailbox {} (Redis): {}", pace.label, exc)
            return mailbox
        if admission.allowed:
            await trio.sleep(admission.wait)  # a slot less than EARLY away
            return mailbox
        mailbox.release(None)
        reason = waiting_reason(pace, admission)
        return records.paced(msg, provider, reason, admission.wait, self._policy)

    async def _held(
        self, msg: Claimed, provider: str, pace: Pace, outcome: Outcome, log: Logger
    ) -> Finish:
        """The provider throttled this mailbox (429): hold it alone, for as long as it
        asked (a minute when it did not say), and put the message back until then."""
        wait = outcome.retry_after if outcome.retry_after is not None else 60.0
        try:
            await self._res.redis_offload(self._pacer.hold, pace, wait)
        except QueueUnavailable as exc:
            log.warning("cannot hold mailbox {} (Redis): {}", pace.label, exc)
        reason = f"{waiting_reason(pace, _HOLD)}: {outcome.detail}"
        return records.paced(msg, provider, reason, wait, self._policy)

    @staticmethod
    async def _call(
        provider: providers.Provider, delivery: providers.Delivery
    ) -> tuple[Outcome, int]:
        started = time.monotonic()
        outcome = await provider.send(delivery)
        return outcome, int((time.monotonic() - started) * 1000)

    async def _read_again(self, msg: Claimed, log: Logger) -> bytes | StoreError:
        """A body the batch did not find, read again after each body_read_retries delay
        (a store that is slow to show a new object); the last error if it never comes."""
        res = self._res
        error: StoreError = BodyNotFound(msg.storage_key)
        for delay in self._body_retries:
            log.warning("body missing from the message store; retrying in {} s", delay)
            await trio.sleep(delay)
            try:
                body: bytes = await res.store_offload(res.store.get, msg.storage_key)
            except (BodyNotFound, StoreUnavailable) as exc:
                error = exc
                if isinstance(exc, StoreUnavailable):
                    return exc
            else:
                return body
        return error
