"""The storage consistency checker: PostgreSQL, the message store and the stream must agree.

The same checks run from cron (`smtpproxy fsck-storage`, a dry run unless --repair) and
periodically inside `smtpproxy run` (repairing). Every check walks its data in pages or
streams, so memory stays flat on millions of rows and objects, and every repair is a
compare-and-set, so it is safe while instances are delivering:

* live-bodies     a queued/retrying/sending message whose body is missing
                  -> storage_error, a delivery_logs row, a dead-letter entry;
* orphan-bodies   a stored body no message refers to, older than the grace period
                  -> quarantined (moved under quarantine/) or deleted;
* enqueue-failed  a message the client was told 451 about, older than the grace period
                  -> its body and row removed;
* stream          a live message that is due but neither on the stream nor pending
                  -> re-enqueued (this is how a Redis that lost its data is rebuilt);
* verify          (optional) each stored body read back: size and SHA-256 as at ingest;
* retention       bodies of finished messages past storage.retention_days -> deleted;
                  messages and logs past database.retention_days -> deleted.

A PostgreSQL advisory lock lets only one checker run at a time across all instances.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import attrs
import psycopg
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.pool import connect, mapped_errors
from smtpproxy.db.queries import Q
from smtpproxy.errors import BodyNotFound, QueueUnavailable, UsageError
from smtpproxy.models import Status
from smtpproxy.queue.streams import dead_letter_fields
from smtpproxy.runtime.resources import Resources

PAGE = 1000
EXAMPLES = 20
_LOCK_KEY = 0x736D7470_6673636B  # "smtpfsck": the full check
_STREAM_LOCK_KEY = 0x736D7470_7265636F  # "smtpreco": the frequent stream reconciliation

OrphanAction = Literal["quarantine", "delete", "report"]
Progress = Callable[[str, int], None]  # (check name, items processed so far)


@attrs.frozen
class Options:
    repair: bool = False
    verify: bool = False
    orphan_action: OrphanAction = "delete"  # with repair: delete or quarantine orphans
    grace: float = 3600.0
    visibility: float = 300.0
    body_retention_days: int = 0  # 0: keep bodies forever
    metadata_retention_days: int = 0  # 0: keep rows forever

    @property
    def fixes_orphans(self) -> bool:
        return self.repair and self.orphan_action != "report"


@attrs.define
class CheckResult:
    name: str
    checked: int = 0
    problems: int = 0
    repaired: int = 0
    examples: list[str] = attrs.Factory(list)

    def found(self, example: str) -> None:
        self.problems += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class AlreadyRunning(UsageError):
    """Another checker holds the lock."""


def _noop(_: str, __: int) -> None:
    return None


class Checker:
    def __init__(self, res: Resources, options: Options, progress: Progress = _noop) -> None:
        self._res = res
        self._opts = options
        self._progress = progress

    # -- orchestration -------------------------------------------------------------------
    def run(self) -> list[CheckResult]:
        """Run every check once (blocking); raises AlreadyRunning if another checker runs."""
        checks = [self.live_bodies, self.orphan_bodies, self.enqueue_failed, self._stream_locked]
        if self._opts.verify:
            checks.append(self.verify)
        checks.append(self.retention)
        with self._locked(_LOCK_KEY, "another storage check is running"):
            return [check() for check in checks]

    def _stream_locked(self) -> CheckResult:
        """The stream check, unless a reconciler is doing exactly that right now."""
        try:
            return self.reconcile_stream()
        except AlreadyRunning:
            return CheckResult("stream")

    def reconcile_stream(self) -> CheckResult:
        """Only the stream check, under its own lock (run often by every instance)."""
        with self._locked(_STREAM_LOCK_KEY, "another stream reconciliation is running"):
            return self.stream()

    @contextmanager
    def _locked(self, key: int, busy: str) -> Iterator[None]:
        """A session advisory lock, on a connection of its own (not one of the pool's:
        the checks need those), held for the duration."""
        timeout = self._res.cfg.database.connect_timeout
        with (
            mapped_errors(),
            connect(self._res.db.url, autocommit=True, connect_timeout=timeout) as conn,
        ):
            row = conn.execute("SELECT pg_try_advisory_lock(%s::bigint)", (key,)).fetchone()
            if not row or not row[0]:
                raise AlreadyRunning(busy)
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (key,))

    def _pages(self, query: Any, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """Keyset-paginated rows of a query ordered by id with %(after)s and %(limit)s."""
        after = ""
        while True:
            with self._res.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(query, {**params, "after": after, "limit": PAGE}).fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1]["id"]
            if len(rows) < PAGE:
                return

    # -- checks -------------------------------------------------------------------------
    def live_bodies(self) -> CheckResult:
        result = CheckResult("live-bodies")
        store = self._res.store
        for rows in self._pages(Q.fsck_live_page, {}):
            for row in rows:
                result.checked += 1
                if store.exists(row["storage_key"]):
                    continue
                result.found(row["id"])
                if self._opts.repair and self._mark_storage_error(row["id"]):
                    result.repaired += 1
            self._progress(result.name, result.checked)
        return result

    def _mark_storage_error(self, mid: str) -> bool:
        reason = "body missing from the message store (found by the storage check)"
        params = {"id": mid, "reason": reason, "visibility": self._opts.visibility}

        def mark(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
            with conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(Q.fsck_mark_storage_error, params).fetchone()
                if row is not None:
                    cur.execute(
                        Q.insert_delivery_log,
                        {
                            "message_id": mid,
                            "account_id": row["account_id"],
                            "tenant_id": row["tenant_id"],
                            "provider_name": "",
                            "status": Status.STORAGE_ERROR.value,
                            "error_message": reason,
                            "attempt_number": row["attempts"],
                            "duration_ms": 0,
                            "provider_message_id": None,
                            "recipients": row["rcpt_to"],
                        },
                    )
            return row

        row = self._res.db.call(mark)
        if row is None:
            return False  # it moved on meanwhile (being sent, or finished)
        logger.bind(message_id=mid).error("storage check: body missing; dead-lettered")
        try:
            self._res.streams.add_dead_letter(
                dead_letter_fields(
                    mid,
                    row["tenant_id"],
                    row["account_id"],
                    status=Status.STORAGE_ERROR,
                    attempts=row["attempts"],
                    reason=reason,
                )
            )
        except QueueUnavailable as exc:  # the row says storage_error; the entry is a courtesy
            logger.bind(message_id=mid).warning("could not add to the dead-letter stream: {}", exc)
        return True

    def orphan_bodies(self) -> CheckResult:
        result = CheckResult("orphan-bodies")
        cutoff = datetime.now(UTC).timestamp() - self._opts.grace
        batch: list[str] = []

        def flush() -> None:
            known = self._known_keys(batch)
            for key in batch:
                if key in known:
                    continue
                result.found(key)
                if self._opts.fixes_orphans:
                    self._remove_orphan(key)
                    result.repaired += 1
            batch.clear()
            self._progress(result.name, result.checked)

        for obj in self._res.store.iter_objects():
            result.checked += 1
            if obj.mtime > cutoff:
                continue  # may be a message being accepted right now
            batch.append(obj.key)
            if len(batch) >= PAGE:
                flush()
        flush()
        return result

    def _known_keys(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()

        def known(conn: psycopg.Connection[Any]) -> set[str]:
            return {str(r[0]) for r in conn.execute(Q.fsck_known_keys, (keys,))}

        return self._res.db.call(known)

    def _remove_orphan(self, key: str) -> None:
        if self._opts.orphan_action == "quarantine":
            self._res.store.quarantine(key)
        else:
            self._res.store.delete(key)
        logger.bind(storage_key=key).warning(
            "storage check: orphan body {}",
            "quarantined" if self._opts.orphan_action == "quarantine" else "deleted",
        )

    def enqueue_failed(self) -> CheckResult:
        result = CheckResult("enqueue-failed")
        for rows in self._pages(Q.fsck_enqueue_failed_page, {"grace": self._opts.grace}):
            for row in rows:
                result.checked += 1
                result.found(row["id"])
                if self._opts.repair:
                    self._remove_refused(row["id"], row["storage_key"])
                    result.repaired += 1
            self._progress(result.name, result.checked)
        return result

    def _remove_refused(self, mid: str, key: str) -> None:
        def delete(conn: psycopg.Connection[Any]) -> bool:
            used = conn.execute(Q.fsck_key_still_used, {"key": key, "id": mid}).fetchone()
            conn.execute(Q.fsck_delete_enqueue_failed, (mid,))
            return bool(used and used[0])

        if not self._res.db.call(delete):
            self._res.store.delete(key)

    def stream(self) -> CheckResult:
        """Live rows that lost their stream entry. The stream's ids go into a temporary
        table (streamed with COPY) so the comparison runs in PostgreSQL, not in memory."""
        result = CheckResult("stream")
        params = {"grace": self._opts.grace, "visibility": self._opts.visibility}
        streams = self._res.streams
        with self._res.db.connection() as conn:
            row = conn.execute(Q.fsck_stream_candidates_exist, params).fetchone()
            if not row or not row[0]:
                return result
            conn.execute(Q.fsck_create_stream_table)
            with conn.cursor().copy(Q.fsck_copy_stream) as copy:
                for n, mid in enumerate(streams.queued_message_ids(), start=1):
                    copy.write_row((mid,))
                    if n % PAGE == 0:
                        self._progress(result.name, n)
            with conn.cursor(name="fsck_missing", row_factory=dict_row) as cur:
                cur.itersize = PAGE
                missing: list[dict[str, Any]] = []
                for m in cur.execute(Q.fsck_missing_from_stream, params):
                    result.checked += 1
                    result.found(m["id"])
                    if self._opts.repair:
                        missing.append(m)
                        if len(missing) >= PAGE:
                            result.repaired += self._reenqueue(missing)
                            missing = []
                if missing:
                    result.repaired += self._reenqueue(missing)
        return result

    def _reenqueue(self, rows: list[dict[str, Any]]) -> int:
        ids = [r["id"] for r in rows]
        self._res.db.call(partial(_touch, ids=ids))
        self._res.streams.add_many(
            [
                {
                    "id": r["id"],
                    "tenant_id": str(r["tenant_id"]),
                    "account_id": str(r["account_id"]),
                }
                for r in rows
            ]
        )
        for mid in ids:
            logger.bind(message_id=mid).warning("storage check: re-enqueued (not on the stream)")
        return len(rows)

    def verify(self) -> CheckResult:
        result = CheckResult("verify")
        store = self._res.store
        for rows in self._pages(Q.fsck_verify_page, {}):
            for row in rows:
                result.checked += 1
                try:
                    body = store.get(row["storage_key"])
                except BodyNotFound:
                    if row["status"] not in (
                        s.value for s in (Status.QUEUED, Status.RETRYING, Status.SENDING)
                    ):
                        result.found(f"{row['id']}: body missing")
                    continue  # live ones are live-bodies' business
                if len(body) != row["size"] or hashlib.sha256(body).hexdigest() != row["sha256"]:
                    result.found(f"{row['id']}: body differs from what was accepted")
            self._progress(result.name, result.checked)
        return result

    def retention(self) -> CheckResult:
        """Expired bodies are not inconsistencies: they are counted in `checked` (due for
        deletion) and `repaired` (deleted), never in `problems`."""
        result = CheckResult("retention")
        days = self._opts.body_retention_days
        if days and not self._opts.repair:
            row = self._res.db.call(
                lambda conn: conn.execute(Q.retention_expired_count, {"days": days}).fetchone()
            )
            result.checked = int(str(row[0])) if row else 0
        elif days:
            while True:
                with self._res.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                    rows = cur.execute(
                        Q.retention_expired_bodies, {"days": days, "limit": PAGE}
                    ).fetchall()
                if not rows:
                    break
                keys = sorted({r["storage_key"] for r in rows})
                for key in keys:
                    self._res.store.delete(key)
                self._res.db.call(partial(_mark_bodies_deleted, keys=keys))
                result.checked += len(keys)
                result.repaired += len(keys)
                self._progress(result.name, result.checked)
        if self._opts.repair and self._opts.metadata_retention_days:
            self._expire_metadata(result)
        return result

    def _expire_metadata(self, result: CheckResult) -> None:
        params = {"days": self._opts.metadata_retention_days, "limit": PAGE}
        for query in (Q.retention_delete_messages, Q.retention_delete_logs):
            # until nothing is left: a split parent goes only after its children went
            while deleted := self._res.db.call(partial(_delete_page, query=query, params=params)):
                logger.info("retention: deleted {} expired rows", deleted)


def _touch(conn: psycopg.Connection[Any], ids: list[str]) -> None:
    conn.execute(Q.fsck_touch, (ids,))


def _mark_bodies_deleted(conn: psycopg.Connection[Any], keys: list[str]) -> None:
    conn.execute(Q.retention_mark_body_deleted, (keys,))


def _delete_page(conn: psycopg.Connection[Any], query: Any, params: dict[str, Any]) -> int:
    return conn.execute(query, params).rowcount


def options_from_config(res: Resources, **overrides: Any) -> Options:
    cfg = res.cfg
    base = Options(
        grace=cfg.storage.orphan_grace,
        visibility=cfg.delivery.visibility_timeout,
        body_retention_days=cfg.storage.retention_days,
        metadata_retention_days=cfg.database.retention_days,
        orphan_action=cfg.storage.orphan_action,
    )
    return attrs.evolve(base, **overrides)
