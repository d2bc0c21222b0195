"""Microsoft 365 end to end: SMTP in, the Graph test server out, set up with the real
CLI, through the running service with real PostgreSQL and Redis. A 25 MB scan goes as
a draft with an upload session; two mailboxes sending at once are each kept to their
pace without a single 429, the busy one not delaying the other, and what waits says
why in `message show` and /metrics."""

from __future__ import annotations

import email.policy
import json
import os
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import psycopg
import psycopg.rows
import pytest
import trio
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.config.passwords import hash_password
from smtpproxy.delivery.pacing import PACED
from smtpproxy.runtime.service import Running
from tests.conftest import make_config
from tests.support import serving, smtp
from tests.support.cli import config_settings, run_cli
from tests.support.fake_graph import FakeGraph
from tests.support.process import write_config

KEY = Fernet.generate_key().decode()
A, B = "a@contoso.example", "b@contoso.example"
PASSWORD = "scanner password 123"
run = trio.to_thread.run_sync


@pytest.fixture
def fake() -> Any:
    with FakeGraph(
        users=(A, B, "frontdesk@contoso.example"),
        mailbox_concurrency=4,
        mailbox_per_minute=30,
        graph_delay=0.02,
    ) as f:
        yield f


def set_up(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, fake: FakeGraph) -> Path:
    """Tenant, account and a msgraph provider routed for everything, through the CLI
    as an operator does it; the config file it used."""
    config = write_config(
        tmp_path / "cli.toml", config_settings(tmp_path, pg_url, redis_url, key_prefix, KEY)
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        admin.add_tenant(conn, "contoso")
        admin.add_account(conn, "mfp", "contoso", hash_password(PASSWORD), ["contoso.example"])
    settings = {
        "tenant_id": fake.tenant_id,
        "client_id": fake.client_id,
        "user": "frontdesk@contoso.example",
        "send_as": "sender",
        "allowed_senders": "contoso.example",
        "large_messages": "true",
        "login_endpoint": fake.url,
    }
    added = run_cli(
        config,
        *("provider", "add", "m365", "-t", "contoso", "--type", "msgraph"),
        *("--endpoint", fake.url, "--secret-stdin"),
        *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")),
        input=fake.client_secret + "\n",
    )
    assert added.returncode == 0, added.stderr
    routed = run_cli(config, "route", "add", "-t", "contoso", "--provider", "m365")
    assert routed.returncode == 0, routed.stderr
    return config


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str
) -> Running:
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        security={"secret_key": KEY},
        delivery={"scheduler_interval": "100ms"},
    )
    running, _ = await serving.start(nursery, cfg)
    return running


def send_many(port: int, sender: str, count: int) -> list[str]:
    """count messages from sender in one authenticated session; their queued ids."""
    ids = []
    with smtp.connect(port) as client:
        smtp.login(client, "mfp", PASSWORD)
        for n in range(count):
            data = smtp.message(subject=f"{sender} {n}", sender=sender, to="bob@example.org")
            client.mail(sender)
            client.rcpt("bob@example.org")
            code, reply = client.data(data)
            assert code == 250, reply
            ids.append(smtp.queued_id(reply))
    return ids


