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
    stream: str
    entry_id: str
    fields: Mapping[str, str]


@attrs.frozen
class StreamBacklog:
    entries: int
    pending: int
    unread: int
    dead_letters: int


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


def _decode(stream: str, raw: Sequence[tuple[str, Mapping[str, str]] | None]) -> list[Entry]:
    # XAUTOCLAIM reports entries deleted meanwhile as None (Redis 7)
    return [Entry(stream, eid, dict(fields)) for item in raw if item for eid, fields in [item]]


def _busy_group(exc: redis.ResponseError) -> bool:
    return "BUSYGROUP" in str(exc)


def _no_group(exc: redis.ResponseError) -> bool:
    return "NOGROUP" in str(exc)


class Streams:
    """Key names and operations of one smtpproxy installation (one key prefix).

    Each tenant has its own stream (`<prefix>:deliver:<tenant id>`), listed in the set
    `<prefix>:streams`; consumers read a few entries from each in turn, so one tenant's
    backlog cannot starve the others, and each tenant's mail stays in order. The
    original single stream `<prefix>:deliver` is still read, for legacy entries.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        # redis-py's annotations are unions of every reply type; our methods give the
        # typed view, so the client itself is used untyped
        self.client: Any = client
        self.prefix = prefix
        self.legacy = f"{prefix}:deliver"
        self.registry = f"{prefix}:streams"
        self.dead_letters = f"{prefix}:dlq"

    def stream_for(self, tenant_id: int | str) -> str:
        return f"{self.prefix}:deliver:{tenant_id}"

    # -- setup -------------------------------------------------------------------
    def ensure_groups(self, streams: Sequence[str]) -> None:
        """Create the consumer group on each stream (and the stream) if missing."""
        with mapped_errors():
            for stream in streams:
                try:
                    self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if not _busy_group(exc):
                        raise

    def all_streams(self) -> list[str]:
        """The legacy stream and every tenant stream, in a stable order."""
        with mapped_errors():
            tenants = self.client.smembers(self.registry)
        return [self.legacy, *sorted(self.stream_for(t) for t in tenants)]

    def ping(self) -> None:
        with mapped_errors():
            self.client.ping()

    # -- producers ---------------------------------------------------------------
    def add_many(self, items: Sequence[Mapping[str, str]]) -> list[str]:
        """XADD every item to its tenant's stream in one round trip; returns entry ids."""
        if not items:
            return []
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            tenants = sorted({fields["tenant_id"] for fields in items})
            pipe.sadd(self.registry, *tenants)
            for fields in items:
                pipe.xadd(self.stream_for(fields["tenant_id"]), dict(fields))
            return [str(r) for r in pipe.execute()[1:]]

    def add_dead_letter(self, fields: Mapping[str, str], maxlen: int = 1_000_000) -> str:
        with mapped_errors():
            return str(
                self.client.xadd(self.dead_letters, dict(fields), maxlen=maxlen, approximate=True)
            )

    # -- consumers ---------------------------------------------------------------
    def read(
        self, consumer: str, streams: Sequence[str], count: int, block_ms: int | None
    ) -> list[Entry]:
        """New entries for this consumer (XREADGROUP >): up to `count` from each stream,
        waiting up to block_ms for the first (None: not waiting)."""
        if not streams:
            return []
        with mapped_errors():
            try:
                reply = self.client.xreadgroup(
                    GROUP, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
                )
            except redis.ResponseError as exc:
                if not _no_group(exc):
                    raise
                # a stream or its group vanished (Redis restarted empty, or someone
                # deleted it): recreate them; the reconciler re-enqueues from PostgreSQL
                self.ensure_groups(streams)
                return []
        entries: list[Entry] = []
        for stream, items in reply or []:
            entries.extend(_decode(stream, items))
        return entries

    def claim_stale(
        self, consumer: str, streams: Sequence[str], min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over entries other consumers read but did not finish within min_idle_ms."""
        entries: list[Entry] = []
        with mapped_errors():
            for stream in streams:
                try:
                    reply = self.client.xautoclaim(
                        stream, GROUP, consumer, min_idle_time=min_idle_ms, count=count
                    )
                except redis.ResponseError as exc:
                    if not _no_group(exc):
                        raise
                    self.ensure_groups([stream])
                    continue
                entries.extend(_decode(stream, reply[1]))
                if len(entries) >= count:
                    break
        return entries[:count] if len(entries) > count else entries

    def take_over(
        self, consumer: str, streams: Sequence[str], alive: frozenset[str], idle_ms: int, count: int
    ) -> list[Entry]:
        """Claim the pending entries of consumers that are not alive (absent from a
        complete live list) and have been silent for idle_ms, and forget such consumers
        once they hold nothing. Any consumer in `alive`, or heard from within idle_ms
        (it read the stream), is left alone."""
        entries: list[Entry] = []
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for stream in streams:
                pipe.xinfo_consumers(stream, GROUP)
            infos = pipe.execute(raise_on_error=False)
            for stream, info in zip(streams, infos, strict=True):
                if isinstance(info, Exception):
                    continue  # no group yet: nothing pending
                for c in info:
                    name = str(c["name"])
                    if name == consumer or name in alive or int(c["idle"]) < idle_ms:
                        continue
                    if not int(c["pending"]):
                        self.client.xgroup_delconsumer(stream, GROUP, name)
                        continue
                    want = count - len(entries)
                    if want <= 0:
                        continue
                    held = self.client.xpending_range(
                        stream, GROUP, "-", "+", want, consumername=name, idle=idle_ms
                    )
                    ids = [p["message_id"] for p in held]
                    if ids:
                        claimed = self.client.xclaim(stream, GROUP, consumer, idle_ms, ids)
                        entries.extend(_decode(stream, claimed))
        return entries

    def finish(self, entries: Sequence[Entry]) -> None:
        """Acknowledge and delete finished entries."""
        self.settle(entries)

    def settle(
        self,
        finished: Sequence[Entry],
        enqueue: Sequence[Mapping[str, str]] = (),
        dead_letters: Sequence[Mapping[str, str]] = (),
        dead_letter_maxlen: int = 1_000_000,
    ) -> None:
        """What the recorder does after a batch of outcomes is committed, in one round
        trip: acknowledge and delete the finished entries, add the new messages (split
        children) to their tenants' streams, and add the dead letters."""
        if not (finished or enqueue or dead_letters):
            return
        by_stream: dict[str, list[str]] = {}
        for e in finished:
            by_stream.setdefault(e.stream, []).append(e.entry_id)
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
            if enqueue:
                pipe.sadd(self.registry, *sorted({f["tenant_id"] for f in enqueue}))
                for fields in enqueue:
                    pipe.xadd(self.stream_for(fields["tenant_id"]), dict(fields))
            for fields in dead_letters:
                pipe.xadd(
                    self.dead_letters, dict(fields), maxlen=dead_letter_maxlen, approximate=True
                )
            pipe.execute()

    def delete_dead_letters(self, message_ids: set[str], page: int = 1000) -> int:
        """Remove the dead-letter entries of these messages; returns how many."""
        removed = 0
        start = "-"
        while message_ids:
            with mapped_errors():
                batch = self.client.xrange(self.dead_letters, min=start, max="+", count=page)
                doomed = [eid for eid, fields in batch if fields.get("id") in message_ids]
                if doomed:
                    removed += int(self.client.xdel(self.dead_letters, *doomed))
            if len(batch) < page:
                break
            ms, _, seq = batch[-1][0].partition("-")
            start = f"{ms}-{int(seq) + 1}"
        return removed

    # -- inspection --------------------------------------------------------------
    def length(self) -> int:
        """Entries not yet finished, over every stream."""
        streams = self.all_streams()
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for stream in streams:
                pipe.xlen(stream)
            return sum(int(n) for n in pipe.execute())

    def backlog(self) -> StreamBacklog:
        """Totals over every stream, in one round trip: entries on the streams, entries a
        consumer read and has not finished, entries not read yet, and the dead-letter
        stream."""
        streams = self.all_streams()
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for stream in streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            pipe.xlen(self.dead_letters)
            replies = pipe.execute(raise_on_error=False)
        entries = pending = unread = 0
        for length, groups in zip(replies[0:-1:2], replies[1:-1:2], strict=True):
            n = int(length) if isinstance(length, int) else 0
            entries += n
            ours = (
                []
                if isinstance(groups, Exception)
                else [g for g in groups if g.get("name") == GROUP]
            )
            # delivered entries are deleted (XACK + XDEL), so what is on a stream and not
            # pending has not been read yet (all of it, before a consumer made the group)
            in_flight = int(ours[0].get("pending") or 0) if ours else 0
            pending += in_flight
            unread += max(0, n - in_flight)
        dead = replies[-1]
        if isinstance(dead, Exception):
            raise QueueUnavailable(f"redis: {dead}")
        return StreamBacklog(entries, pending, unread, int(dead))

    def pending(self, stream: str) -> PendingInfo:
        with mapped_errors():
            try:
                info = self.client.xpending(stream, GROUP)
            except redis.ResponseError as exc:
                if _no_group(exc):
                    return PendingInfo(0, {})
                raise
        consumers = {str(c["name"]): int(c["pending"]) for c in info.get("consumers") or []}
        return PendingInfo(int(info.get("pending") or 0), consumers)

    def queued_message_ids(self, page: int = 1000) -> Iterator[str]:
        """The message id of every entry still on any stream (pending ones included)."""
        for stream in self.all_streams():
            start = "-"
            while True:
                with mapped_errors():
                    batch = self.client.xrange(stream, min=start, max="+", count=page)
                if not batch:
                    break
                for _eid, fields in batch:
                    mid = fields.get("id")
                    if mid:
                        yield mid
                last = batch[-1][0]
                ms, _, seq = last.partition("-")
                start = f"{ms}-{int(seq) + 1}"
                if len(batch) < page:
                    break
