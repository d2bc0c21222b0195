"""Group commit: making accepted messages durable in batches, then answering them.

Committer tasks take every submission waiting (up to smtp.commit_batch_max) and, per
batch, in this order:

1. write the bodies to the store and make them durable (one syncfs for local files);
2. insert all rows in one INSERT ... SELECT FROM unnest(...) and commit;
3. XADD all ids in one Redis pipeline, retried after 500 ms, 1 s and 2 s;
4. answer every session: 250 with the id, or 451.

The order means a committed row never points at a missing body and a stream entry never
points at a missing row. On failure what was written is undone: a store or database
failure removes the bodies; a queue failure marks the rows enqueue_failed (only those
still queued: one a consumer already took is in flight, and its client gets 250) and
removes their bodies. Orphans left by a crash in between are fsck-storage's job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable

import psycopg
import trio
from loguru import logger

from smtpproxy.db.queries import Q
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable, StoreUnavailable
from smtpproxy.ingress import bridge, replies
from smtpproxy.models import Submission
from smtpproxy.resources import Resources


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL or lone surrogates (from undecodable bytes)."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def row_columns(subs: list[Submission]) -> list[list[object]]:
    """Column arrays for Q.insert_messages, in its parameter order."""
    return [
        [s.message_id for s in subs],
        [s.account.tenant_id for s in subs],
        [s.account.account_id for s in subs],
        [_text(s.mail_from) for s in subs],
        [json.dumps([_text(r) for r in s.rcpt_to]) for s in subs],
        [_text(s.headers.subject) for s in subs],
        [_text(s.headers.message_id) for s in subs],
        [_text(s.headers.from_) for s in subs],
        [_text(s.headers.to) for s in subs],
        [_text(s.headers.cc) for s in subs],
        [len(s.body) for s in subs],
        [s.sha256 for s in subs],
        [s.storage_key for s in subs],
        [s.client_ip for s in subs],
    ]


def stream_fields(sub: Submission) -> dict[str, str]:
    return {
        "id": sub.message_id,
        "account_id": str(sub.account.account_id),
        "tenant_id": str(sub.account.tenant_id),
    }


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Committer:
    def __init__(
        self,
        res: Resources,
        loop: asyncio.AbstractEventLoop,
        on_accepted: Callable[[list[Submission]], Awaitable[None]] | None = None,
    ) -> None:
        self._res = res
        self._loop = loop
        self._on_accepted = on_accepted
        self._max = res.cfg.smtp.commit_batch_max
        self._delays = res.cfg.smtp.enqueue_retry_delays
        self._duplicate_window = res.cfg.smtp.duplicate_window
        self.batches = 0
        self.messages = 0

    async def run(self, jobs: trio.MemoryReceiveChannel[bridge.Job]) -> None:
        async for first in jobs:
            batch = [first]
            while len(batch) < self._max:
                try:
                    batch.append(jobs.receive_nowait())
                except trio.WouldBlock:
                    break
            answers = await self.commit([job.payload for job in batch])
            self.batches += 1
            self.messages += len(batch)
            bridge.resolve(self._loop, list(zip(batch, answers, strict=True)))

    async def commit(self, subs: list[Submission]) -> list[str]:
        res = self._res
        keys = [s.storage_key for s in subs]
        try:
            await res.store_offload(res.store.put_many, [(s.storage_key, s.body) for s in subs])
        except StoreUnavailable as exc:
            logger.error("message store failed; {} messages answered 451: {}", len(subs), exc)
            return [replies.TEMPFAIL_STORAGE] * len(subs)
        params = [*row_columns(subs), self._duplicate_window]
        try:
            # Planned afresh each time, never prepared: a generic plan made while the table
            # was small keeps a sequential scan for the duplicate lookup, and ingest then
            # slows down as messages accumulate (measured: 2,100 -> 650 msgs/s at 20,000).
            rows = await res.db.run(
                lambda conn: conn.execute(Q.insert_messages, params, prepare=False).fetchall()
            )
        except (DatabaseUnavailable, psycopg.Error) as exc:
            logger.error("database insert failed; {} messages answered 451: {}", len(subs), exc)
            await self._remove_bodies(keys)
            return [replies.TEMPFAIL] * len(subs)
        originals = {str(new): str(old) for new, old in rows}
        if originals:
            await self._forget_duplicates(subs, originals)
        fresh = [s for s in subs if s.message_id not in originals]
        answers = {s.message_id: replies.QUEUED.format(id=s.message_id) for s in fresh}
        if fresh and not await self._enqueue(fresh):
            answers = dict(zip(answers, await self._undo_enqueue(fresh), strict=True))
        if self._on_accepted is not None:
            await self._on_accepted([s for s in fresh if answers[s.message_id].startswith("250")])
        return [
            answers.get(s.message_id) or replies.QUEUED.format(id=originals[s.message_id])
            for s in subs
        ]

    async def _forget_duplicates(self, subs: list[Submission], originals: dict[str, str]) -> None:
        """A resubmission is answered with the original's id; its own copy of the body goes."""
        dups = [s for s in subs if s.message_id in originals]
        for s in dups:
            logger.bind(message_id=originals[s.message_id], account=s.account.username).info(
                "duplicate submission (same Message-ID, body and envelope): answered with"
                " the original id"
            )
        await self._remove_bodies([s.storage_key for s in dups])

    async def _enqueue(self, subs: list[Submission]) -> bool:
        res = self._res
        fields = [stream_fields(s) for s in subs]
        ids = [s.message_id for s in subs]
        attempts = len(self._delays) + 1
        for attempt in range(1, attempts + 1):
            try:
                await res.redis_offload(res.streams.add_many, fields)
            except QueueUnavailable as exc:
                logger.bind(message_ids=ids, attempt=attempt).warning(
                    "enqueue attempt {}/{} failed: {}", attempt, attempts, exc
                )
                if attempt == attempts:
                    return False
                await trio.sleep(self._delays[attempt - 1])
            else:
                return True
        return False

    async def _undo_enqueue(self, subs: list[Submission]) -> list[str]:
        """After the last enqueue attempt failed: tell the clients 451, unless a message
        was meanwhile taken by a consumer (it is being delivered: the client gets 250)."""
        res = self._res
        ids = [s.message_id for s in subs]
        params = {"ids": ids, "reason": "could not enqueue: Redis unavailable"}
        try:
            rows = await res.db.run(
                lambda conn: conn.execute(Q.mark_enqueue_failed, params).fetchall()
            )
        except (DatabaseUnavailable, psycopg.Error) as exc:
            # we cannot record the refusal: the reconciler may still deliver these rows,
            # and a client retry is then caught as a duplicate submission
            logger.bind(message_ids=ids).error("could not mark enqueue_failed: {}", exc)
            return [replies.TEMPFAIL_QUEUE] * len(subs)
        failed = {str(r[0]) for r in rows}
        await self._remove_bodies([s.storage_key for s in subs if s.message_id in failed])
        for s in subs:
            if s.message_id in failed:
                logger.bind(message_id=s.message_id).error("enqueue failed; answered 451")
        return [
            replies.TEMPFAIL_QUEUE
            if s.message_id in failed
            else replies.QUEUED.format(id=s.message_id)
            for s in subs
        ]

    async def _remove_bodies(self, keys: list[str]) -> None:
        res = self._res

        def remove() -> None:
            for key in keys:
                res.store.delete(key)

        try:
            await res.store_offload(remove)
        except StoreUnavailable as exc:
            logger.warning("could not remove {} bodies (fsck-storage will): {}", len(keys), exc)
