"""Delivery through a running service: routing, splitting, retries, dead letters, records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import psycopg
import redis
import trio

from smtpproxy import admin
from smtpproxy.config import Config
from smtpproxy.ops import fsck
from smtpproxy.queue.liveness import ConsumerRegistry
from smtpproxy.runtime.resources import open_resources
from smtpproxy.runtime.service import Running
from smtpproxy.store import key_for
from tests.conftest import ConfigFactory
from tests.support import smtp
from tests.support.serving import add_file_provider, message_row, start, wait_status

run = trio.to_thread.run_sync


async def send(
    running: Running, password: str, rcpts: tuple[str, ...] = ("bob@example.org",)
) -> tuple[str, bytes]:
    data = smtp.message(to=", ".join(rcpts))
    code, reply = await run(
        lambda: smtp.send(running.smtp[0][1], "app", password, data, rcpt_to=rcpts)
    )
    assert code == 250, reply
    return smtp.queued_id(reply), data


def stream_entries(redis_url: str, key: str) -> list[tuple[str, dict[str, str]]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return list(client.xrange(key))
    finally:
        client.close()


async def dead_letters(redis_url: str, key_prefix: str) -> list[tuple[str, dict[str, str]]]:
    """The dead-letter stream once it has an entry: the recorder writes it after the
    outcome is committed in PostgreSQL, so it may follow the status by a moment."""
    with trio.fail_after(10):
        while not (dead := stream_entries(redis_url, f"{key_prefix}:dlq")):
            await trio.sleep(0.02)
    return dead


def logs(pg_url: str, mid: str) -> list[dict[str, Any]]:
    with psycopg.connect(pg_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT * FROM delivery_logs WHERE message_id = %s ORDER BY id", (mid,)
        ).fetchall()


async def test_default_route_delivers_exact_bytes(
    config_factory: ConfigFactory,
    account: dict[str, Any],
    pg_url: str,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """The file provider gets byte-for-byte what the client sent; a delivered log row is written."""
    cfg = config_factory(delivery={"default_route": "outbox"})
    running, stop = await start(nursery, cfg)
    mid, data = await send(running, account["password"])
    row = await wait_status(pg_url, mid, "delivered")
    stop.set()
    assert (tmp_path / "outbox" / f"{mid}.eml").read_bytes() == data
    envelope = json.loads((tmp_path / "outbox" / f"{mid}.json").read_text())
    assert envelope["mail_from"] == "alice@example.com"
    assert envelope["rcpt_to"] == ["bob@example.org"]
    assert row["provider_name"] == "outbox" and row["attempts"] == 1
    assert row["device"] is None  # it logged in
    [entry] = logs(pg_url, mid)
    assert entry["status"] == "delivered"
    assert entry["provider_name"] == "outbox"
    assert entry["attempt_number"] == 1
    assert entry["account_id"] == account["id"]


async def test_no_route_is_a_recorded_failure(
    cfg: Config, account: dict[str, Any], pg_url: str, nursery: trio.Nursery
) -> None:
    """Without a matching rule or default route the message fails, with the reason logged."""
    running, stop = await start(nursery, cfg)
    mid, _ = await send(running, account["password"])
    row = await wait_status(pg_url, mid, "failed")
    stop.set()
    assert "no routing rule" in row["last_error"]
    [entry] = logs(pg_url, mid)
    assert entry["status"] == "failed" and "no routing rule" in entry["error_message"]


async def test_recipients_on_different_routes_are_split(
    cfg: Config,
    account: dict[str, Any],
    pg_url: str,
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Recipients routed to two providers become two child messages, each delivered once."""
    for name in ("north", "south"):
        add_file_provider(conn, name, tmp_path / name)
    admin.add_route(
        conn,
        "acme",
        "north",
        priority=10,
        sender_domain=None,
        recipient_domain="north.example",
        account_name=None,
    )
    admin.add_route(
        conn,
        "acme",
        "south",
        priority=20,
        sender_domain=None,
        recipient_domain="*.south.example",
        account_name=None,
    )
    running, stop = await start(nursery, cfg)
    mid, data = await send(
        running, account["password"], ("a@north.example", "b@x.south.example", "c@north.example")
    )
    await wait_status(pg_url, mid, "split")
    north = await wait_status(pg_url, f"{mid}.1", "delivered")
    south = await wait_status(pg_url, f"{mid}.2", "delivered")
    stop.set()
    assert north["rcpt_to"] == ["a@north.example", "c@north.example"]
    assert south["rcpt_to"] == ["b@x.south.example"]
    assert (tmp_path / "north" / f"{mid}.1.eml").read_bytes() == data
    assert (tmp_path / "south" / f"{mid}.2.eml").read_bytes() == data
    assert not list((tmp_path / "south").glob(f"{mid}.1.*"))


