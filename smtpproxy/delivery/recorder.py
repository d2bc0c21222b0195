"""Recording outcomes in batches: group commit on the delivery side.

Delivery tasks hand their Finish (delivery/records.py) to the recorder and wait. The
recorder task takes every Finish that arrived while it was writing the last batch and,
in this order:

1. one transaction: end the claims (one UPDATE ... FROM unnest, a compare-and-set on
   `status = 'sending' AND claimed_by = <this consumer>`), then insert the
   delivery_logs rows and child messages of the claims it still held;
2. one Redis round trip: acknowledge and delete the stream entries (XACK + XDEL), add
   split children to their streams, add dead letters;
3. log a line per outcome, count it for /metrics, and let the waiting tasks go.

An entry is acknowledged only after its outcome is committed (docs/architecture.md,
invariant 4). While PostgreSQL is unreachable the batch is retried and the claims are
kept (the consumer's heartbeat, in Redis, keeps anyone from taking them over); a claim
lost meanwhile records nothing. A Redis failure leaves the entries pending: they are
taken over or reclaimed later, and skipped, since their messages are no longer
claimable; split children then wait for the reconciler.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
from loguru import logger

from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.delivery.records import Finish
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable
from smtpproxy.queue.streams import Entry, Streams, dead_letter_fields
from smtpproxy.runtime.resources import Resources
from smtpproxy.runtime.supervise import Backoff

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")
BATCH_MAX = 1000  # outcomes in one transaction


@attrs.define
class _Item:
    finish: Finish | None  # None: only acknowledge the entries
    entries: Sequence[Entry]
    log: Logger
    done: trio.Event | None


class Recorder:
    def __init__(self, res: Resources, consumer: str, streams: Streams) -> None:
        self._res = res
        self.consumer = consumer
        self._streams = streams
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)
        self.batches = 0

    async def record(self, finish: Finish, entry: Entry | None, log: Logger) -> None:
        """Record a claim's end, then acknowledge its stream entry; returns once both are
        done (or the acknowledgement failed and was logged)."""
        done = trio.Event()
        self._send.send_nowait(_Item(finish, [entry] if entry else [], log, done))
        await done.wait()

    def acknowledge(self, entries: Sequence[Entry]) -> None:
        """Acknowledge entries that need no record (skipped), with the next batch."""
        if entries:
            self._send.send_nowait(_Item(None, entries, logger, None))

    async def db_retrying(self, fn: Callable[[Any], T], log: Logger) -> T:
        """Run fn(conn) until PostgreSQL answers."""
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                return await self._res.db.run(fn)
            except DatabaseUnavailable as exc:
                wait = backoff.next()
                log.warning("database unavailable, retrying in {:.1f} s: {}", wait, exc)
                await trio.sleep(wait)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._write(batch)
            self.batches += 1

    async def _write(self, batch: list[_Item]) -> None:
        finishes = [item.finish for item in batch if item.finish is not None]
        won: set[str] = set()
        if finishes:
            won = await self.db_retrying(lambda conn: self._commit(conn, finishes), logger)
        entries = [e for item in batch for e in item.entries]
        enqueue = [
            {"id": c.id, "tenant_id": str(f.msg.tenant_id), "account_id": str(f.msg.account_id)}
            for f in finishes
            if f.msg.id in won
            for c in f.children
            if not c.deferred
        ]
        dead = [
            dead_letter_fields(
                f.msg.id,
                f.msg.tenant_id,
                f.msg.account_id,
                status=f.status,
                attempts=f.msg.attempts,
                reason=f.last_error or "",
            )
            for f in finishes
            if f.msg.id in won and f.dead_letter
        ]
        try:
            await self._res.redis_offload(self._streams.settle, entries, enqueue, dead)
        except QueueUnavailable as exc:
            # the entries stay pending: taken over or reclaimed later, and skipped
            logger.warning(
                "could not acknowledge {} entries (nor enqueue {} split messages, nor add "
                "{} dead letters): {}",
                len(entries),
                len(enqueue),
                len(dead),
                exc,
            )
        for item in batch:
            if item.finish is not None:
                self._tell(item.finish, item.log, won=item.finish.msg.id in won)
            if item.done is not None:
                item.done.set()

    def _commit(self, conn: Conn, finishes: list[Finish]) -> set[str]:
        """Blocking, one transaction: end the claims we still hold, then write the logs
        and children of those only. The ids of the claims ended."""
        won = {
            str(row[0])
            for row in conn.execute(Q.finish_claims, _claim_columns(self.consumer, finishes))
        }
        kept = [f for f in finishes if f.msg.id in won]
        rows = [r for f in kept for r in f.logs]
        if rows:
            conn.execute(Q.insert_delivery_logs, _log_columns(rows))
        for f in kept:
            for child in f.children:
                if child.deferred:
                    conn.execute(
                        Q.defer_recipients,
                        {
                            "child_id": child.id,
                            "parent_id": f.msg.id,
                            "rcpt_to": list(child.rcpt_to),
                            "next_attempt_at": child.next_attempt_at,
                        },
                    )
                else:
                    conn.execute(
                        Q.split_message,
                        {
                            "child_id": child.id,
                            "parent_id": f.msg.id,
                            "rcpt_to": list(child.rcpt_to),
                        },
                    )
        return won

    def _tell(self, finish: Finish, log: Logger, *, won: bool) -> None:
        """The outcome's log lines and metrics, once it is recorded."""
        if not won:
            log.warning("outcome not recorded: another consumer took the message over")
            return
        metrics = self._res.metrics
        tenant = str(finish.msg.tenant_id)  # two tenants' providers may share a name
        for call in finish.calls:
            metrics.deliveries.inc(tenant, call.provider, call.outcome)
            if call.duration_ms is not None:
                metrics.delivery_seconds.observe(call.duration_ms / 1000, tenant, call.provider)
        if finish.provider:
            log = log.bind(provider=finish.provider)
            if finish.provider_message_id:
                log = log.bind(provider_message_id=finish.provider_message_id)
        for level, text in finish.says:
            log.log(level, text)


def _claim_columns(consumer: str, finishes: list[Finish]) -> dict[str, Any]:
    return {
        "consumer": consumer,
        "ids": [f.msg.id for f in finishes],
        "statuses": [f.status.value for f in finishes],
        "released": [f.released for f in finishes],
        "next_attempt_at": [f.next_attempt_at for f in finishes],
        "providers": [f.provider for f in finishes],
        "provider_message_ids": [f.provider_message_id for f in finishes],
        "errors": [f.last_error for f in finishes],
        "finals": [f.final for f in finishes],
    }


def _log_columns(rows: list[Any]) -> list[list[object]]:
    """Column arrays for Q.insert_delivery_logs, in its parameter order."""
    return [
        [r.message_id for r in rows],
        [r.account_id for r in rows],
        [r.tenant_id for r in rows],
        [r.provider_name for r in rows],
        [r.status for r in rows],
        [r.error_message for r in rows],
        [r.attempt_number for r in rows],
        [r.duration_ms for r in rows],
        [r.provider_message_id for r in rows],
        [json.dumps(list(r.recipients)) for r in rows],
    ]
