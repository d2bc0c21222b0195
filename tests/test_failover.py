"""A failing provider must not take mail down: fallbacks, circuit breaker, concurrency
limits and partial deliveries, through a running service against local fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import trio
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.config.crypto import SecretBox
from smtpproxy.delivery.breaker import Breaker, Throttle, next_limit
from smtpproxy.runtime.service import Running
from tests.conftest import make_config
from tests.support import serving, smtp
from tests.support.fake_sendgrid import FakeSendGrid
from tests.support.fake_smtp import FakeSmtp, silent_server
from tests.support.serving import add_file_provider, wait_status

run = trio.to_thread.run_sync


# -- pure parts -----------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_probes_after_cooldown() -> None:
    """Closed until N consecutive failures; open for the cooldown; then exactly one probe."""
    b = Breaker(threshold=3, cooldown=10)
    for t in range(2):
        assert b.allow(t)
        b.record(False, t)
    assert b.state == "closed"
    b.record(False, 2)
    assert b.state == "open" and not b.allow(5) and b.retry_in(5) == 7
    assert b.allow(12) and b.state == "half-open"
    assert not b.allow(12.5)  # one probe at a time
    b.record(False, 13)  # the probe failed: open again, a fresh cooldown
    assert b.state == "open" and not b.allow(20) and b.allow(23)
    b.record(True, 23)
    assert b.state == "closed" and b.failures == 0 and b.allow(23)


def test_a_success_resets_the_failure_count() -> None:
    """Failures must be consecutive to open the circuit."""
    b = Breaker(threshold=2, cooldown=10)
    b.record(False, 0)
    b.record(True, 1)
    b.record(False, 2)
    assert b.state == "closed"


def test_aimd_limit() -> None:
    """A transient failure halves the limit (not below 1); a success adds 1/limit (capped)."""
    assert next_limit(16, False, 16) == 8
    assert next_limit(1, False, 16) == 1
    assert next_limit(4, True, 16) == 4.25
    assert next_limit(16, True, 16) == 16


async def test_throttle_waits_a_bounded_time() -> None:
    """A full throttle makes acquire wait, and give up after its timeout."""
    t = Throttle(ceiling=1)
    with trio.fail_after(5):
        assert await t.acquire(1)
        assert not await t.acquire(0.1)
        t.release(True)
        assert await t.acquire(0.1)
        t.release(False)
    assert t.limit == 1  # halved from 1 stays 1


# -- through a running service ----------------------------------------------------------


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, prefix: str, **delivery: Any
) -> tuple[Running, trio.Event]:
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        prefix,
        delivery={"retry_schedule": ["200ms"], "scheduler_interval": "50ms", **delivery},
        security={"secret_key": KEY},
    )
    return await serving.start(nursery, cfg)


KEY = Fernet.generate_key().decode()


def add_sendgrid(conn: psycopg.Connection[Any], name: str, url: str, **settings: Any) -> None:
    admin.add_provider(
        conn,
        "acme",
        name,
        "sendgrid",
        endpoint=url,
        settings=settings,
        secret="SG.k",
        encrypt=SecretBox(KEY.encode()).encrypt,
    )


def route(conn: psycopg.Connection[Any], provider: str, *fallbacks: str) -> None:
    admin.add_route(
        conn,
        "acme",
        provider,
        priority=None,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
        fallbacks=fallbacks,
    )


async def send(
    running: Running, password: str, rcpts: tuple[str, ...] = ("bob@example.org",)
) -> str:
    code, reply = await run(
        lambda: smtp.send(
            running.smtp[0][1], "app", password, smtp.message(to=", ".join(rcpts)), rcpt_to=rcpts
        )
    )
    assert code == 250
    return smtp.queued_id(reply)


def logs(pg_url: str, mid: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(pg_url) as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT provider_name, status, error_message FROM delivery_logs"
                " WHERE message_id = %s ORDER BY id",
                (mid,),
            )
        ]


async def test_transient_failure_fails_over_to_the_fallback(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """A 503 from the primary sends the message through the fallback, and the log says so."""
    with FakeSendGrid(api_key="SG.k") as fake:
        fake.respond_with(503, {"errors": [{"message": "down for maintenance"}]})
        add_sendgrid(conn, "primary", fake.url)
        add_file_provider(conn, "backup", tmp_path / "backup")
        route(conn, "primary", "backup")
        running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
        mid = await send(running, account["password"])
        msg = await wait_status(pg_url, mid, "delivered")
        stop.set()
    assert msg["provider_name"] == "backup"
    assert (tmp_path / "backup" / f"{mid}.eml").exists()
    [(p1, s1, e1), (p2, s2, e2)] = logs(pg_url, mid)
    assert (p1, s1) == ("primary", "failover") and "503" in e1
    assert (p2, s2) == ("backup", "delivered")
    assert e2.startswith("via backup after primary: HTTP 503")


async def test_transient_failure_with_no_usable_fallback_is_retried_not_failed(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """A 503 from the primary while the fallback is disabled is still a transient
    failure: the message is retried (and delivered by the primary once it recovers)."""
    with FakeSendGrid(api_key="SG.k") as fake:
        fake.respond_with(503, {"errors": [{"message": "down for maintenance"}]})
        add_sendgrid(conn, "primary", fake.url)
        add_file_provider(conn, "backup", tmp_path / "backup")
        admin.set_provider_enabled(conn, "acme", "backup", False)
        route(conn, "primary", "backup")
        running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
        mid = await send(running, account["password"])
        msg = await wait_status(pg_url, mid, "delivered", "failed")
        stop.set()
    assert msg["status"] == "delivered" and msg["provider_name"] == "primary"
    [(p1, s1, e1), (p2, s2, e2), (p3, s3, _)] = logs(pg_url, mid)
    assert (p1, s1) == ("primary", "failover") and "503" in e1
    assert (p2, s2) == ("primary", "retrying") and "backup: disabled" in e2
    assert (p3, s3) == ("primary", "delivered")
    assert len(fake.requests) == 2


async def test_open_circuit_skips_the_provider(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """After `breaker_threshold` failures the provider is not called at all during the
    cooldown: mail goes straight to the fallback; without one it waits (retrying)."""
    with FakeSendGrid(api_key="SG.k") as fake:
        for _ in range(50):
            fake.respond_with(503)
        add_sendgrid(conn, "primary", fake.url)
        add_file_provider(conn, "backup", tmp_path / "backup")
        route(conn, "primary", "backup")
        running, stop = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_url,
            key_prefix,
            breaker_threshold=2,
            breaker_cooldown="1h",
        )
        first = [await send(running, account["password"]) for _ in range(2)]
        for mid in first:
            await wait_status(pg_url, mid, "delivered")
        calls = len(fake.requests)
        later = await send(running, account["password"])
        msg = await wait_status(pg_url, later, "delivered")
        stop.set()
    assert calls == 2
    assert len(fake.requests) == 2  # the open circuit kept the third message away
    assert msg["provider_name"] == "backup"
    assert logs(pg_url, later) == [
        ("backup", "delivered", "via backup after primary: circuit open")
    ]


async def test_saturated_provider_does_not_stall_others(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """Deliveries stuck on a provider that never answers hold at most its own connection
    slots; mail for another provider still goes out at once."""
    with silent_server() as port:
        add_sendgrid(conn, "stuck", f"http://127.0.0.1:{port}", max_connections=1, timeout=30)
        add_file_provider(conn, "fine", tmp_path / "fine")
        admin.add_route(
            conn,
            "acme",
            "stuck",
            priority=10,
            sender_domain=None,
            recipient_domain="stuck.example",
            account_name=None,
        )
        route(conn, "fine")
        running, stop = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_url,
            key_prefix,
            concurrency=4,
            provider_wait="300ms",
        )
        for i in range(6):
            await send(running, account["password"], (f"u{i}@stuck.example",))
        await trio.sleep(1)  # all consumer slots would be taken by now without the limit
        mid = await send(running, account["password"], ("bob@example.org",))
        msg = await wait_status(pg_url, mid, "delivered", timeout=10)
        stop.set()
    assert msg["provider_name"] == "fine"


async def test_deferred_recipients_are_retried_on_their_own(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """When a smarthost defers one recipient (450) the others are delivered once, and the
    deferred one gets a child message that is retried until it goes through."""
    with FakeSmtp(tmp_path / "smarthost") as upstream:
        upstream.script.rcpt_replies["late@example.org"] = "450 4.2.1 mailbox busy"
        admin.add_provider(
            conn,
            "acme",
            "relay",
            "smtp",
            endpoint=None,
            settings={"host": "127.0.0.1", "port": upstream.port, "verify_tls": False},
            secret=None,
            encrypt=None,
        )
        route(conn, "relay")
        running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
        mid = await send(running, account["password"], ("bob@example.org", "late@example.org"))
        parent = await wait_status(pg_url, mid, "delivered")
        child = await wait_status(pg_url, f"{mid}.r1", "retrying", "queued", "sending")
        upstream.script.rcpt_replies.clear()
        child = await wait_status(pg_url, f"{mid}.r1", "delivered")
        stop.set()
    assert child["rcpt_to"] == ["late@example.org"]
    assert [r.rcpt_tos for r in upstream.received] == [["bob@example.org"], ["late@example.org"]]
    assert "deferred: late@example.org" in logs(pg_url, mid)[0][2]
    assert parent["provider_name"] == "relay"
