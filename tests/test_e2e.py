"""End to end through a real `smtpproxy run` process, real PostgreSQL and Redis, real SMTP.

The operator sets everything up with the CLI (tenant, account, provider, route), a
client sends over STARTTLS with AUTH LOGIN and AUTH PLAIN, and the test checks what the
providers received, the rows PostgreSQL holds, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cryptography.fernet import Fernet

from tests.support import smtp
from tests.support.cli import Result, run_cli_process
from tests.support.fake_sendgrid import FakeSendGrid
from tests.support.process import SmtpProxyProcess, write_config
from tests.support.serving import wait_status

pytestmark = pytest.mark.slow
run = trio.to_thread.run_sync


def cli(config: Path, *args: str, stdin: str | None = None) -> Result:
    """The command as a real process (end to end), which must exit 0 (CalledProcessError
    otherwise)."""
    return run_cli_process(config, *args, input=stdin, check=True)


@pytest.fixture
def config(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None) -> Path:
    return write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "health": {"listen": "127.0.0.1:0"},
            "security": {"secret_key": Fernet.generate_key().decode()},
            "delivery": {"default_route": "outbox"},
            "providers": {"outbox": {"type": "file", "path": str(tmp_path / "outbox")}},
        },
    )


async def wait_delivered(pg_url: str, mid: str) -> dict[str, Any]:
    """The message's row once it is delivered, failed or dead-lettered."""
    return await wait_status(pg_url, mid, "delivered", "failed", "dlq", timeout=30, interval=0.1)


async def test_smtp_to_file_and_sendgrid_through_a_real_process(
    config: Path, tmp_path: Path, pg_url: str
) -> None:
    """A real process accepts STARTTLS+AUTH mail and delivers it byte-exact to the file
    provider and field-faithfully to a SendGrid-compatible API, logging every attempt."""
    with FakeSendGrid(api_key="SG.e2e-key") as fake:
        cli(config, "tenant", "add", "acme")
        created = json.loads(
            cli(
                config,
                "account",
                "add",
                "app",
                "--tenant",
                "acme",
                "--allow-domain",
                "example.com",
                "--json",
            ).stdout
        )
        password = created["password"]
        cli(
            config,
            "provider",
            "add",
            "sg",
            "--tenant",
            "acme",
            "--type",
            "sendgrid",
            "--endpoint",
            fake.url,
            "--secret-stdin",
            stdin="SG.e2e-key\n",
        )
        cli(
            config,
            "route",
            "add",
            "--tenant",
            "acme",
            "--provider",
            "sg",
            "--recipient-domain",
            "*.sendgrid.test",
        )

        proc = SmtpProxyProcess(config)
        try:
            await run(proc.wait_ready)
            health = await run(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{proc.health_port}/readyz", timeout=5
                ).read()
            )
            assert json.loads(health)["status"] == "ready"

            to_file = smtp.message(subject="to the outbox", to="bob@example.org")
            code, reply = await run(
                lambda: smtp.send(proc.smtp_port, "app", password, to_file, mechanism="LOGIN")
            )
            assert code == 250
            file_id = smtp.queued_id(reply)

            to_sg = smtp.message(
                subject="Grüße über SendGrid",
                to="Carol <carol@x.sendgrid.test>",
                sender="Alice Ärger <alice@example.com>",
            )
            code, reply = await run(
                lambda: smtp.send(
                    proc.smtp_port,
                    "app",
                    password,
                    to_sg,
                    rcpt_to=("carol@x.sendgrid.test", "dave@x.sendgrid.test"),
                    mechanism="PLAIN",
                )
            )
            assert code == 250
            sg_id = smtp.queued_id(reply)

            file_row = await wait_delivered(pg_url, file_id)
            sg_row = await wait_delivered(pg_url, sg_id)
        finally:
            exit_code = await run(lambda: proc.stop(signal.SIGTERM))

        assert exit_code == 0
        assert file_row["status"] == "delivered"
        assert (tmp_path / "outbox" / f"{file_id}.eml").read_bytes() == to_file

        assert sg_row["status"] == "delivered", sg_row["last_error"]
        [request] = fake.accepted
        assert request.headers["authorization"] == "Bearer SG.e2e-key"
        sent = request.body
        original = BytesParser(policy=policy.default).parsebytes(to_sg)
        assert sent["subject"] == "Grüße über SendGrid"
        assert sent["from"] == {"email": "alice@example.com", "name": "Alice Ärger"}
        [personalization] = sent["personalizations"]
        assert personalization["to"] == [{"email": "carol@x.sendgrid.test", "name": "Carol"}]
        assert personalization["bcc"] == [{"email": "dave@x.sendgrid.test"}]
        assert sent["content"] == [{"type": "text/plain", "value": original.get_content()}]
        assert sent["headers"]["Message-ID"] == original["Message-ID"]
        assert sg_row["provider_message_id"] == request.response_headers["X-Message-Id"]

        with psycopg.connect(pg_url) as conn:
            logs = conn.execute(
                "SELECT message_id, provider_name, status, attempt_number FROM delivery_logs"
                " ORDER BY id"
            ).fetchall()
        assert sorted(logs) == sorted(
            [(file_id, "outbox", "delivered", 1), (sg_id, "sg", "delivered", 1)]
        )
        log_text = "".join(proc.raw)
        assert password not in log_text and "SG.e2e-key" not in log_text


async def test_sigint_drains_and_exits_zero(config: Path) -> None:
    """Ctrl-C (SIGINT) stops a running instance cleanly with exit code 0."""
    proc = SmtpProxyProcess(config)
    await run(proc.wait_ready)
    assert await run(lambda: proc.stop(signal.SIGINT)) == 0
    assert "smtpproxy stopped" in proc.messages()
