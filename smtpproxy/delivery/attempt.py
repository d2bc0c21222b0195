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
"""

from __future__ import annotations

import random
import time
from typing import Any

import trio

from smtpproxy.delivery import providers, records, routing
from smtpproxy.delivery.breaker import ProviderHealth
from smtpproxy.delivery.directory import ProviderPool, Snapshot
from smtpproxy.delivery.records import Claimed, Finish, LogRow
from smtpproxy.delivery.retry import Decision, RetryPolicy
from smtpproxy.errors import BodyNotFound, StoreUnavailable
from smtpproxy.models import Outcome, OutcomeKind, Status
from smtpproxy.resources import Resources
from smtpproxy.store.base import StoreError

NO_ROUTE = "no routing rule matches and no default route"
BODY_MISSING = "body missing from the message store"


class Deliverer:
    def __init__(
        self,
        res: Resources,
        snapshot: Any,  # an object with a current `.snapshot` (DirectoryHolder)
        pool: ProviderPool,
        health: ProviderHealth,
        policy: RetryPolicy,
    ) -> None:
        self._res = res
        self._directory = snapshot
        self._pool = pool
        self._health = health
        self._policy = policy
        cfg = res.cfg.delivery
        self._body_retries = cfg.body_read_retries
        self._provider_wait = cfg.provider_wait
        self._concurrency = cfg.concurrency

    async def deliver(self, msg: Claimed, body: bytes | StoreError, log: Any) -> Finish:
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
        self, msg: Claimed, group: routing.RouteGroup, body: bytes, snapshot: Snapshot, log: Any
    ) -> Finish:
        passed_over: list[str] = []  # why earlier candidates were not used
        failovers: list[tuple[LogRow, int]] = []
        wait_for_circuit: float | None = None
        candidates = [group.provider, *group.fallbacks]
        for i, name in enumerate(candidates):
            last = i == len(candidates) - 1
            spec = snapshot.spec(msg.tenant_id, name)
            if spec is None or not spec.enabled:
                why = snapshot.why_missing(msg.tenant_id, name) if spec is None else "disabled"
                passed_over.append(f"{name}: {why}")
                continue
            try:
                provider = self._pool.get(spec)
            except providers.ProviderConfigError as exc:
                passed_over.append(f"{name}: {exc}")
                continue
            key = (spec.tenant_id, name)
            breaker = self._health.breaker(key)
            default = providers.provider_type(spec.type).max_connections
            ceiling = min(spec.positive_int("max_connections", default), self._concurrency)
            throttle = self._health.throttle(key, ceiling)
            if not await throttle.acquire(self._provider_wait):
                jitter = random.uniform(5.0, 15.0)  # noqa: S311 - not for security
                return records.release(msg, f"provider {name} is at its concurrency limit", jitter)
            now = trio.current_time()
            if not breaker.allow(now):
                throttle.release(None)
                retry_in = breaker.retry_in(now)
                wait_for_circuit = (
                    retry_in if wait_for_circuit is None else min(wait_for_circuit, retry_in)
                )
                passed_over.append(f"{name}: circuit open")
                continue
            outcome, duration_ms = await self._call(provider, msg, group.recipients, body)
            transient = outcome.kind is OutcomeKind.RETRY
            throttle.release(not transient)
            breaker.record(not transient, trio.current_time())
            if transient and not last:
                log.bind(provider=name).warning("failing over after: {}", outcome.detail)
                failovers.append((records.failover(msg, name, outcome, duration_ms), duration_ms))
                passed_over.append(f"{name}: {outcome.detail}")
                continue
            note = ""
            if name != group.provider or passed_over:
                note = f"via {name}" + (f" after {'; '.join(passed_over)}" if passed_over else "")
            return records.attempt(
                msg,
                name,
                outcome,
                self._policy,
                duration_ms=duration_ms,
                note=note,
                failovers=tuple(failovers),
            )
        # no candidate delivered or refused the message: the ones after a transient
        # failure or an open circuit were missing, disabled or misconfigured
        reason = "; ".join(passed_over)
        if wait_for_circuit is not None or failovers:
            # something only temporarily unavailable stood in the way: try again later
            outcome = Outcome.retry(
                f"no provider available ({reason})", retry_after=wait_for_circuit
            )
        else:
            outcome = Outcome.permanent(reason)
        return records.attempt(
            msg, group.provider, outcome, self._policy, failovers=tuple(failovers)
        )

    @staticmethod
    async def _call(
        provider: providers.Provider, msg: Claimed, recipients: tuple[str, ...], body: bytes
    ) -> tuple[Outcome, int]:
        delivery = providers.Delivery(
            message_id=msg.id,
            tenant_id=msg.tenant_id,
            account_id=msg.account_id,
            mail_from=msg.mail_from,
            recipients=recipients,
            body=body,
        )
        started = time.monotonic()
        outcome = await provider.send(delivery)
        return outcome, int((time.monotonic() - started) * 1000)

    async def _read_again(self, msg: Claimed, log: Any) -> bytes | StoreError:
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
