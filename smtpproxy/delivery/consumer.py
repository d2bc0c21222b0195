"""Delivery consumers: read message ids from the tenants' streams, claim, deliver, ack,
a batch at a time.

Per read (docs/architecture.md invariant 4, and group commit as at ingress):
1. claim every entry's message in one statement (compare-and-set to `sending`); an
   entry whose message is final, in flight elsewhere or not yet due, or has no row, is
   acknowledged with the next batch of outcomes;
2. read the claimed messages' bodies in one call to the store, within a byte budget;
3. deliver each as a trio task (delivery/attempt.py), as many at once as
   delivery.concurrency allows and each provider's own limit lets through;
4. hand each outcome to the recorder (delivery/recorder.py), which commits the
   outcomes that finished meanwhile in one transaction and only then acknowledges
   their entries in one Redis round trip.

Every consumer beats in the liveness registry (queue/liveness.py). Entries a dead
consumer read but never finished are taken over as soon as it has been silent for a
heartbeat lifetime (10 s by default), and so are the messages it left in `sending`:
after a crash and a restart, mail moves again within seconds. Any entry idle past the
visibility timeout is reclaimed too (XAUTOCLAIM), the backstop for an entry a live
consumer lost track of. A message left in `sending` is claimed again only when the
consumer holding it has stopped beating, or, for this consumer's own claims, when no
task here holds it any more: a live consumer that is slow to record an outcome
(PostgreSQL is away) must not have the message sent a second time under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import trio
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.delivery.attempt import Deliverer
from smtpproxy.delivery.breaker import ProviderHealth
from smtpproxy.delivery.budget import BODY_BUDGET, READ_CHUNK, ByteBudget, Slots, by_bytes
from smtpproxy.delivery.directory import DirectoryHolder, ProviderPool
from smtpproxy.delivery.recorder import Recorder
from smtpproxy.delivery.records import Claimed
from smtpproxy.delivery.retry import RetryPolicy
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable, StoreUnavailable
from smtpproxy.mail.headers import summarize
from smtpproxy.queue import legacy
from smtpproxy.queue.liveness import ConsumerRegistry, LiveConsumers
from smtpproxy.queue.streams import Entry, Streams
from smtpproxy.runtime.resources import Resources
from smtpproxy.runtime.threads import Offload
from smtpproxy.store import key_for
from smtpproxy.store.base import StoreError

if TYPE_CHECKING:
    from loguru import Logger

_RUN = secrets.token_hex(3)  # two containers can share a hostname and pid 1


def consumer_name(index: int) -> str:
    """Unique per process: host, pid, a per-start token and index."""
    return f"{socket.gethostname()}-{os.getpid()}-{_RUN}-{index}"


BLOCK_MS = 1000  # a read waits this long for new entries
GATHER = 0.005  # a read waits this long for more free slots, to fetch a batch


class StreamRotation:
    """Which streams a read asks for: every tenant's (plus the legacy stream), a fair
    share of the free slots each. With more streams than free slots, a moving window of
    them, read without waiting (the streams outside the window may have mail), until a
    whole round of windows found nothing; then every stream, waiting. The list of
    streams is refreshed every few seconds and new ones get their group."""

    REFRESH = 1.0

    def __init__(self, res: Resources, streams: Streams) -> None:
        self._res = res
        self._streams = streams
        self._known: list[str] = []
        self._refreshed = -self.REFRESH
        self._offset = 0
        self._empty = 0  # streams read without finding anything, since the last find

    async def all(self) -> list[str]:
        if time.monotonic() - self._refreshed >= self.REFRESH:
            current = await self._res.redis_offload(self._streams.all_streams)
            new = sorted(set(current) - set(self._known))
            if new:
                await self._res.redis_offload(self._streams.ensure_groups, new)
            self._known = current
            self._refreshed = time.monotonic()
        return self._known

    async def window(self, free: int) -> tuple[list[str], int, int | None]:
        """(streams to read, entries per stream, milliseconds the read may wait for
        new entries: None for not at all) for `free` slots."""
        streams = await self.all()
        if len(streams) <= free:
            return streams, max(1, free // len(streams)), BLOCK_MS
        if self._empty >= len(streams):
            self._empty = 0
            return streams, 1, BLOCK_MS
        start = self._offset % len(streams)
        self._offset = start + free
        rotated = streams[start:] + streams[:start]
        return rotated[:free], 1, None

    def found(self, streams_read: int, entries: int) -> None:
        """What the last read of streams_read streams returned."""
        self._empty = 0 if entries else self._empty + streams_read


class Consumer:
    def __init__(
        self,
        res: Resources,
        directory: DirectoryHolder,
        pool: ProviderPool,
        *,
        name: str,
        policy: RetryPolicy,
        health: ProviderHealth | None = None,
    ) -> None:
        self._res = res
        self._streams: Streams = res.consumer_streams()
        self.name = name
        cfg = res.cfg.delivery
        self.health = health or ProviderHealth(cfg.breaker_threshold, cfg.breaker_cooldown)
        self._recorder = Recorder(res, name, self._streams)
        self._deliverer = Deliverer(res, directory, pool, self.health, policy)
        self._bodies = ByteBudget(BODY_BUDGET)
        self._visibility = cfg.visibility_timeout
        self._beat_every = cfg.heartbeat_interval
        self._lifetime = cfg.heartbeat_lifetime
        self._slots = Slots(cfg.concurrency)
        self._registry = ConsumerRegistry(res.streams.client, res.cfg.redis.key_prefix)
        self._beat_offload = Offload("liveness", 1)  # never queued behind other Redis calls
        self._live = LiveConsumers()  # until the first heartbeat: nobody else's claims
        self._holding: set[str] = set()  # message ids a task of ours is working on
        self.in_flight = 0
        self.stopping = False

    # -- the loop ----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log = logger.bind(consumer=self.name)
        streams = StreamRotation(self._res, self._streams)
        next_takeover = next_reclaim = 0.0
        async with trio.open_nursery() as nursery:
            await nursery.start(self._heartbeat, log)
            await nursery.start(self._recorder.run)
            task_status.started()
            while not self.stopping:
                free = await self._free_slots(len(await streams.all()))
                try:
                    entries: list[Entry] = []
                    now = time.monotonic()
                    if now >= next_takeover and self._live.complete:
                        next_takeover = now + self._beat_every
                        entries = await self._take_over(await streams.all(), free, log)
                    if not entries and now >= next_reclaim:
                        next_reclaim = now + max(self._visibility / 4, 1)
                        entries = await self._reclaim(await streams.all(), free, log)
                    if not entries:
                        window, per_stream, block = await streams.window(free)
                        entries = await self._res.redis_offload(
                            self._streams.read, self.name, window, per_stream, block
                        )
                        streams.found(len(window), len(entries))
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
                await self._dispatch(entries, nursery, log)
            # draining: stop reading, let the deliveries in flight finish, then idle
            # (returning would make the supervisor restart us)
            await self.wait_idle()
            await trio.sleep_forever()

    async def _heartbeat(
        self, log: Logger, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Beat in the liveness registry while running (the first beat before anything
        is read); leave it when stopped, so what this consumer still holds can be taken
        over."""
        started = False
        try:
            while True:
                try:
                    self._live = await self._beat_offload(
                        self._registry.beat, self.name, self._lifetime
                    )
                except QueueUnavailable as exc:
                    log.warning("liveness heartbeat failed: {}", exc)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(self._beat_every)
        finally:
            with trio.move_on_after(2) as scope, contextlib.suppress(QueueUnavailable):
                scope.shield = True  # a failure only means our entry expires on its own
                await self._beat_offload(self._registry.leave, self.name)

    async def _take_over(self, streams: list[str], count: int, log: Logger) -> list[Entry]:
        """The entries of consumers that stopped beating (crashed, killed)."""
        entries: list[Entry] = await self._res.redis_offload(
            self._streams.take_over,
            self.name,
            streams,
            self._live.names,
            int(self._lifetime * 1000),
            count,
        )
        if entries:
            log.warning("took over {} stream entries of a consumer that stopped", len(entries))
        return entries

    async def _reclaim(self, streams: list[str], count: int, log: Logger) -> list[Entry]:
        entries: list[Entry] = await self._res.redis_offload(
            self._streams.claim_stale, self.name, streams, int(self._visibility * 1000), count
        )
        for e in entries:
            log.bind(message_id=e.fields.get("id")).warning(
                "reclaimed a stream entry idle past the visibility timeout"
            )
        return entries

    async def _free_slots(self, streams: int) -> int:
        """Take a slot (waiting for one), then give others a moment to come free, so a
        read fetches a batch rather than an entry at a time, and covers every stream;
        the number free, the one taken included."""
        await self._slots.acquire()
        wanted = min(self._slots.total, max(streams, self._slots.total // 8))
        await self._slots.gather(wanted - 1, GATHER)
        return self._slots.free + 1

    async def wait_idle(self) -> None:
        while self.in_flight:  # noqa: ASYNC110 - called once, at shutdown
            await trio.sleep(0.05)

    # -- a batch of entries --------------------------------------------------------
    async def _dispatch(self, entries: list[Entry], nursery: trio.Nursery, log: Logger) -> None:
        """Claim the messages of a read's entries (one slot each is held), read their
        bodies and start a delivery task for each; the rest are acknowledged."""
        skipped: list[Entry] = []
        wanted: dict[str, Entry] = {}
        for entry in entries:
            mid = await self._message_id(entry, log)
            if mid is None:  # a legacy entry dropped or left for later
                self._slots.release()
            elif not mid or mid in self._holding or mid in wanted:
                # no id, or a second entry for a message a task of ours is working on
                # (reclaimed, or re-added by the reconciler): that task records it
                if not mid:
                    log.warning("stream entry {} has no message id; dropped", entry.entry_id)
                skipped.append(entry)
                self._slots.release()
            else:
                wanted[mid] = entry
        claimed: list[Claimed] = []
        if wanted:
            claimed, others = await self._claim(list(wanted), log)
            for mid, status in others.items():
                if status is None:
                    log.bind(message_id=mid).warning(
                        "no metadata row for this stream entry; acknowledged"
                    )
                else:
                    log.bind(message_id=mid).debug("skipped: message is {}", status)
                skipped.append(wanted[mid])
                self._slots.release()
        self._recorder.acknowledge(skipped)
        for msg in claimed:
            self._holding.add(msg.id)
        self.in_flight += len(claimed)
        for chunk in by_bytes(claimed, READ_CHUNK):
            await self._bodies.acquire(sum(m.size for m in chunk))
            bodies = await self._read_bodies(chunk)
            for msg, body in zip(chunk, bodies, strict=True):
                nursery.start_soon(self._deliver, msg, body, wanted[msg.id], log)

    async def _message_id(self, entry: Entry, log: Logger) -> str | None:
        """The message id an entry stands for ("" when it names none); None when it was
        a legacy entry that was dropped or must wait."""
        if legacy.is_legacy(entry.fields):
            return await self._adopt(entry)
        return entry.fields.get("id", "")

    async def _claim(
        self, ids: list[str], log: Logger
    ) -> tuple[list[Claimed], dict[str, str | None]]:
        """Claim these messages in one statement: those claimed, and what the others are
        (their status; None: no row)."""
        live = self._live
        params = {
            "ids": ids,
            "consumer": self.name,
            "settle": self._lifetime,
            "live": live.others(self.name),
            "live_complete": live.complete,
        }

        def claim(conn: Conn) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                rows: list[dict[str, Any]] = cur.execute(Q.claim_messages, params).fetchall()
            return rows

        rows = await self._recorder.db_retrying(claim, log)
        claimed = [Claimed.from_row(r) for r in rows if r["status"] == "sending" and r["age_from"]]
        mine = {m.id for m in claimed}
        seen = {r["id"]: r["status"] for r in rows if r["id"] not in mine}
        others = {mid: seen.get(mid) for mid in ids if mid not in mine}
        return claimed, others

    async def _read_bodies(self, msgs: list[Claimed]) -> list[bytes | StoreError]:
        """Every body of a chunk in one call to the store; a store that fails as a whole
        fails each (a transient failure of each attempt)."""
        res = self._res
        try:
            return await res.store_offload(res.store.get_many, [m.storage_key for m in msgs])
        except StoreUnavailable as exc:
            return [exc] * len(msgs)

    async def _deliver(
        self, msg: Claimed, body: bytes | StoreError, entry: Entry, log: Logger
    ) -> None:
        """One message's attempt and its record; then its slot and budget are free."""
        mlog = log.bind(message_id=msg.id, tenant_id=msg.tenant_id, account_id=msg.account_id)
        try:
            finish = await self._deliverer.deliver(msg, body, mlog)
            del body
            await self._recorder.record(finish, entry, mlog)
        finally:
            self._holding.discard(msg.id)
            self._bodies.release(msg.size)
            self.in_flight -= 1
            self._slots.release()

    async def _adopt(self, entry: Entry) -> str | None:
        """Turn a legacy entry into a queued message; its id, or None when the entry was
        dropped (malformed: dead-lettered) or must wait (store or database down)."""
        log = logger.bind(consumer=self.name, legacy_entry=entry.entry_id)
        res = self._res
        try:
            found = legacy.parse(entry.fields)
        except legacy.LegacyEntryError as exc:
            problem = str(exc)
        else:
            account_id = found.account_id or await self._legacy_account()
            problem = "" if account_id is not None else "no account: set redis.legacy_account"
        if problem:
            log.warning("legacy entry dropped to the dead letters: {}", problem)
            fields = {"legacy_entry": entry.entry_id, "stream": entry.stream, "reason": problem}
            try:
                await res.redis_offload(res.streams.add_dead_letter, fields)
            except QueueUnavailable:
                return None  # keep the entry; it is retried after the visibility timeout
            self._recorder.acknowledge([entry])
            return None
        mid = legacy.message_id_for(entry.stream, entry.entry_id)
        key = key_for(mid)
        heads = summarize(found.body)
        row = {
            "id": mid,
            "account_id": account_id,
            "mail_from": found.mail_from,
            "rcpt_to": list(found.rcpt_to),
            "subject": heads.subject,
            "header_message_id": heads.message_id,
            "header_from": heads.from_,
            "header_to": heads.to,
            "header_cc": heads.cc,
            "size": len(found.body),
            "sha256": hashlib.sha256(found.body).hexdigest(),
            "storage_key": key,
        }
        try:
            await res.store_offload(res.store.put, key, found.body)
            await res.db.run(lambda conn: conn.execute(Q.adopt_legacy, row))
        except (StoreUnavailable, DatabaseUnavailable) as exc:
            log.warning("legacy entry not adopted yet: {}", exc)
            return None
        log.bind(message_id=mid).info("adopted a legacy stream entry")
        return mid

    async def _legacy_account(self) -> int | None:
        username = self._res.cfg.redis.legacy_account
        if not username:
            return None
        row = await self._res.db.run(
            lambda conn: conn.execute(Q.account_id_by_username, (username,)).fetchone()
        )
        return int(str(row[0])) if row else None
