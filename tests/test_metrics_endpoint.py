"""GET /metrics on a running service: what happened to real mail shows in the numbers."""

from __future__ import annotations

import smtplib
import urllib.request
from pathlib import Path
from typing import Any

import trio

from smtpproxy.config import Config
from smtpproxy.runtime.service import Running, serve
from tests.conftest import make_config
from tests.support import smtp
from tests.support.serving import wait_status
from tests.test_metrics import parse

run = trio.to_thread.run_sync


def scrape(port: int, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read()


def refused_rcpt(port: int, password: str) -> int:
    """A transaction whose only recipient is refused (a syntactically bad address)."""
    with smtp.connect(port) as client:
        smtp.login(client, "app", password, "PLAIN")
        client.mail("alice@example.com")
        code, _ = client.docmd("RCPT TO:<no at sign>")
        client.rset()
        return code


def failed_login(port: int) -> int:
    with smtp.connect(port) as client:
        try:
            smtp.login(client, "app", "wrong password")
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
    return 0


def caught_up(
    m: dict[str, dict[tuple[tuple[str, str], ...], float]],
    delivered: tuple[tuple[str, str], ...],
    count: int,
) -> bool:
    """Whether a scrape shows count deliveries counted, their stream entries gone and
    no SMTP session open."""
    return (
        m.get("smtpproxy_deliveries_total", {}).get(delivered, 0) >= count
        and m.get("smtpproxy_queue_stream_entries", {}).get(()) == 0
        and m.get("smtpproxy_smtp_sessions_active", {}).get(()) == 0
    )


async def test_metrics_count_sessions_replies_ingest_and_delivery(
    cfg: Config, account: dict[str, Any], pg_url: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cfg = make_config(
        tmp_path, pg_url, cfg.redis.url, cfg.redis.key_prefix, delivery={"default_route": "outbox"}
    )
    stop = trio.Event()
    with trio.fail_after(60):
        running: Running = await nursery.start(serve, cfg, stop)
        port = running.smtp[0][1]
        assert running.health is not None
        health = running.health[1]
        mids = []
        for _ in range(3):
            code, reply = await run(
                lambda: smtp.send(port, "app", account["password"], smtp.message())
            )
            assert code == 250
            mids.append(smtp.queued_id(reply))
        assert await run(lambda: refused_rcpt(port, account["password"])) >= 500
        assert await run(lambda: failed_login(port)) == 535
        for mid in mids:
            await wait_status(pg_url, mid, "delivered")
        tenant = ("tenant", str(account["tenant_id"]))
        delivered = (("outcome", "delivered"), ("provider", "outbox"), tenant)
        # the recorder acknowledges and counts a delivery after committing its row, and
        # the ingress thread ends a session after its last reply: until they catch up
        while True:
            status, content_type, body = await run(lambda: scrape(health))
            m = parse(body)
            if caught_up(m, delivered, 3):
                break
            await trio.sleep(0.1)
        head = await run(lambda: scrape(health, "HEAD"))
    stop.set()

    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert head[0] == 200 and head[2] == b""
    replies = m["smtpproxy_smtp_replies_total"]
    assert replies[(("code", "250"), ("command", "DATA"))] == 3
    assert replies[(("code", "220"), ("command", "CONNECT"))] == 5
    assert replies[(("code", "535"), ("command", "AUTH"))] == 1
    assert replies[(("code", "235"), ("command", "AUTH"))] == 4
    assert (
        sum(
            v
            for k, v in replies.items()
            if dict(k)["command"] == "RCPT" and dict(k)["code"].startswith("5")
        )
        == 1
    )
    assert m["smtpproxy_smtp_sessions_total"][()] == 5
    assert m["smtpproxy_messages_accepted_total"][()] == 3
    assert m["smtpproxy_message_bytes_accepted_total"][()] > 0
    assert m["smtpproxy_ingest_seconds_count"][()] == 3
    assert m["smtpproxy_ingest_seconds_bucket"][(("le", "+Inf"),)] == 3
    assert m["smtpproxy_deliveries_total"][delivered] == 3
    assert m["smtpproxy_delivery_seconds_count"][(("provider", "outbox"), tenant)] == 3
    # queue gauges from PostgreSQL and Redis: everything was delivered
    assert m["smtpproxy_scrape_ok"] == {(("source", "postgresql"),): 1, (("source", "redis"),): 1}
    assert m["smtpproxy_messages"][(("status", "queued"),)] == 0
    assert m["smtpproxy_messages"][(("status", "dlq"),)] == 0
    assert m["smtpproxy_queue_stream_entries"][()] == 0
    assert m["smtpproxy_consumer_lag_entries"][()] == 0
    assert m["smtpproxy_dlq_stream_entries"][()] == 0
    assert m["smtpproxy_smtp_sessions_active"][()] == 0
    assert m["smtpproxy_smtp_backpressure"][()] == 0
    assert m["process_resident_memory_bytes"][()] > 0
    # bounded labels: no message id, address or account name anywhere in the output
    text = body.decode()
    for mid in mids:
        assert mid not in text
    assert "example" not in text and "app" not in text.replace("application", "")


async def test_queue_gauges_show_waiting_mail_when_delivery_is_off(
    cfg: Config, account: dict[str, Any], pg_url: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With no consumers running, accepted mail is queued: PostgreSQL and Redis agree."""
    cfg = make_config(
        tmp_path, pg_url, cfg.redis.url, cfg.redis.key_prefix, delivery={"enabled": False}
    )
    stop = trio.Event()
    with trio.fail_after(60):
        running: Running = await nursery.start(serve, cfg, stop)
        port = running.smtp[0][1]
        assert running.health is not None
        for _ in range(2):
            code, _reply = await run(
                lambda: smtp.send(port, "app", account["password"], smtp.message())
            )
            assert code == 250
        _status, _ct, body = await run(lambda: scrape(running.health[1]))  # type: ignore[index]
    stop.set()
    m = parse(body)
    assert m["smtpproxy_messages"][(("status", "queued"),)] == 2
    assert m["smtpproxy_queue_stream_entries"][()] == 2
    assert m["smtpproxy_consumer_lag_entries"][()] == 2
    assert m["smtpproxy_queue_pending_entries"][()] == 0
    assert m["smtpproxy_queue_oldest_age_seconds"][()] >= 0
