"""The storage consistency checker (smtpproxy/ops/fsck.py) and `smtpproxy fsck-storage`.

Every check runs against real PostgreSQL and Redis, and against both message stores
(local files, and S3 through moto's server on 127.0.0.1 with dummy credentials). Rows
are written with SQL as ingress and the consumer would leave them (statuses, claim and
retry times, storage keys, sizes and digests), bodies go through the store, stream
entries through redis-py. Each check is run as a dry run (problems counted, nothing
changed) and with repair, and the tests look at what is left: rows, statuses, delivery
logs, files and keys, stream and dead-letter entries, exit codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import redis
import trio
from cryptography.fernet import Fernet
from psycopg.rows import dict_row

from smtpproxy.config import Config
from smtpproxy.errors import DatabaseUnavailable
from smtpproxy.ids import new_message_id
from smtpproxy.ops import fsck
from smtpproxy.ops.fsck import AlreadyRunning, Checker, CheckResult, Options
from smtpproxy.runtime.resources import Resources, open_resources
from smtpproxy.runtime.service import serve
from smtpproxy.store import key_for
from tests.conftest import CliConfigFactory, make_config
from tests.support import cli, smtp
from tests.support.aws import no_real_aws
from tests.support.cli import Result
from tests.support.process import write_config
from tests.support.s3 import MotoS3

run = trio.to_thread.run_sync

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
OLD = 2 * HOUR  # older than the default grace (1 h)
S3_PREFIX = "msgs/"
ALL_CHECKS = ["live-bodies", "orphan-bodies", "enqueue-failed", "stream", "retention"]
PROGRESS_LINE = re.compile(r"^[a-z-]+: \d+ checked$")
LIVE = ("queued", "retrying", "sending")
FINAL = ("delivered", "failed", "dlq", "enqueue_failed", "storage_error", "split")


# -- the environment: no real AWS, one moto server ------------------------------------------


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_real_aws(monkeypatch, tmp_path, AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION="us-east-1")


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


# -- the store under test, both backends ----------------------------------------------------


@attrs.define
class Backend:
    """One message store as the checker sees it, plus what a test needs to inspect it."""

    kind: str
    storage: dict[str, Any]  # the [storage] section of the config
    cfg: Config
    res: Resources
    moto: MotoS3 | None = None
    bucket: str = ""

    @property
    def store(self) -> Any:
        return self.res.store

    @property
    def old_grace(self) -> float:
        """A grace under which a body put with put(old=True) counts as old: S3 cannot
        backdate LastModified, so there every body is old under grace 0."""
        return HOUR if self.kind == "local" else 0.0

    def put(self, key: str, body: bytes, *, old: bool = False) -> None:
        self.store.put(key, body)
        if old and self.kind == "local":
            then = time.time() - OLD
            os.utime(self.cfg.storage_path / key, (then, then))

    def exists(self, key: str) -> bool:
        return bool(self.store.exists(key))

    def listed(self) -> set[str]:
        return {obj.key for obj in self.store.iter_objects()}

    def quarantined(self, key: str) -> bytes | None:
        """The body kept under quarantine/ for key, or None."""
        if self.kind == "local":
            path = self.cfg.storage_path / "quarantine" / key
            return path.read_bytes() if path.is_file() else None
        assert self.moto is not None
        full = f"{S3_PREFIX}quarantine/{key}"
        if full not in self.moto.keys(self.bucket, full):
            return None
        return bytes(self.moto.s3.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def put_foreign(self) -> None:
        """A body next to the store but not in it (another user of the disk or bucket)."""
        if self.kind == "local":
            other = Path(self.cfg.data_dir) / "other" / "a" / "b"
            other.mkdir(parents=True)
            (other / "foreign.eml").write_bytes(b"not ours")
            then = time.time() - OLD
            os.utime(other / "foreign.eml", (then, then))
        else:
            assert self.moto is not None
            self.moto.s3.put_object(Bucket=self.bucket, Key="elsewhere/foreign.eml", Body=b"x")

    def foreign_exists(self) -> bool:
        if self.kind == "local":
            return (Path(self.cfg.data_dir) / "other" / "a" / "b" / "foreign.eml").is_file()
        assert self.moto is not None
        return self.moto.keys(self.bucket, "elsewhere/") == ["elsewhere/foreign.eml"]


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
) -> Iterator[Backend]:
    """Resources whose message store is local files or S3 (moto), one test run each."""
    moto: MotoS3 | None = None
    bucket = ""
    storage: dict[str, Any] = {"type": "local"}
    if request.param == "s3":
        moto = request.getfixturevalue("moto_s3")
        bucket = moto.new_bucket()
        creds = moto.credentials
        storage = {
            "type": "s3",
            "s3_bucket": bucket,
            "s3_prefix": S3_PREFIX,
            "s3_endpoint": moto.endpoint,
            "s3_region": creds["region"],
            "s3_access_key_id": creds["access_key_id"],
            "s3_secret_access_key": creds["secret_access_key"],
        }
    cfg = make_config(tmp_path, pg_url, redis_url, key_prefix, storage=storage)
    res = open_resources(cfg)
    try:
        yield Backend(request.param, storage, cfg, res, moto, bucket)
    finally:
        res.close()
        if moto is not None:
            moto.drop_bucket(bucket)


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# -- rows, bodies and stream entries --------------------------------------------------------


@attrs.frozen
class Msg:
    id: str
    key: str
    body: bytes


_INSERT = """
INSERT INTO messages (
    id, parent_id, tenant_id, account_id, mail_from, rcpt_to, size, sha256, storage_key,
    status, attempts, next_attempt_at, claimed_by, claimed_at, created_at, updated_at,
    finished_at, body_deleted_at)