def rows(pg_url: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(pg_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return {r["id"]: r for r in cur.execute("SELECT * FROM messages").fetchall()}


async def test_two_mailboxes_each_at_their_pace_without_a_429(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    fake: FakeGraph,
    nursery: trio.Nursery,
) -> None:
    """35 messages from one mailbox and 10 from another, sent at once, to a tenant
    whose Exchange allows 30 a minute and 4 requests at once per mailbox: the first 30
    of the busy mailbox and all 10 of the other go at once, with no 429; the other 5
    wait for the busy mailbox's next minute, in PostgreSQL, not counted as attempts,
    and `message show` and /metrics say so."""
    config = set_up(tmp_path, pg_url, redis_url, key_prefix, fake)
    running = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    with trio.fail_after(60):
        busy: list[str] = []
        quiet: list[str] = []
        async with trio.open_nursery() as senders:

            async def send(sender: str, count: int, into: list[str]) -> None:
                into.extend(await run(lambda: send_many(port, sender, count)))

            senders.start_soon(send, A, 35, busy)
            senders.start_soon(send, B, 10, quiet)
        while True:
            now = rows(pg_url)
            done = [m for m in (*busy, *quiet) if now[m]["status"] == "delivered"]
            waiting = [m for m in busy if now[m]["status"] == "retrying"]
            if len(done) == 40 and len(waiting) == 5:
                break
            await trio.sleep(0.2)
    assert fake.throttled == []
    assert max(fake.most_at_once.values()) <= 4
    assert sorted(s.user for s in fake.sent) == [A] * 30 + [B] * 10
    assert all(now[m]["status"] == "delivered" for m in quiet)
    for mid in waiting:
        row = now[mid]
        assert row["attempts"] == 0
        assert row["last_error"].startswith(f"{PACED} {A}")
        assert "30 messages a minute" in row["last_error"]
    shown = run_cli(config, "message", "show", waiting[0])
    assert shown.returncode == 0, shown.stderr
    assert f"{PACED} {A}" in " ".join(shown.stdout.split())
    assert running.health is not None
    health = running.health[1]
    with trio.fail_after(10):  # the recorder counts outcomes after committing their rows
        while True:
            metrics = await run(lambda: serving.get_text(health))
            paced = [line for line in metrics.splitlines() if 'outcome="paced"' in line]
            if sum(float(line.rpartition(" ")[2]) for line in paced) >= 5:
                break
            await trio.sleep(0.1)
    assert len(paced) == 1 and paced[0].endswith(" 5"), paced


async def test_a_25_mb_scan_over_smtp_arrives_through_an_upload_session(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    fake: FakeGraph,
    nursery: trio.Nursery,
) -> None:
    """A printer's 25 MB scan (its PDF base64 in the message) is admitted, and arrives
    as a draft whose PDF went through an upload session, byte for byte."""
    set_up(tmp_path, pg_url, redis_url, key_prefix, fake)
    port = (await start(nursery, tmp_path, pg_url, redis_url, key_prefix)).smtp[0][1]
    pdf = b"%PDF-1.4\n" + os.urandom(18_000_000)
    m = EmailMessage()
    m["From"] = f'"{A}" <{A}>'  # as scanners write it
    m["To"] = "bob@example.org"
    m["Subject"] = "Scan"
    m.set_content("Scanned.\n")
    m.add_attachment(pdf, maintype="application", subtype="pdf", filename="scan.pdf")
    data = m.as_bytes(policy=email.policy.SMTP)
    assert 24_000_000 < len(data) < 25 * 1024 * 1024

    def send_scan() -> str:
        with smtp.connect(port, timeout=60) as client:
            smtp.login(client, "mfp", PASSWORD)
            client.mail(A, [f"SIZE={len(data)}"])
            client.rcpt("bob@example.org")
            code, reply = client.data(data)
            assert code == 250, reply
            return smtp.queued_id(reply)

    with trio.fail_after(120):
        mid = await run(send_scan)
        await serving.wait_status(pg_url, mid, "delivered", timeout=100)
    [sent] = fake.sent
    assert sent.via == "draft" and sent.user == A
    [attached] = sent.attachments
    assert (attached.name, attached.via, attached.content) == ("scan.pdf", "upload", pdf)
    draft = BytesParser(policy=email.policy.default).parsebytes(sent.mime)
    assert str(draft["From"]) == A  # the display name Exchange refuses was dropped


def rcpt_with_size(port: int, size: int) -> int:
    """The reply code to RCPT after MAIL declared SIZE=size."""
    with smtp.connect(port) as client:
        smtp.login(client, "mfp", PASSWORD)
        assert client.mail(A, [f"SIZE={size}"])[0] == 250
        return int(client.rcpt("bob@example.org")[0])


async def test_the_smtp_size_limit_follows_large_messages(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    fake: FakeGraph,
    nursery: trio.Nursery,
) -> None:
    """A Graph route admits a 5 MB message with large_messages (up to 35 MB) and refuses
    it at RCPT (552) once the operator turns large_messages off; `provider show` lists
    the settings, never the secret."""
    config = set_up(tmp_path, pg_url, redis_url, key_prefix, fake)
    port = (await start(nursery, tmp_path, pg_url, redis_url, key_prefix)).smtp[0][1]
    shown = run_cli(config, "provider", "show", "m365", "-t", "contoso", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["settings"]["large_messages"] is True
    assert fake.client_secret not in shown.stdout
    with trio.fail_after(60):
        assert await run(lambda: rcpt_with_size(port, 5_000_000)) == 250
        off = run_cli(
            config, "provider", "update", "m365", "-t", "contoso", "--set", "large_messages=false"
        )
        assert off.returncode == 0, off.stderr
        while (code := await run(lambda: rcpt_with_size(port, 5_000_000))) == 250:
            await trio.sleep(0.2)  # the running service reloads within a second
    assert code == 552
