"""Delivery consumers: read message ids from the stream, deliver, record, acknowledge.

Per stream entry (ARCHITECTURE.md invariant 4):
1. claim the message in PostgreSQL (compare-and-set to `sending`); an entry whose
   message is already final, in flight elsewhere or not yet due is acknowledged and
   skipped; an entry with no row is logged and acknowledged;
2. read the body (retried after 1 s, 2 s, 4 s; then storage_error and dead-lettered);
3. route: recipients whose providers differ (or who exceed the provider's per-request
   limit) are split into child messages that are queued on their own;
4. call the provider, then record the delivery_logs row and the new status in one
   transaction (retrying while PostgreSQL is unreachable, so an outcome is not lost);
5. only then acknowledge (XACK + XDEL).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import trio
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.queries import Q
from smtpproxy.delivery import providers, routing
from smtpproxy.delivery.directory import ProviderPool, Snapshot
from smtpproxy.delivery.retry import Decision, RetryPolicy, decide
from smtpproxy.errors import BodyNotFound, DatabaseUnavailable, QueueUnavailable, StoreUnavailable
from smtpproxy.models import Outcome, Status
from smtpproxy.queue.streams import Entry, Streams, dead_letter_fields
from smtpproxy.resources import Resources


def consumer_name(index: int) -> str:
    """Unique per process: host, pid and index."""
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


@attrs.frozen
class Claimed:
    id: str
    tenant_id: int
    account_id: int
    mail_from: str
    rcpt_to: tuple[str, ...]
    storage_key: str
    attempts: int
    created_at: datetime

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
        )


class StreamRotation:
    """Which streams a read asks for: every tenant's (plus the legacy stream), a fair
    share of the free slots each; with more streams than slots, a moving window. The
    list of streams is refreshed every few seconds and new ones get their group."""

    REFRESH = 2.0

    def __init__(self, res: Resources, streams: Streams) -> None:
        self._res = res
        self._streams = streams
        self._known: list[str] = []
        self._refreshed = -self.REFRESH
        self._offset = 0

    async def all(self) -> list[str]:
        if time.monotonic() - self._refreshed >= self.REFRESH:
            current = await self._res.redis_offload(self._streams.all_streams)
            new = sorted(set(current) - set(self._known))
            if new:
                await self._res.redis_offload(self._streams.ensure_groups, new)
            self._known = current
            self._refreshed = time.monotonic()
        return self._known

    async def window(self, free: int) -> tuple[list[str], int]:
        """(streams to read, entries per stream) for `free` slots."""
        streams = await self.all()
        if len(streams) <= free:
            return streams, max(1, free // len(streams))
        start = self._offset % len(streams)
        self._offset = start + free
        rotated = streams[start:] + streams[:start]
        return rotated[:free], 1


@attrs.define
class DirectoryHolder:
    """The current routing snapshot; replaced by the reload task."""

    snapshot: Snapshot


class Consumer:
    def __init__(
        self,
        res: Resources,
        directory: DirectoryHolder,
        pool: ProviderPool,
        *,
        name: str,
        policy: RetryPolicy,
    ) -> None:
        self._res = res
        self._streams: Streams = res.consumer_streams()
        self._directory = directory
        self._pool = pool
        self.name = name
        self._policy = policy
        cfg = res.cfg.delivery
        self._visibility = cfg.visibility_timeout
        self._body_retries = cfg.body_read_retries
        self._slots = trio.Semaphore(cfg.concurrency)
        self.in_flight = 0
        self.stopping = False

    # -- the loop ----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log = logger.bind(consumer=self.name)
        streams = StreamRotation(self._res, self._streams)
        next_reclaim = 0.0
        async with trio.open_nursery() as nursery:
            task_status.started()
            while not self.stopping:
                await self._slots.acquire()
                free = self._slots.value + 1
                try:
                    entries: list[Entry] = []
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + max(self._visibility / 4, 1)
                        entries = await self._reclaim(await streams.all(), free, log)
                    if not entries:
                        window, per_stream = await streams.window(free)
                        entries = await self._res.redis_offload(
                            self._streams.read, self.name, window, per_stream, 1000
                        )
                except QueueUnavailable as exc:
                    self._slots.release()
                    log.warning("stream read failed, retrying in 1 s: {}", exc)
                    await trio.sleep(1)
                    continue
                if not entries:
                    self._slots.release()
                    continue
                # one slot is held; take one more per extra entry (free were available)
                for _ in entries[1:]:
                    await self._slots.acquire()
                for entry in entries:
                    nursery.start_soon(self._process_slot, entry)
            # draining: stop reading, let the deliveries in flight finish, then idle
            # (returning would make the supervisor restart us)
            await self.wait_idle()
            await trio.sleep_forever()

    async def _reclaim(self, streams: list[str], count: int, log: Any) -> list[Entry]:
        entries: list[Entry] = await self._res.redis_offload(
            self._streams.claim_stale, self.name, streams, int(self._visibility * 1000), count
        )
        for e in entries:
            log.bind(message_id=e.fields.get("id")).warning(
                "reclaimed a stream entry left by another consumer"
            )
        return entries

    async def _process_slot(self, entry: Entry) -> None:
        self.in_flight += 1
        try:
            await self.process(entry)
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def wait_idle(self) -> None:
        while self.in_flight:  # noqa: ASYNC110 - called once, at shutdown
            await trio.sleep(0.05)

    # -- one entry ---------------------------------------------------------------
    async def process(self, entry: Entry) -> None:
        mid = entry.fields.get("id", "")
        log = logger.bind(message_id=mid, consumer=self.name)
        if not mid:
            log.warning("stream entry {} has no message id; dropped", entry.entry_id)
            await self._finish(entry)
            return
        params = {"id": mid, "consumer": self.name, "visibility": self._visibility}

        def claim(conn: Any) -> dict[str, Any] | None:
            with conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(Q.claim_message, params).fetchone()
                if row is None:
                    status = cur.execute(Q.message_status, (mid,)).fetchone()
                    return {"__status__": status["status"] if status else None}
                return dict(row)

        row = await self._db_retrying(claim, log)
        if "__status__" in row:
            if row["__status__"] is None:
                log.warning("no metadata row for this stream entry; acknowledged")
            else:
                log.debug("skipped: message is {}", row["__status__"])
            await self._finish(entry)
            return
        msg = Claimed.from_row(row)
        log = log.bind(tenant_id=msg.tenant_id, account_id=msg.account_id)
        await self._deliver(msg, log)
        await self._finish(entry)

    async def _deliver(self, msg: Claimed, log: Any) -> None:
        body = await self._read_body(msg, log)
        if body is None:
            return
        snapshot = self._directory.snapshot
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
            await self._split(msg, chunks, log)
            return
        if unrouted:
            await self._record(
                msg, "", Outcome.permanent("no routing rule matches and no default route"), 0, log
            )
            return
        group = groups[0]
        spec = snapshot.spec(msg.tenant_id, group.provider)
        if spec is None or not spec.enabled:
            why = (
                snapshot.why_missing(msg.tenant_id, group.provider)
                if spec is None
                else (f"provider {group.provider} is disabled")
            )
            await self._record(msg, group.provider, Outcome.permanent(why), 0, log)
            return
        try:
            provider = self._pool.get(spec)
        except providers.ProviderConfigError as exc:
            await self._record(msg, group.provider, Outcome.permanent(str(exc)), 0, log)
            return
        delivery = providers.Delivery(
            message_id=msg.id,
            tenant_id=msg.tenant_id,
            account_id=msg.account_id,
            mail_from=msg.mail_from,
            recipients=group.recipients,
            body=body,
        )
        started = time.monotonic()
        outcome = await provider.send(delivery)
        duration_ms = int((time.monotonic() - started) * 1000)
        await self._record(msg, group.provider, outcome, duration_ms, log)

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

    async def _read_body(self, msg: Claimed, log: Any) -> bytes | None:
        """The body, or None after recording why there is none: a body still missing
        after the retries is a storage_error; a store that is down is a transient failure."""
        res = self._res
        for delay in self._body_retries:
            try:
                return await res.store_offload(res.store.get, msg.storage_key)
            except BodyNotFound:
                log.warning("body missing from the message store; retrying in {} s", delay)
            except StoreUnavailable as exc:
                await self._record(msg, "", Outcome.retry(str(exc)), 0, log)
                return None
            await trio.sleep(delay)
        try:
            return await res.store_offload(res.store.get, msg.storage_key)
        except StoreUnavailable as exc:
            await self._record(msg, "", Outcome.retry(str(exc)), 0, log)
            return None
        except BodyNotFound:
            pass
        reason = "body missing from the message store"
        log.error("{}; dead-lettered", reason)
        decision = Decision(Status.STORAGE_ERROR, reason=reason)
        await self._write_outcome(msg, "", Outcome.permanent(reason), decision, 0, log)
        return None

    async def _split(self, msg: Claimed, chunks: list[tuple[str, ...]], log: Any) -> None:
        children = [(f"{msg.id}.{n}", rcpts) for n, rcpts in enumerate(chunks, start=1)]

        def split(conn: Any) -> bool:
            for child_id, rcpts in children:
                conn.execute(
                    Q.split_message,
                    {"child_id": child_id, "parent_id": msg.id, "rcpt_to": list(rcpts)},
                )
            return self._finish_row(conn, msg, Decision(Status.SPLIT), "", None)

        if not await self._db_retrying(split, log):
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

    # -- recording ----------------------------------------------------------------
    async def _record(
        self, msg: Claimed, provider: str, outcome: Outcome, duration_ms: int, log: Any
    ) -> None:
        age = (datetime.now(UTC) - msg.created_at).total_seconds()
        decision = decide(outcome, msg.attempts, age, self._policy)
        await self._write_outcome(msg, provider, outcome, decision, duration_ms, log)

    async def _write_outcome(  # noqa: PLR0917 - the parts of one attempt's record
        self,
        msg: Claimed,
        provider: str,
        outcome: Outcome,
        decision: Decision,
        duration_ms: int,
        log: Any,
    ) -> None:
        log_row = {
            "message_id": msg.id,
            "account_id": msg.account_id,
            "tenant_id": msg.tenant_id,
            "provider_name": provider,
            "status": decision.status.value,
            "error_message": "" if decision.status is Status.DELIVERED else outcome.detail,
            "attempt_number": msg.attempts,
            "duration_ms": duration_ms,
            "provider_message_id": outcome.provider_message_id,
            "recipients": list(msg.rcpt_to),
        }

        def write(conn: Any) -> bool:
            conn.execute(Q.insert_delivery_log, log_row)
            return self._finish_row(conn, msg, decision, provider, outcome)

        if not await self._db_retrying(write, log):
            log.warning("outcome not recorded: another consumer took the message over")
            return
        if decision.status is Status.DELIVERED:
            log.bind(provider=provider, provider_message_id=outcome.provider_message_id).info(
                "delivered in {} ms", duration_ms
            )
        elif decision.status is Status.RETRYING:
            log.bind(provider=provider).warning(
                "attempt {} failed, retry in {:.0f} s: {}",
                msg.attempts,
                decision.delay,
                outcome.detail,
            )
        else:
            log.bind(provider=provider).error(
                "{}: {}", decision.status.value, decision.reason or outcome.detail
            )
        if decision.status in (Status.DLQ, Status.STORAGE_ERROR):
            await self._dead_letter(msg, decision, log)

    def _finish_row(
        self, conn: Any, msg: Claimed, decision: Decision, provider: str, outcome: Outcome | None
    ) -> bool:
        next_at = (
            datetime.now(UTC) + timedelta(seconds=decision.delay)
            if decision.delay is not None
            else None
        )
        error = None
        if decision.status is not Status.DELIVERED:
            error = decision.reason or (outcome.detail if outcome else "") or None
        row = conn.execute(
            Q.finish_attempt,
            {
                "id": msg.id,
                "consumer": self.name,
                "status": decision.status.value,
                "next_attempt_at": next_at,
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

    async def _dead_letter(self, msg: Claimed, decision: Decision, log: Any) -> None:
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

    async def _db_retrying(self, fn: Any, log: Any) -> Any:
        """Run fn(conn) until PostgreSQL answers: an outcome must not be lost to an outage."""
        delay = 0.5
        while True:
            try:
                return await self._res.db.run(fn)
            except DatabaseUnavailable as exc:
                log.warning("database unavailable, retrying in {:.1f} s: {}", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _finish(self, entry: Entry) -> None:
        try:
            await self._res.redis_offload(self._streams.finish, [entry])
        except QueueUnavailable as exc:
            # the entry stays pending; after the visibility timeout it is reclaimed and
            # skipped, because the message is no longer claimable
            logger.warning("could not acknowledge entry {}: {}", entry.entry_id, exc)