SELECT %(id)s, %(parent)s, tenant_id, id, 'alice@example.com', ARRAY['bob@example.org'],
       %(size)s, %(sha256)s, %(key)s, %(status)s, %(attempts)s,
       now() + make_interval(secs => %(next_in)s::float8), %(claimed_by)s,
       now() - make_interval(secs => %(claimed_ago)s::float8),
       now() - make_interval(secs => %(created_ago)s::float8),
       now() - make_interval(secs => %(updated_ago)s::float8),
       now() - make_interval(secs => %(finished_ago)s::float8),
       now() - make_interval(secs => %(body_deleted_ago)s::float8)
FROM accounts WHERE id = %(account)s
"""


class Rows:
    """Message rows written as ingress and the consumer leave them, bodies in the store."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        account: dict[str, Any],
        store: Any,
        backend: Backend | None = None,
    ) -> None:
        self.conn = conn
        self.backend = backend
        self.account_id = int(account["id"])
        row = conn.execute(
            "SELECT tenant_id FROM accounts WHERE id = %s", (self.account_id,)
        ).fetchone()
        assert row is not None
        self.tenant_id = int(row[0])
        self.store = store

    def add(
        self,
        status: str = "queued",
        *,
        body: bool = True,
        old_body: bool = False,
        key: str | None = None,
        parent: str | None = None,
        updated_ago: float = 0.0,
        created_ago: float | None = None,
        next_attempt_in: float | None = None,
        claimed_ago: float | None = None,
        finished_ago: float | None = None,
        body_deleted_ago: float | None = None,
        size: int | None = None,
        sha256: str | None = None,
    ) -> Msg:
        """One row; with body, a body under its key (backdated with old_body on local)."""
        mid = new_message_id()
        key = key or key_for(mid)
        data = f"Subject: {mid}\r\n\r\nbody of {mid}\r\n".encode()
        if body and self.backend is not None:
            self.backend.put(key, data, old=old_body)
        elif body:
            assert not old_body, "backdating needs a Backend"
            self.store.put(key, data)
        if finished_ago is None and status in FINAL:
            finished_ago = updated_ago
        ages = [a for a in (updated_ago, claimed_ago, finished_ago, body_deleted_ago) if a]
        self.conn.execute(
            _INSERT,
            {
                "id": mid,
                "parent": parent,
                "size": len(data) if size is None else size,
                "sha256": hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
                "key": key,
                "status": status,
                "attempts": 1 if status in ("sending", "retrying") else 0,
                "next_in": next_attempt_in,
                "claimed_by": "consumer-1" if claimed_ago is not None else None,
                "claimed_ago": claimed_ago,
                "created_ago": created_ago if created_ago is not None else max(ages, default=0),
                "updated_ago": updated_ago,
                "finished_ago": finished_ago,
                "body_deleted_ago": body_deleted_ago,
                "account": self.account_id,
            },
        )
        return Msg(mid, key, data)

    def sharing(self, other: Msg, status: str, *, child: bool = False, **kw: Any) -> Msg:
        """A row that uses other's body (a split child with child=True), as its copy."""
        msg = self.add(
            status,
            key=other.key,
            parent=other.id if child else None,
            body=False,
            size=len(other.body),
            sha256=hashlib.sha256(other.body).hexdigest(),
            **kw,
        )
        return Msg(msg.id, other.key, other.body)

    def get(self, mid: str) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM messages WHERE id = %s", (mid,)).fetchone()

    def status(self, mid: str) -> str | None:
        row = self.get(mid)
        return None if row is None else str(row["status"])

    def logs(self, mid: str) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT * FROM delivery_logs WHERE message_id = %s ORDER BY id", (mid,)
            ).fetchall()

    def add_log(self, mid: str, status: str, ago: float) -> None:
        self.conn.execute(
            "INSERT INTO delivery_logs (message_id, account_id, tenant_id, provider_name,"
            " status, attempt_number, created_at)"
            " VALUES (%s, %s, %s, 'outbox', %s, 1, now() - make_interval(secs => %s::float8))",
            (mid, self.account_id, self.tenant_id, status, ago),
        )

    def entry(self, rds: redis.Redis, key_prefix: str, msg: Msg, *, legacy: bool = False) -> str:
        """XADD msg as ingress does (to its tenant's stream, registered in `<prefix>:streams`),
        or to the single stream of earlier versions; returns the entry id."""
        fields = {
            "id": msg.id,
            "tenant_id": str(self.tenant_id),
            "account_id": str(self.account_id),
        }
        if legacy:
            return str(rds.xadd(f"{key_prefix}:deliver", fields))
        rds.sadd(f"{key_prefix}:streams", str(self.tenant_id))
        return str(rds.xadd(tenant_stream(key_prefix, self.tenant_id), fields))


@pytest.fixture
def rows(conn: psycopg.Connection[Any], account: dict[str, Any], backend: Backend) -> Rows:
    return Rows(conn, account, backend.store, backend)


def tenant_stream(key_prefix: str, tenant_id: int) -> str:
    return f"{key_prefix}:deliver:{tenant_id}"


def stream(rds: redis.Redis, key_prefix: str) -> list[dict[str, str]]:
    """The fields of every entry on the delivery streams (the single stream of earlier
    versions, then every registered tenant's), each stream in order."""
    tenants = sorted(rds.smembers(f"{key_prefix}:streams"))
    keys = [f"{key_prefix}:deliver", *(f"{key_prefix}:deliver:{t}" for t in tenants)]
    return [dict(fields) for key in keys for _, fields in rds.xrange(key)]


def stream_ids(rds: redis.Redis, key_prefix: str) -> list[str]:
    return sorted(f["id"] for f in stream(rds, key_prefix))


def dead_letters(rds: redis.Redis, key_prefix: str) -> list[dict[str, str]]:
    return [dict(fields) for _, fields in rds.xrange(f"{key_prefix}:dlq")]