async def test_transient_failure_retries_durably_then_delivers(
    account: dict[str, Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    config_factory: ConfigFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """A failed attempt sets retrying with next_attempt_at; the scheduler re-enqueues it."""
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the directory should be")
    cfg = config_factory(
        delivery={
            "default_route": "outbox",
            "retry_schedule": ["300ms"],
            "scheduler_interval": "50ms",
        },
    )
    running, stop = await start(nursery, cfg)
    mid, data = await send(running, account["password"])
    row = await wait_status(pg_url, mid, "retrying")
    assert row["next_attempt_at"] is not None
    blocker.unlink()
    row = await wait_status(pg_url, mid, "delivered")
    stop.set()
    attempts = logs(pg_url, mid)
    assert attempts[0]["status"] == "retrying"
    assert attempts[-1]["status"] == "delivered"
    assert row["attempts"] == len(attempts) >= 2
    assert (tmp_path / "outbox" / f"{mid}.eml").read_bytes() == data


async def test_exhausted_retries_are_dead_lettered(
    account: dict[str, Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    config_factory: ConfigFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """After max_attempts the message is dlq, with a log row and a dead-letter stream entry."""
    (tmp_path / "outbox").write_text("never a directory")
    cfg = config_factory(
        delivery={
            "default_route": "outbox",
            "retry_schedule": ["50ms"],
            "max_attempts": 2,
            "scheduler_interval": "50ms",
        },
    )
    running, stop = await start(nursery, cfg)
    mid, _ = await send(running, account["password"])
    row = await wait_status(pg_url, mid, "dlq")
    stop.set()
    assert row["attempts"] == 2
    assert [a["status"] for a in logs(pg_url, mid)] == ["retrying", "dlq"]
    dead = await dead_letters(redis_url, key_prefix)
    assert [fields["id"] for _, fields in dead] == [mid]
    assert dead[0][1]["attempts"] == "2"


def insert_queued(pg_url: str, account: dict[str, Any], mid: str, storage_key: str) -> None:
    """A queued row as ingress would write it, without a body in the store."""
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO messages (id, tenant_id, account_id, mail_from, rcpt_to, size, sha256,"
            " storage_key, status) SELECT %s, tenant_id, id, 'alice@example.com',"
            " ARRAY['bob@example.org'], 10, 'x', %s, 'queued' FROM accounts WHERE id = %s",
            (mid, storage_key, account["id"]),
        )


def xadd(redis_url: str, key_prefix: str, mid: str, account: dict[str, Any]) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd(
        f"{key_prefix}:deliver", {"id": mid, "account_id": str(account["id"]), "tenant_id": "1"}
    )
    client.close()


async def test_missing_body_is_storage_error(
    account: dict[str, Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    config_factory: ConfigFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """A queued message whose body is gone ends as storage_error and is dead-lettered."""
    cfg = config_factory(
        delivery={"default_route": "outbox", "body_read_retries": ["10ms", "10ms"]},
    )
    insert_queued(
        pg_url, account, "01TESTNOBODY000000000000AA", "aa/aa/01TESTNOBODY000000000000AA.eml"
    )
    xadd(redis_url, key_prefix, "01TESTNOBODY000000000000AA", account)
    _, stop = await start(nursery, cfg)
    row = await wait_status(pg_url, "01TESTNOBODY000000000000AA", "storage_error")
    stop.set()
    assert "body missing" in row["last_error"]
    [entry] = logs(pg_url, "01TESTNOBODY000000000000AA")
    assert entry["status"] == "storage_error"
    dead = await dead_letters(redis_url, key_prefix)
    assert [f["id"] for _, f in dead] == ["01TESTNOBODY000000000000AA"]
    assert not (tmp_path / "outbox").exists()


async def test_entry_without_row_is_acknowledged(
    cfg: Config, account: dict[str, Any], redis_url: str, key_prefix: str, nursery: trio.Nursery
) -> None:
    """A stream entry naming no message is logged and removed, not retried forever."""
    xadd(redis_url, key_prefix, "01NOSUCHMESSAGE00000000000", account)
    _, stop = await start(nursery, cfg)
    client = redis.Redis.from_url(redis_url)
    with trio.fail_after(10):
        while client.xlen(f"{key_prefix}:deliver"):
            await trio.sleep(0.05)
    pending = client.xpending(f"{key_prefix}:deliver", "delivery")
    client.close()
    stop.set()
    assert pending["pending"] == 0


async def test_reconciler_rebuilds_lost_stream_entries(
    cfg: Config, account: dict[str, Any], pg_url: str, redis_url: str, key_prefix: str
) -> None:
    """A queued row with no stream entry (Redis lost it) is re-enqueued from PostgreSQL."""
    insert_queued(pg_url, account, "01LOSTENTRY000000000000000", "x/y/z.eml")
    insert_queued(pg_url, account, "01ONSTREAM0000000000000000", "x/y/w.eml")
    xadd(redis_url, key_prefix, "01ONSTREAM0000000000000000", account)
    res = open_resources(cfg)
    try:
        opts = fsck.Options(repair=True, grace=0.0)
        result = await run(fsck.Checker(res, opts).reconcile_stream)
    finally:
        res.close()
    assert (result.problems, result.repaired) == (1, 1)
    ids = sorted(
        f["id"]
        for key in (f"{key_prefix}:deliver", f"{key_prefix}:deliver:{account['tenant_id']}")
        for _, f in stream_entries(redis_url, key)
    )
    assert ids == ["01LOSTENTRY000000000000000", "01ONSTREAM0000000000000000"]


async def test_a_live_consumers_claim_is_not_taken_over(
    account: dict[str, Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    config_factory: ConfigFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """A message left in `sending` long past the visibility timeout is not claimed and
    sent again while the consumer holding it still beats in the liveness registry (it may
    be waiting for PostgreSQL to record the outcome); once that consumer has left, the
    message is taken over and delivered once."""
    cfg = config_factory(
        delivery={
            "default_route": "outbox",
            "visibility_timeout": "1s",
            "reconcile_interval": "200ms",
            "reconcile_grace": "1s",
        },
    )
    mid, owner = "01HELDELSEWHERE00000000000", "elsewhere-1-abcdef-0"
    body = smtp.message()
    res = open_resources(cfg)
    try:
        res.store.put(key_for(mid), body)
    finally:
        res.close()
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO messages (id, tenant_id, account_id, mail_from, rcpt_to, size, sha256,"
            " storage_key, status, attempts, claimed_by, claimed_at)"
            " SELECT %s, tenant_id, id, 'alice@example.com', ARRAY['bob@example.org'], %s, %s,"
            " %s, 'sending', 1, %s, now() - interval '1 hour' FROM accounts WHERE id = %s",
            (mid, len(body), hashlib.sha256(body).hexdigest(), key_for(mid), owner, account["id"]),
        )
    client = redis.Redis.from_url(redis_url)
    registry = ConsumerRegistry(client, key_prefix)
    registry.beat(owner, lifetime=600)
    client.set(registry.since_key, "1")  # the registry has been up for a long time
    xadd(redis_url, key_prefix, mid, account)
    _, stop = await start(nursery, cfg)
    await trio.sleep(3)  # read, reclaimed, re-enqueued by the reconciler: many chances
    held = message_row(pg_url, mid)
    assert held is not None
    assert (held["status"], held["claimed_by"]) == ("sending", owner)
    assert not (tmp_path / "outbox" / f"{mid}.eml").exists()
    registry.leave(owner)
    client.close()
    row = await wait_status(pg_url, mid, "delivered")
    stop.set()
    assert (tmp_path / "outbox" / f"{mid}.eml").read_bytes() == body
    assert row["attempts"] == 2
    assert [e["status"] for e in logs(pg_url, mid)] == ["delivered"]
