"""Dead letters (`smtpproxy dlq`) and legacy stream entries, against a running service."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import trio

from smtpproxy import admin
from smtpproxy.delivery.records import Claimed
from smtpproxy.delivery.retry import RetryPolicy, decide
from smtpproxy.models import Outcome, Status
from smtpproxy.runtime.service import Running
from tests.conftest import make_config
from tests.support import serving, smtp
from tests.support.cli import as_json, fails, run_cli
from tests.support.process import write_config
from tests.support.serving import add_file_provider, wait_status

run = trio.to_thread.run_sync


@pytest.fixture
def config_file(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None) -> Path:
    return write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": key_prefix},
        },
    )


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, prefix: str, **delivery: Any
) -> tuple[Running, trio.Event]:
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        prefix,
        delivery={"retry_schedule": ["50ms"], "scheduler_interval": "50ms", **delivery},
        redis={"url": redis_url, "key_prefix": prefix, "legacy_account": "app"},
    )
    return await serving.start(nursery, cfg)


async def dead_letters(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
    n: int = 2,
) -> tuple[list[str], trio.Event]:
    """n messages routed to a broken file provider, dead-lettered after 2 attempts (their
    rows and their dead-letter stream entries)."""
    (tmp_path / "broken").write_text("a file, not a directory")
    add_file_provider(conn, "broken", tmp_path / "broken")
    add_file_provider(conn, "backup", tmp_path / "backup")
    admin.add_route(
        conn,
        "acme",
        "broken",
        priority=None,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix, max_attempts=2)
    ids = []
    for _ in range(n):
        code, reply = await run(
            lambda: smtp.send(running.smtp[0][1], "app", account["password"], smtp.message())
        )
        assert code == 250
        ids.append(smtp.queued_id(reply))
    for mid in ids:
        await wait_status(pg_url, mid, "dlq")
    # the recorder adds the dead-letter stream entries after committing the status
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with trio.fail_after(10):
            while not set(ids) <= {f["id"] for _, f in client.xrange(f"{key_prefix}:dlq")}:
                await trio.sleep(0.05)
    finally:
        client.close()
    return ids, stop


async def test_list_retry_through_another_provider_and_audit(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
    config_file: Path,
) -> None:
    """dlq list shows the dead letters; dlq retry --to-provider sends them through the
    other provider with a fresh attempt count, and the audit trail says who did it."""
    ids, stop = await dead_letters(tmp_path, pg_url, redis_url, key_prefix, account, conn, nursery)
    listed = await run(
        lambda: as_json(run_cli(config_file, "dlq", "list", "--json", "--reason", "cannot write"))
    )
    assert sorted(r["id"] for r in listed) == sorted(ids)
    assert {r["status"] for r in listed} == {"dlq"} and {r["attempts"] for r in listed} == {2}

    preview = await run(
        lambda: as_json(run_cli(config_file, "dlq", "retry", *ids, "--dry-run", "--json"))
    )
    assert preview["dry_run"] and sorted(preview["ids"]) == sorted(ids)
    assert (await wait_status(pg_url, ids[0], "dlq"))["status"] == "dlq"  # unchanged

    done = await run(
        lambda: as_json(
            run_cli(
                config_file,
                "dlq",
                "retry",
                "--tenant",
                "acme",
                "--to-provider",
                "backup",
                "--yes",
                "--json",
            )
        )
    )
    assert sorted(done["ids"]) == sorted(ids)
    for mid in ids:
        row = await wait_status(pg_url, mid, "delivered")
        assert row["provider_name"] == "backup" and row["attempts"] == 1
        assert row["replayed_at"] is not None  # delivery.max_age counts from here now
        assert (tmp_path / "backup" / f"{mid}.eml").exists()
    stop.set()
    with psycopg.connect(pg_url) as c:
        audit = c.execute(
            "SELECT action, after FROM audit_log WHERE action LIKE 'dlq.%' ORDER BY id"
        ).fetchall()
    assert audit[0][0] == "dlq.retry"
    assert sorted(audit[0][1]["ids"]) == sorted(ids) and audit[0][1]["to_provider"] == "backup"


async def test_purge_removes_rows_bodies_and_dead_letter_entries(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
    config_file: Path,
) -> None:
    """dlq purge deletes the messages, their bodies and their dead-letter stream entries."""
    ids, stop = await dead_letters(tmp_path, pg_url, redis_url, key_prefix, account, conn, nursery)
    stop.set()
    keep, gone = ids
    unconfirmed = await run(lambda: run_cli(config_file, "dlq", "purge", gone))
    fails(unconfirmed, "refusing to purge 1 messages without confirmation", "--yes")
    result = await run(
        lambda: as_json(run_cli(config_file, "dlq", "purge", gone, "--yes", "--json"))
    )
    assert result["ids"] == [gone]
    with psycopg.connect(pg_url) as c:
        left = [r[0] for r in c.execute("SELECT id FROM messages")]
        keys = dict(c.execute("SELECT id, storage_key FROM messages").fetchall())
    assert left == [keep]
    bodies = {p.name for p in (tmp_path / "data" / "messages").rglob("*.eml")}
    assert bodies == {Path(keys[keep]).name}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    dead = [f["id"] for _, f in client.xrange(f"{key_prefix}:dlq")]
    client.close()
    assert dead == [keep]


async def test_refusals(config_file: Path) -> None:
    """retry/purge need ids or a filter, refuse unknown ids, and want --yes off a terminal."""
    with trio.fail_after(60):
        fails(await run(lambda: run_cli(config_file, "dlq", "retry")), "filter")
        fails(
            await run(lambda: run_cli(config_file, "dlq", "retry", "01NOSUCH")), "not dead letters"
        )
        fails(await run(lambda: run_cli(config_file, "dlq", "purge")), "filter")
        fails(
            await run(lambda: run_cli(config_file, "dlq", "purge", "01NOSUCH", "--yes")),
            "not dead letters",
        )
        fails(await run(lambda: run_cli(config_file, "dlq", "list", "--tenant", "nope")), "nope")


def xadd_legacy(redis_url: str, key_prefix: str, fields: dict[str, str]) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd(f"{key_prefix}:deliver", fields)
    client.close()


def statuses(pg_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as c:
        return c.execute("SELECT rcpt_to, status FROM messages ORDER BY subject").fetchall()


async def test_legacy_entries_are_delivered(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """Entries in the original format (from, to, subject, body in base64) are delivered:
    a whole message byte for byte, a bare text with headers added; a malformed one is
    dead-lettered instead of blocking the stream."""
    whole = smtp.message(subject="legacy whole")
    xadd_legacy(
        redis_url,
        key_prefix,
        {
            "from": "alice@example.com",
            "to": '["bob@example.org"]',
            "subject": "legacy whole",
            "body": base64.b64encode(whole).decode(),
            "account_id": str(account["id"]),
        },
    )
    xadd_legacy(
        redis_url,
        key_prefix,
        {
            "from": "alice@example.com",
            "to": "carol@example.org, dave@example.org",
            "subject": "just text",
            "body": base64.b64encode(b"hello from the old system\n").decode(),
        },
    )
    xadd_legacy(
        redis_url, key_prefix, {"from": "a@example.com", "to": "b@example.org", "body": "%%%"}
    )
    _, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix, default_route="outbox")
    delivered = [
        (["carol@example.org", "dave@example.org"], "delivered"),
        (["bob@example.org"], "delivered"),
    ]
    with trio.fail_after(20):  # the outcome is recorded after the file is written
        while statuses(pg_url) != delivered:
            await trio.sleep(0.05)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        while not client.xlen(f"{key_prefix}:dlq"):
            await trio.sleep(0.05)
        dead = client.xrange(f"{key_prefix}:dlq")
        client.close()
    stop.set()
    emls = {p.read_bytes() for p in (tmp_path / "outbox").glob("*.eml")}
    assert whole in emls
    [text] = [b for b in emls if b != whole]
    assert b"Subject: just text" in text and b"hello from the old system" in text
    assert "body" in dead[0][1]["reason"]


def test_a_replayed_message_ages_from_its_replay() -> None:
    """delivery.max_age counts from replayed_at: a month-old dead letter replayed a
    minute ago is a minute old to the retry policy, so one transient failure retries it
    instead of dead-lettering it again."""
    now = datetime.now(UTC)
    fields = {
        "id": "01J0",
        "tenant_id": 1,
        "account_id": 1,
        "mail_from": "a@example.com",
        "rcpt_to": ["b@example.org"],
        "storage_key": "k",
        "attempts": 1,
        "created_at": now - timedelta(days=30),
    }
    fresh = Claimed.from_row({**fields, "age_from": now - timedelta(minutes=1)})
    old = Claimed.from_row({**fields, "age_from": fields["created_at"]})
    policy = RetryPolicy(schedule=(30.0,), max_attempts=5, max_age=86400.0)
    assert 55 < fresh.age() < 65
    assert decide(Outcome.retry("HTTP 503"), 1, fresh.age(), policy).status is Status.RETRYING
    assert decide(Outcome.retry("HTTP 503"), 1, old.age(), policy).status is Status.DLQ