def check(res: Resources, **options: Any) -> dict[str, CheckResult]:
    """Checker(res, Options(**options)).run(), by check name (in the order they ran)."""
    return {r.name: r for r in Checker(res, Options(**options)).run()}


def counts(result: CheckResult) -> tuple[int, int]:
    return result.problems, result.repaired


# -- live-bodies ----------------------------------------------------------------------------


def _live_rows(rows: Rows) -> dict[str, Msg]:
    return {
        "queued": rows.add("queued", body=False),
        "retrying": rows.add("retrying", body=False, next_attempt_in=HOUR),
        "fresh claim": rows.add("sending", body=False, claimed_ago=0),
        "stale claim": rows.add("sending", body=False, claimed_ago=10 * MINUTE),
        "with body": rows.add("queued"),
    }


def test_live_bodies_dry_run_counts_and_changes_nothing(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """Dry run: every live message without a body is a problem; no row, log or entry changes."""
    m = _live_rows(rows)
    result = check(backend.res)["live-bodies"]
    assert (result.checked, result.problems, result.repaired) == (5, 4, 0)
    missing = {m[k].id for k in ("queued", "retrying", "fresh claim", "stale claim")}
    assert set(result.examples) == missing
    assert {k: rows.status(v.id) for k, v in m.items()} == {
        "queued": "queued",
        "retrying": "retrying",
        "fresh claim": "sending",
        "stale claim": "sending",
        "with body": "queued",
    }
    assert all(rows.logs(v.id) == [] for v in m.values())
    assert dead_letters(rds, key_prefix) == []


def test_live_bodies_repair_dead_letters_all_but_a_fresh_claim(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """Repair: storage_error, a log and a dead letter each; a freshly claimed row is left."""
    m = _live_rows(rows)
    before_fresh = rows.get(m["fresh claim"].id)
    result = check(backend.res, repair=True)["live-bodies"]
    assert counts(result) == (4, 3)
    repaired = [m["queued"], m["retrying"], m["stale claim"]]
    for msg in repaired:
        row = rows.get(msg.id)
        assert row is not None
        assert row["status"] == "storage_error"
        assert "body missing" in row["last_error"]
        assert row["finished_at"] is not None
        assert (row["claimed_by"], row["claimed_at"]) == (None, None)
        [log] = rows.logs(msg.id)
        assert (log["status"], log["provider_name"]) == ("storage_error", "")
        assert log["recipients"] == ["bob@example.org"]
    dead = dead_letters(rds, key_prefix)
    assert sorted(d["id"] for d in dead) == sorted(msg.id for msg in repaired)
    assert {d["status"] for d in dead} == {"storage_error"}
    assert {d["account_id"] for d in dead} == {str(rows.account_id)}
    assert rows.get(m["fresh claim"].id) == before_fresh  # being sent: not touched at all
    assert rows.logs(m["fresh claim"].id) == []
    assert rows.status(m["with body"].id) == "queued"
    assert backend.exists(m["with body"].key)
    # what was repaired stays repaired; the freshly claimed one is still reported
    again = check(backend.res, repair=True)["live-bodies"]
    assert (again.checked, again.problems, again.repaired) == (2, 1, 0)
    assert len(dead_letters(rds, key_prefix)) == 3


# -- orphan-bodies --------------------------------------------------------------------------


def _orphan_setup(backend: Backend, rows: Rows) -> tuple[Msg, list[Msg]]:
    """An old orphan, bodies that rows refer to (old and new, live and finished), a foreign
    file next to the store."""
    mid = new_message_id()
    orphan = Msg(mid, key_for(mid), b"Subject: nobody's\r\n\r\norphan\r\n")
    backend.put(orphan.key, orphan.body, old=True)
    referenced = [
        rows.add("delivered", old_body=True, updated_ago=OLD),
        rows.add("queued", old_body=True, updated_ago=OLD),
        rows.add("queued"),
    ]
    backend.put_foreign()
    return orphan, referenced


def test_old_orphan_is_reported_by_a_dry_run(backend: Backend, rows: Rows) -> None:
    """Dry run: an old body no row refers to is one problem and stays where it is."""
    orphan, referenced = _orphan_setup(backend, rows)
    result = check(backend.res, grace=backend.old_grace)["orphan-bodies"]
    assert (result.checked, result.problems, result.repaired) == (4, 1, 0)
    assert result.examples == [orphan.key]
    assert backend.store.get(orphan.key) == orphan.body
    assert backend.listed() == {orphan.key} | {m.key for m in referenced}


def test_old_orphan_is_deleted(backend: Backend, rows: Rows) -> None:
    """Repair with orphan_action delete: the orphan is gone, referenced and foreign bodies stay."""
    orphan, referenced = _orphan_setup(backend, rows)
    result = check(backend.res, repair=True, grace=backend.old_grace, orphan_action="delete")
    assert counts(result["orphan-bodies"]) == (1, 1)
    assert not backend.exists(orphan.key)
    assert backend.quarantined(orphan.key) is None
    assert backend.listed() == {m.key for m in referenced}
    assert all(backend.store.get(m.key) == m.body for m in referenced)
    assert backend.foreign_exists()
    assert counts(check(backend.res, grace=backend.old_grace)["orphan-bodies"]) == (0, 0)


def test_old_orphan_is_quarantined(backend: Backend, rows: Rows) -> None:
    """Repair with orphan_action quarantine: no longer listed, kept byte for byte under
    quarantine/, and not an orphan on the next run."""
    orphan, referenced = _orphan_setup(backend, rows)
    result = check(backend.res, repair=True, grace=backend.old_grace, orphan_action="quarantine")
    assert counts(result["orphan-bodies"]) == (1, 1)
    assert not backend.exists(orphan.key)
    assert orphan.key not in backend.listed()
    assert backend.quarantined(orphan.key) == orphan.body
    assert all(backend.store.get(m.key) == m.body for m in referenced)
    again = check(backend.res, repair=True, grace=backend.old_grace, orphan_action="quarantine")
    assert counts(again["orphan-bodies"]) == (0, 0)
    assert backend.quarantined(orphan.key) == orphan.body


def test_orphan_action_report_only_counts(backend: Backend, rows: Rows) -> None:
    """Repair with orphan_action report: the orphan is counted, neither moved nor deleted."""
    orphan, _ = _orphan_setup(backend, rows)
    result = check(backend.res, repair=True, grace=backend.old_grace, orphan_action="report")
    assert counts(result["orphan-bodies"]) == (1, 0)
    assert backend.store.get(orphan.key) == orphan.body
    assert backend.quarantined(orphan.key) is None


def test_fresh_orphan_is_left_alone(backend: Backend, rows: Rows) -> None:
    """A body younger than the grace period may belong to a message being accepted: kept."""
    mid = new_message_id()
    backend.put(key_for(mid), b"being accepted right now")
    rows.add("queued")
    result = check(backend.res, repair=True, grace=HOUR, orphan_action="delete")
    assert (result["orphan-bodies"].checked, *counts(result["orphan-bodies"])) == (2, 0, 0)
    assert backend.store.get(key_for(mid)) == b"being accepted right now"


# -- enqueue-failed -------------------------------------------------------------------------


def _refused(rows: Rows) -> dict[str, Msg]:
    live = rows.add("queued")
    return {
        "old": rows.add("enqueue_failed", updated_ago=OLD),
        "young": rows.add("enqueue_failed", updated_ago=MINUTE),
        # the same key as a live message (never written by ingress, but the body is needed)
        "shared": rows.sharing(live, "enqueue_failed", updated_ago=OLD),
        "live": live,
    }


def test_enqueue_failed_dry_run_counts_old_refusals(backend: Backend, rows: Rows) -> None:
    """Dry run: refused messages past the grace are problems; rows and bodies stay."""
    m = _refused(rows)
    result = check(backend.res)["enqueue-failed"]
    assert counts(result) == (2, 0)
    assert sorted(result.examples) == sorted([m["old"].id, m["shared"].id])
    assert all(rows.get(msg.id) is not None for msg in m.values())
    assert backend.exists(m["old"].key)


def test_enqueue_failed_repair_removes_row_and_body_unless_shared(
    backend: Backend, rows: Rows
) -> None:
    """Repair: an old refusal loses row and body; a young one is kept; a body another live
    row still needs is kept."""
    m = _refused(rows)
    result = check(backend.res, repair=True)["enqueue-failed"]
    assert counts(result) == (2, 2)
    assert rows.get(m["old"].id) is None
    assert not backend.exists(m["old"].key)
    assert rows.status(m["young"].id) == "enqueue_failed"
    assert backend.store.get(m["young"].key) == m["young"].body
    assert rows.get(m["shared"].id) is None
    assert rows.status(m["live"].id) == "queued"
    assert backend.store.get(m["live"].key) == m["live"].body
    assert counts(check(backend.res, repair=True)["enqueue-failed"]) == (0, 0)


# -- stream ---------------------------------------------------------------------------------


def _stream_rows(rows: Rows, rds: redis.Redis, key_prefix: str) -> dict[str, Msg]:
    key = tenant_stream(key_prefix, rows.tenant_id)
    rds.xgroup_create(key, "delivery", id="0", mkstream=True)
    m = {
        "pending": rows.add("queued", updated_ago=OLD),
        "lost": rows.add("queued", updated_ago=OLD),
        "on stream": rows.add("queued", updated_ago=OLD),
        "on legacy stream": rows.add("queued", updated_ago=OLD),
        "fresh": rows.add("queued"),
        "retry overdue": rows.add("retrying", updated_ago=OLD, next_attempt_in=-OLD),
        "retry due just now": rows.add("retrying", updated_ago=OLD, next_attempt_in=-MINUTE),
        "retry later": rows.add("retrying", updated_ago=OLD, next_attempt_in=HOUR),
        "stale claim": rows.add("sending", updated_ago=OLD, claimed_ago=10 * MINUTE),
        "fresh claim": rows.add("sending", updated_ago=OLD, claimed_ago=0),
        "delivered": rows.add("delivered", updated_ago=OLD),
    }
    # read by a consumer that then died: pending, never acknowledged
    rows.entry(rds, key_prefix, m["pending"])
    read = rds.xreadgroup("delivery", "dead-consumer", {key: ">"}, count=1)
    assert [f["id"] for _, entries in read for _, f in entries] == [m["pending"].id]
    rows.entry(rds, key_prefix, m["on stream"])
    rows.entry(rds, key_prefix, m["on legacy stream"], legacy=True)
    return m


REENQUEUED = ("lost", "retry overdue", "stale claim")


def test_stream_dry_run_counts_what_lost_its_entry(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """Dry run: only due live rows neither on a stream nor pending are problems; no stream
    is written."""
    m = _stream_rows(rows, rds, key_prefix)
    before = stream(rds, key_prefix)
    result = check(backend.res)["stream"]
    assert counts(result) == (3, 0)
    assert sorted(result.examples) == sorted(m[k].id for k in REENQUEUED)
    assert stream(rds, key_prefix) == before


def test_stream_repair_reenqueues_lost_rows(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """Repair: lost queued, overdue retrying and stale sending rows get one entry each on
    their tenant's stream, with the right fields and a touched updated_at; everything
    else is left as it was."""
    m = _stream_rows(rows, rds, key_prefix)
    before = {k: rows.get(v.id) for k, v in m.items()}
    legacy_before = rds.xrange(f"{key_prefix}:deliver")
    result = check(backend.res, repair=True)["stream"]
    assert counts(result) == (3, 3)
    assert rds.xrange(f"{key_prefix}:deliver") == legacy_before
    on_tenant_stream = [dict(f) for _, f in rds.xrange(tenant_stream(key_prefix, rows.tenant_id))]
    assert on_tenant_stream[:2] == [
        {"id": m[k].id, "tenant_id": str(rows.tenant_id), "account_id": str(rows.account_id)}
        for k in ("pending", "on stream")
    ]
    assert sorted(on_tenant_stream[2:], key=lambda f: f["id"]) == sorted(
        (
            {"id": m[k].id, "tenant_id": str(rows.tenant_id), "account_id": str(rows.account_id)}
            for k in REENQUEUED
        ),
        key=lambda f: f["id"],
    )
    for name in REENQUEUED:
        after = rows.get(m[name].id)
        assert after is not None
        assert after["updated_at"] > before[name]["updated_at"]
        assert after["status"] == before[name]["status"]
    for name in m.keys() - set(REENQUEUED):
        assert rows.get(m[name].id) == before[name], name
    pending = rds.xpending(tenant_stream(key_prefix, rows.tenant_id), "delivery")
    assert pending["pending"] == 1
    # the next run finds the streams complete
    again = check(backend.res, repair=True)["stream"]
    assert counts(again) == (0, 0)
    assert len(stream(rds, key_prefix)) == 6


def test_stream_scans_nothing_when_no_live_row_is_old_enough(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """With no live row old enough to have lost its entry no stream is read: here the
    stream every scan starts with holds a string, which any read would fail on."""
    rows.add("queued")
    rows.add("retrying", next_attempt_in=-MINUTE)
    rows.add("retrying", next_attempt_in=HOUR)
    rows.add("sending", claimed_ago=MINUTE)
    rows.add("delivered", updated_ago=OLD)
    rds.set(f"{key_prefix}:deliver", "not a stream")
    result = check(backend.res, repair=True)["stream"]
    assert (result.checked, result.problems, result.repaired) == (0, 0, 0)
    # the same setup with one queued row past the grace does read the streams
    rows.add("queued", updated_ago=OLD)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        check(backend.res, repair=True)


# -- verify ---------------------------------------------------------------------------------


def test_verify_finds_bodies_changed_after_acceptance(
    backend: Backend, rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """With verify, bodies whose size or SHA-256 differ from the row are problems, as is a
    finished message's missing body; without verify nothing is read back."""
    same_size = rows.add("delivered", updated_ago=HOUR)
    backend.store.put(same_size.key, same_size.body.upper())  # same length, other bytes
    longer = rows.add("delivered", updated_ago=HOUR)
    backend.store.put(longer.key, longer.body + b"appended\r\n")
    intact = [rows.add("delivered", updated_ago=HOUR), rows.add("queued")]
    missing_final = rows.add("failed", updated_ago=HOUR, body=False)
    rows.add("delivered", updated_ago=HOUR, body=False, body_deleted_ago=MINUTE)  # retention
    live_missing = rows.add("queued", body=False)  # live-bodies' business, not verify's
    rows.entry(rds, key_prefix, intact[1])
    rows.entry(rds, key_prefix, live_missing)

    plain = check(backend.res)
    assert list(plain) == ALL_CHECKS  # no verify without verify=True
    result = check(backend.res, verify=True)
    assert list(result) == [*ALL_CHECKS[:4], "verify", "retention"]
    verify = result["verify"]
    assert verify.checked == 6
    assert counts(verify) == (3, 0)
    assert sorted(verify.examples) == sorted(
        [
            f"{same_size.id}: body differs from what was accepted",
            f"{longer.id}: body differs from what was accepted",
            f"{missing_final.id}: body missing",
        ]
    )
    assert result["live-bodies"].examples == [live_missing.id]
    # verify reports, it never changes a body, not even with repair
    check(backend.res, verify=True, repair=True)
    assert backend.store.get(same_size.key) == same_size.body.upper()
    assert rows.status(same_size.id) == "delivered"


# -- retention ------------------------------------------------------------------------------


def _retention_rows(rows: Rows) -> dict[str, Msg]:
    parent = rows.add("split", updated_ago=40 * DAY)
    old_parent = rows.add("split", updated_ago=40 * DAY)
    return {
        "expired": rows.add("delivered", updated_ago=40 * DAY),
        "young": rows.add("delivered", updated_ago=DAY),
        "live": rows.add("queued", created_ago=40 * DAY),
        "parent": parent,
        "live child": rows.sharing(parent, "queued", child=True),
        "old parent": old_parent,
        "old child": rows.sharing(old_parent, "delivered", child=True, updated_ago=40 * DAY),
    }


def test_body_retention_dry_run_counts_only(backend: Backend, rows: Rows) -> None:
    """Dry run: bodies past retention are counted as due (not as problems); none is deleted."""
    m = _retention_rows(rows)
    result = check(backend.res, body_retention_days=30)["retention"]
    assert (result.checked, result.problems, result.repaired) == (2, 0, 0)
    for msg in m.values():
        assert backend.exists(msg.key)
        row = rows.get(msg.id)
        assert row is not None
        assert row["body_deleted_at"] is None


def test_body_retention_deletes_expired_bodies_not_shared_ones(
    backend: Backend, rows: Rows
) -> None:
    """Repair: expired bodies are deleted and every row using them marked; a young message,
    a live one and a split parent whose live child shares the body keep theirs."""
    m = _retention_rows(rows)
    result = check(backend.res, repair=True, body_retention_days=30)["retention"]
    assert (result.checked, result.problems, result.repaired) == (2, 0, 2)
    for name in ("expired", "old parent", "old child"):
        row = rows.get(m[name].id)
        assert row is not None
        assert row["body_deleted_at"] is not None, name
        assert row["status"] in FINAL
        assert not backend.exists(m[name].key)
    for name in ("young", "live", "parent", "live child"):
        row = rows.get(m[name].id)
        assert row is not None
        assert row["body_deleted_at"] is None, name
        assert backend.store.get(m[name].key) == m[name].body
    # nothing is left inconsistent: no missing body reported, nothing due any more
    after = check(backend.res, repair=True, verify=True, body_retention_days=30)
    assert {n: r.examples for n, r in after.items() if r.problems} == {}
    assert after["retention"].checked == 0


def test_metadata_retention_deletes_old_finished_messages_and_logs(
    backend: Backend, rows: Rows
) -> None:
    """Repair: finished messages past database retention go with their logs; young ones,
    live ones, and a split parent whose child is live stay. A dry run deletes nothing."""
    gone = rows.add("delivered", updated_ago=100 * DAY, body=False, body_deleted_ago=70 * DAY)
    rows.add_log(gone.id, "retrying", 100 * DAY)
    rows.add_log(gone.id, "delivered", 100 * DAY)
    young = rows.add("delivered", updated_ago=10 * DAY)
    rows.add_log(young.id, "delivered", 10 * DAY)
    live = rows.add("queued", created_ago=100 * DAY)
    parent = rows.add("split", updated_ago=100 * DAY)
    child = rows.sharing(parent, "queued", child=True)

    check(backend.res, metadata_retention_days=90)
    assert rows.get(gone.id) is not None
    assert len(rows.logs(gone.id)) == 2

    check(backend.res, repair=True, metadata_retention_days=90)
    assert rows.get(gone.id) is None
    assert rows.logs(gone.id) == []
    assert rows.status(young.id) == "delivered"
    assert [log["status"] for log in rows.logs(young.id)] == ["delivered"]
    assert rows.status(live.id) == "queued"
    assert rows.status(parent.id) == "split"
    assert rows.status(child.id) == "queued"
    assert backend.store.get(parent.key) == parent.body


def test_metadata_retention_deletes_an_expired_split_family_in_one_run(
    backend: Backend, rows: Rows
) -> None:
    """A split parent and its children, all finished past retention, are gone after one run."""
    parent = rows.add("split", updated_ago=100 * DAY, body=False, body_deleted_ago=70 * DAY)
    child = rows.sharing(parent, "delivered", child=True, updated_ago=100 * DAY)
    check(backend.res, repair=True, metadata_retention_days=90)
    assert rows.get(child.id) is None
    assert rows.get(parent.id) is None


# -- the lock -------------------------------------------------------------------------------


def test_a_second_checker_raises_already_running_while_one_runs(res: Resources) -> None:
    """While one checker runs (held inside its progress callback), another run() raises
    AlreadyRunning, the frequent stream reconciliation still runs, and after it finishes
    the lock is free again."""
    started, release = threading.Event(), threading.Event()
    out: list[list[CheckResult]] = []

    def progress(_name: str, _done: int) -> None:
        started.set()
        release.wait(20)

    first = threading.Thread(target=lambda: out.append(Checker(res, Options(), progress).run()))
    first.start()
    try:
        assert started.wait(20)
        with pytest.raises(AlreadyRunning, match="another storage check is running"):
            Checker(res, Options()).run()
        assert Checker(res, Options()).reconcile_stream().name == "stream"
    finally:
        release.set()
        first.join(20)
    assert [r.name for r in out[0]] == ALL_CHECKS
    assert [r.name for r in Checker(res, Options()).run()] == ALL_CHECKS


def test_lock_held_by_another_session_stops_the_run_before_any_repair(
    res: Resources, pg_url: str, conn: psycopg.Connection[Any], account: dict[str, Any]
) -> None:
    """With the advisory lock taken by another session, run() raises and repairs nothing;
    once it is released the same run repairs."""
    rows = Rows(conn, account, res.store)
    msg = rows.add("queued", body=False)
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s::bigint)", (fsck._LOCK_KEY,))
        with pytest.raises(AlreadyRunning):
            Checker(res, Options(repair=True)).run()
        assert rows.status(msg.id) == "queued"
        other.execute("SELECT pg_advisory_unlock(%s::bigint)", (fsck._LOCK_KEY,))
    assert counts(check(res, repair=True)["live-bodies"]) == (1, 1)
    assert rows.status(msg.id) == "storage_error"


def test_stream_repair_works_with_a_small_pool(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    conn: psycopg.Connection[Any],
    account: dict[str, Any],
    rds: redis.Redis,
) -> None:
    """A valid config with database.pool_max = 2 can still re-enqueue a lost message."""
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        database={"pool_min": 1, "pool_max": 2, "connect_timeout": "1s"},
    )
    small = open_resources(cfg)
    try:
        lost = Rows(conn, account, small.store).add("queued", updated_ago=OLD)
        try:
            result = check(small, repair=True)["stream"]
        except DatabaseUnavailable as exc:
            pytest.fail(f"the checker could not get a connection: {exc}")
    finally:
        small.close()
    assert counts(result) == (1, 1)
    assert stream_ids(rds, key_prefix) == [lost.id]


# -- safe while delivering ------------------------------------------------------------------


async def test_repairs_are_safe_while_the_service_accepts_and_delivers(
    backend: Backend,
    rows: Rows,
    account: dict[str, Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    rds: redis.Redis,
    nursery: trio.Nursery,
) -> None:
    """Repairing checks run back to back while a real service accepts and delivers: every
    accepted message is delivered once with its body intact, nothing live is touched, and
    the planted problems are repaired."""
    # short, so planted problems are found while mail flows, yet far longer than ingress
    # takes from writing a body to committing its row
    grace = 5.0
    lost = rows.add("queued", updated_ago=OLD)  # its stream entry was lost
    refused = rows.add("enqueue_failed", updated_ago=OLD)
    orphan_key = key_for(new_message_id())
    backend.put(orphan_key, b"orphan", old=True)
    # the local orphan is backdated; on S3 it becomes old only once the grace has passed
    orphan_old_at = time.monotonic() + (grace + 0.5 if backend.kind == "s3" else 0)

    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        storage=backend.storage,
        delivery={"default_route": "outbox"},
    )
    stop = trio.Event()
    with trio.fail_after(60):
        running = await nursery.start(serve, cfg, stop)
    port = running.smtp[0][1]
    opts = Options(
        repair=True,
        verify=True,
        grace=grace,
        orphan_action="delete",
        body_retention_days=1,
        metadata_retention_days=1,
    )
    accepted: list[str] = []
    runs: list[list[CheckResult]] = []
    runs_while_sending: list[bool] = []  # whether each run began and ended mid-sending
    sending_done = trio.Event()

    def send_some(n: int) -> None:
        for i in range(n):
            # distinct bodies: a resubmitted Message-ID and body is answered as a duplicate
            data = smtp.message(subject=f"under check {threading.get_ident()} {i}")
            code, reply = smtp.send(port, "app", account["password"], data)
            assert code == 250, reply
            accepted.append(smtp.queued_id(reply))

    async def sender() -> None:
        async with trio.open_nursery() as senders:
            for _ in range(3):
                senders.start_soon(run, send_some, 12)
        sending_done.set()

    async def checker() -> None:
        while not sending_done.is_set() or time.monotonic() < orphan_old_at:
            during = not sending_done.is_set()
            runs.append(await run(Checker(backend.res, opts).run))
            runs_while_sending.append(during and not sending_done.is_set())

    with trio.fail_after(90):
        async with trio.open_nursery() as work:
            work.start_soon(sender)
            work.start_soon(checker)
        want = [*accepted, lost.id]
        while True:
            with rows.conn.cursor() as cur:
                done = cur.execute(
                    "SELECT count(*) FROM messages WHERE id = ANY(%s) AND status = 'delivered'",
                    (want,),
                ).fetchone()
            if done is not None and done[0] == len(want):
                break
            await trio.sleep(0.05)
        runs.append(await run(Checker(backend.res, opts).run))
    stop.set()

    assert len(accepted) == 36
    assert sum(runs_while_sending) >= 2
    with rows.conn.cursor(row_factory=dict_row) as cur:
        statuses = cur.execute("SELECT status, count(*) AS n FROM messages GROUP BY 1").fetchall()
        logs = cur.execute("SELECT message_id, status FROM delivery_logs").fetchall()
    assert {r["status"]: r["n"] for r in statuses} == {"delivered": 37}
    assert sorted(r["message_id"] for r in logs) == sorted([*accepted, lost.id])
    assert {r["status"] for r in logs} == {"delivered"}
    for mid in [*accepted, lost.id]:
        row = rows.get(mid)
        assert row is not None
        assert row["body_deleted_at"] is None
        body = backend.store.get(row["storage_key"])
        assert hashlib.sha256(body).hexdigest() == row["sha256"]
        assert (tmp_path / "outbox" / f"{mid}.eml").read_bytes() == body
    assert dead_letters(rds, key_prefix) == []
    assert rows.get(refused.id) is None
    assert not backend.exists(orphan_key)
    found = {
        name: sum(r.problems for rs in runs for r in rs if r.name == name) for name in ALL_CHECKS
    }
    assert found["live-bodies"] == 0
    assert found["enqueue-failed"] == 1
    assert found["orphan-bodies"] == 1
    assert found["stream"] >= 1
    assert sum(r.problems for rs in runs for r in rs if r.name == "verify") == 0


# -- the command line -----------------------------------------------------------------------


def run_cli(config: Path, *args: str) -> Result:
    """`smtpproxy --config CONFIG fsck-storage ARGS...` (in this process; stderr not a
    terminal)."""
    return cli.run_cli(config, "fsck-storage", *args, timeout=120)


def exited(result: Result, code: int) -> Result:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def progress_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if PROGRESS_LINE.match(line)]


@pytest.fixture
def config_path(cli_config_file: CliConfigFactory) -> Path:
    return cli_config_file()


@pytest.fixture
def local(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None
) -> Iterator[Resources]:
    """Resources on the same data directory, database and key prefix as config_path."""
    resources = open_resources(make_config(tmp_path, pg_url, redis_url, key_prefix))
    yield resources
    resources.close()


@pytest.fixture
def cli_rows(conn: psycopg.Connection[Any], account: dict[str, Any], local: Resources) -> Rows:
    return Rows(conn, account, local.store)


def test_cli_consistent_exits_0(
    config_path: Path, cli_rows: Rows, rds: redis.Redis, key_prefix: str
) -> None:
    """Everything agrees: exit 0, a table and 'consistent'; plain progress lines on stderr."""
    msg = cli_rows.add("queued")
    cli_rows.entry(rds, key_prefix, msg)
    cli_rows.add("delivered", updated_ago=DAY)
    result = exited(run_cli(config_path), 0)
    assert "consistent" in result.stdout
    assert "live-bodies" in result.stdout
    assert result.stderr.splitlines() == progress_lines(result)
    assert "live-bodies: 1 checked" in result.stderr
    assert "orphan-bodies: 2 checked" in result.stderr


def test_cli_progress_is_a_bar_on_a_terminal(config_path: Path, cli_rows: Rows) -> None:
    """With stderr on a terminal the progress is a rich bar (check names, item counts,
    escape sequences), not the plain lines; stdout still gets the summary."""
    cli_rows.add("queued")
    env = {k: v for k, v in os.environ.items() if k != "SMTPPROXY_CONFIG"}
    env.update(TERM="xterm-256color", COLUMNS="120")
    main, tty = pty.openpty()
    proc = subprocess.Popen(
        cli.command(config_path, "fsck-storage"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=tty,
        env=env,
        cwd=config_path.parent,
    )
    os.close(tty)
    terminal = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the process closed its end
                return
            if not data:
                return
            terminal.extend(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=120)
        reader.join(10)
    finally:
        os.close(main)
    assert proc.returncode == 0, (stdout, bytes(terminal))
    assert b"consistent" in stdout
    shown = terminal.decode(errors="replace")
    assert "\x1b[" in shown
    assert "live-bodies" in shown
    assert "items" in shown
    assert not re.search(r"^[a-z-]+: \d+ checked", shown.replace("\r", "\n"), re.MULTILINE)


def test_cli_dry_run_reports_repair_fixes_and_the_next_run_is_clean(
    config_path: Path, cli_rows: Rows, local: Resources, rds: redis.Redis, key_prefix: str
) -> None:
    """A missing body: the dry run exits 1 changing nothing, --repair exits 1 having fixed
    it, and the following run exits 0."""
    msg = cli_rows.add("queued", body=False)
    cli_rows.entry(rds, key_prefix, msg)
    dry = exited(run_cli(config_path), 1)
    assert "1 problems found (dry run: nothing changed" in dry.stdout
    assert msg.id in dry.stdout
    assert cli_rows.status(msg.id) == "queued"
    assert dead_letters(rds, key_prefix) == []

    fixed = exited(run_cli(config_path, "--repair"), 1)
    assert "1 problems found, 1 repaired" in fixed.stdout
    assert cli_rows.status(msg.id) == "storage_error"
    assert [d["id"] for d in dead_letters(rds, key_prefix)] == [msg.id]

    assert "consistent" in exited(run_cli(config_path), 0).stdout


def test_cli_json_report_and_quarantine(
    config_path: Path, cli_rows: Rows, local: Resources, rds: redis.Redis, key_prefix: str
) -> None:
    """--json prints the parsed report (no progress lines); --repair --quarantine moves the
    orphan under quarantine/ and re-enqueues the lost message; then it is consistent."""
    orphan_key = key_for(new_message_id())
    local.store.put(orphan_key, b"orphan")
    then = time.time() - OLD
    os.utime(local.cfg.storage_path / orphan_key, (then, then))
    lost = cli_rows.add("queued", updated_ago=OLD)

    dry = exited(run_cli(config_path, "--json"), 1)
    report = json.loads(dry.stdout)
    assert (report["consistent"], report["repair"]) == (False, False)
    assert (report["problems"], report["repaired"]) == (2, 0)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ALL_CHECKS
    assert checks["orphan-bodies"] == {
        "name": "orphan-bodies",
        "checked": 2,
        "problems": 1,
        "repaired": 0,
        "examples": [orphan_key],
    }
    assert checks["stream"]["examples"] == [lost.id]
    assert progress_lines(dry) == []
    assert dry.stderr == ""

    fixed = json.loads(exited(run_cli(config_path, "--repair", "--quarantine", "--json"), 1).stdout)
    assert (fixed["consistent"], fixed["problems"], fixed["repaired"]) == (False, 2, 2)
    assert not local.store.exists(orphan_key)
    assert (local.cfg.storage_path / "quarantine" / orphan_key).read_bytes() == b"orphan"
    assert stream_ids(rds, key_prefix) == [lost.id]

    clean_run = json.loads(exited(run_cli(config_path, "--verify", "--json"), 0).stdout)
    assert (clean_run["consistent"], clean_run["problems"]) == (True, 0)
    assert [c["name"] for c in clean_run["checks"]] == [*ALL_CHECKS[:4], "verify", "retention"]


def test_cli_grace_option(config_path: Path, local: Resources) -> None:
    """--grace replaces storage.orphan_grace: a 10-minute-old orphan is only one under 5m;
    a malformed duration is a config error (exit 2)."""
    orphan_key = key_for(new_message_id())
    local.store.put(orphan_key, b"orphan")
    then = time.time() - 10 * MINUTE
    os.utime(local.cfg.storage_path / orphan_key, (then, then))
    assert json.loads(exited(run_cli(config_path, "--json"), 0).stdout)["consistent"]
    report = json.loads(exited(run_cli(config_path, "--grace", "5m", "--json"), 1).stdout)
    assert report["checks"][1]["examples"] == [orphan_key]
    bad = exited(run_cli(config_path, "--grace", "soon"), 2)
    assert bad.stderr.startswith("config error: --grace")
    assert local.store.exists(orphan_key)


def test_cli_database_unreachable_exits_2_with_one_error_line(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """PostgreSQL not listening: exit 2, one 'error:' line on stderr, nothing else."""
    raw = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": "postgresql://postgres@127.0.0.1:1/postgres", "connect_timeout": "1s"},
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "security": {"secret_key": Fernet.generate_key().decode()},
    }
    config = write_config(tmp_path / "down.toml", raw)
    started = time.monotonic()
    result = exited(run_cli(config), 2)
    assert time.monotonic() - started < 30
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines


def test_cli_exits_2_while_another_check_holds_the_lock(
    config_path: Path, pg_url: str, cli_rows: Rows
) -> None:
    """Another checker running: exit 2 with one 'error:' line, and nothing repaired."""
    msg = cli_rows.add("queued", body=False)
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s::bigint)", (fsck._LOCK_KEY,))
        result = exited(run_cli(config_path, "--repair"), 2)
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["error: another storage check is running"]
    assert cli_rows.status(msg.id) == "queued"
