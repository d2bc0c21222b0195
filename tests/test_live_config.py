"""A running instance follows administrative changes within about a second (LISTEN/NOTIFY),
and refuses at SMTP time what the routed provider could never take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import trio

from smtpproxy import admin
from tests.conftest import Service, make_config
from tests.support import serving, smtp
from tests.support.serving import add_file_provider, wait_status

run = trio.to_thread.run_sync


async def delivered_by(pg_url: str, mid: str, timeout: float = 15) -> str:
    """The message's "status:provider" once it is delivered or failed."""
    row = await wait_status(pg_url, mid, "delivered", "failed", timeout=timeout)
    return f"{row['status']}:{row['provider_name']}"


async def test_a_new_route_applies_without_restart(
    service: Service,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    pg_url: str,
    tmp_path: Path,
) -> None:
    """Mail fails for lack of a route; a route added (and NOTIFYed) afterwards carries the
    next message, without restarting the instance."""
    data = smtp.message()
    with trio.fail_after(30):
        _, reply = await run(lambda: smtp.send(service.smtp_port, "app", account["password"], data))
        assert await delivered_by(pg_url, smtp.queued_id(reply)) == "failed:None"
        add_file_provider(conn, "live", tmp_path / "live")
        admin.add_route(
            conn,
            "acme",
            "live",
            priority=None,
            sender_domain=None,
            recipient_domain=None,
            account_name=None,
        )
        started = trio.current_time()
        with serving.log_records() as reloaded:  # "within about a second" (more under load)
            await serving.changed_and_reloaded(
                reloaded, lambda: conn.execute("NOTIFY smtpproxy_config, 'route'"), "route"
            )
        _, reply = await run(
            lambda: smtp.send(service.smtp_port, "app", account["password"], smtp.message())
        )
        assert await delivered_by(pg_url, smtp.queued_id(reply)) == "delivered:live"
    assert trio.current_time() - started < 10


async def test_too_big_for_the_routed_provider_is_refused_at_smtp_time(
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    """A message over the routed provider's size limit gets 552 5.3.4 (at RCPT when SIZE=
    was declared, else after DATA) and is not stored; mail for other routes is fine."""
    from smtpproxy.runtime.service import serve

    add_file_provider(conn, "small", tmp_path / "small", max_message_bytes=2000)
    add_file_provider(conn, "big", tmp_path / "big")
    admin.add_route(
        conn,
        "acme",
        "small",
        priority=10,
        sender_domain=None,
        recipient_domain="small.example",
        account_name=None,
    )
    admin.add_route(
        conn,
        "acme",
        "big",
        priority=20,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )
    cfg = make_config(tmp_path, pg_url, redis_url, key_prefix)
    stop = trio.Event()
    with trio.fail_after(60):
        running = await nursery.start(serve, cfg, stop)
    port = running.smtp[0][1]
    big = smtp.message(to="x@small.example", body="y" * 3000 + "\n")

    def declared() -> tuple[int, bytes]:
        with smtp.connect(port) as c:
            smtp.login(c, "app", account["password"])
            c.mail("alice@example.com", [f"SIZE={len(big)}"])
            return c.rcpt("x@small.example")

    def undeclared(rcpt: str) -> tuple[int, bytes]:
        with smtp.connect(port) as c:
            smtp.login(c, "app", account["password"])
            c.mail("alice@example.com")
            c.rcpt(rcpt)
            return c.data(big)

    with trio.fail_after(30):
        at_rcpt = await run(declared)
        at_data = await run(lambda: undeclared("x@small.example"))
        elsewhere = await run(lambda: undeclared("x@other.example"))
    stop.set()
    assert at_rcpt[0] == 552 and at_rcpt[1].startswith(b"5.3.4") and b"small" in at_rcpt[1]
    assert at_data[0] == 552 and at_data[1].startswith(b"5.3.4")
    assert elsewhere[0] == 250
    with psycopg.connect(pg_url) as c2:
        assert c2.execute("SELECT count(*) FROM messages").fetchone() == (1,)
