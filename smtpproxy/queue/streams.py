"""The Redis Streams adapter: the delivery work queue and the dead-letter stream.

Owns key names, the consumer group, and the mapping of redis-py errors to
QueueUnavailable. Calls are blocking (redis-py's sync client, pipelined); trio code
runs them through an Offload. The stream is a cache of PostgreSQL's queued rows: it may
be lost and is rebuilt by the reconciler, so nothing here is the source of truth.

Finished entries are acknowledged and deleted (XACK + XDEL) so the stream holds exactly
the work not yet done, which makes "is this id on the stream?" a cheap scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
import redis

from smtpproxy.errors import QueueUnavailable

GROUP = "delivery"


@attrs.frozen
class Entry:
    entry_id: str
    fields: Mapping[str, str]


@attrs.frozen
class PendingInfo:
    count: int
    consumers: Mapping[str, int]


def dead_letter_fields(
    message_id: str, tenant_id: int, account_id: int, *, status: str, attempts: int, reason: str
) -> dict[str, str]:
    """The fields of a dead-letter stream entry."""
    return {
        "id": message_id,
        "tenant_id": str(tenant_id),
        "account_id": str(account_id),
        "status": str(status),
        "attempts": str(attempts),
        "reason": reason[:1000],
        "at": datetime.now(UTC).isoformat(),
    }


@contextmanager
def mapped_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailable(f"redis unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if "LOADING" in str(exc) or "MISCONF" in str(exc) or "READONLY" in str(exc):
            raise QueueUnavailable(f"redis unavailable: {exc}") from exc
        raise


def connect(url: str, *, socket_timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        decode_responses=True,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def _decode(raw: Sequence[tuple[str, Mapping[str, str]] | None]) -> list[Entry]:
    # XAUTOCLAIM reports entries deleted meanwhile as None (Redis 7)
    return [Entry(eid, dict(fields)) for item in raw if item for eid, fields in [item]]


class Streams:
    """Key names and operations of one smtpproxy installation (one key prefix)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        # redis-py's annotations are unions of every reply type; our methods give the
        # typed view, so the client itself is used untyped
        self.client: Any = client
        self.prefix = prefix
        self.stream = f"{prefix}:deliver"
        self.dead_letters = f"{prefix}:dlq"

    # -- setup -------------------------------------------------------------------
    def ensure_group(self) -> None:
        with mapped_errors():
            try:
                self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def ping(self) -> None:
        with mapped_errors():
            self.client.ping()

    # -- producers ---------------------------------------------------------------
    def add_many(self, items: Sequence[Mapping[str, str]]) -> list[str]:
        """XADD every item in one round trip; returns the entry ids."""
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for fields in items:
                pipe.xadd(self.stream, dict(fields))
            return [str(r) for r in pipe.execute()]

    def add_dead_letter(self, fields: Mapping[str, str], maxlen: int = 1_000_000) -> str:
        with mapped_errors():
            return str(
                self.client.xadd(self.dead_letters, dict(fields), maxlen=maxlen, approximate=True)
            )

    # -- consumers ---------------------------------------------------------------
    def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (XREADGROUP >), waiting up to block_ms."""
        with mapped_errors():
            try:
                reply = self.client.xreadgroup(
                    GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # the stream or group vanished (Redis restarted empty, or someone
                # deleted it): recreate it; the reconciler re-enqueues from PostgreSQL
                self.ensure_group()
                return []
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries.extend(_decode(items))
        return entries

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries another consumer read but did not finish within min_idle_ms."""
        with mapped_errors():
            try:
                reply = self.client.xautoclaim(
                    self.stream, GROUP, consumer, min_idle_time=min_idle_ms, count=count
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()
                return []
        return _decode(reply[1])

    def finish(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge and delete finished entries."""
        if not entry_ids:
            return
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(self.stream, GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()

    # -- inspection --------------------------------------------------------------
    def length(self) -> int:
        with mapped_errors():
            return int(self.client.xlen(self.stream))

    def pending(self) -> PendingInfo:
        with mapped_errors():
            try:
                info = self.client.xpending(self.stream, GROUP)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return PendingInfo(0, {})
                raise
        consumers = {str(c["name"]): int(c["pending"]) for c in info.get("consumers") or []}
        return PendingInfo(int(info.get("pending") or 0), consumers)

    def queued_message_ids(self, page: int = 1000) -> Iterator[str]:
        """The message id of every entry still on the stream (pending ones included)."""
        start = "-"
        while True:
            with mapped_errors():
                batch = self.client.xrange(self.stream, min=start, max="+", count=page)
            if not batch:
                return
            for _eid, fields in batch:
                mid = fields.get("id")
                if mid:
                    yield mid
            last = batch[-1][0]
            ms, _, seq = last.partition("-")
            start = f"{ms}-{int(seq) + 1}"
            if len(batch) < page:
                return
