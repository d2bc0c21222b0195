"""`smtpproxy send-test` against smtpproxy running in the test.

Each test runs the command (`smtpproxy send-test ...`, its entry point in this process,
see tests/support/cli.py) in a worker thread and checks its exit code and output (replies
shown, credentials never) and what reached the relay: the rows in `messages` and the
stored bodies, attachments byte for byte.
"""

from __future__ import annotations

import base64
import email
import json
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import default as default_policy
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from smtpproxy.config import Config
from smtpproxy.ingress.tls import server_context
from smtpproxy.ops.sendtest import (
    Outcome,
    attachment_type,
    build_message,
    percentile,
    summarize,
    wire_data,
)
from smtpproxy.runtime.service import serve
from smtpproxy.store import key_for
from tests.conftest import Service, make_config
from tests.support.cli import Result, run_cli
from tests.support.process import write_config

TIMEOUT = 60


async def send_test(*args: str, stdin: str = "") -> Result:
    """The command (without a config file) with args, in a worker thread so the service
    keeps running."""
    return await trio.to_thread.run_sync(
        partial(run_cli, None, "send-test", *args, input=stdin, timeout=TIMEOUT)
    )


def login_args(port: int, *extra: str, user: str = "app") -> tuple[str, ...]:
    """STARTTLS without verification, AUTH as user, alice@example.com to bob@example.org."""
    return (
        *("--port", str(port), "--tls", "starttls", "--insecure"),
        *("--user", user, "--password-stdin"),
        *("--from", "alice@example.com", "--to", "bob@example.org"),
        *extra,
    )


def succeeded(result: Result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def one_error(result: Result, *fragments: str) -> str:
    """A clean failure: exit 1 and exactly one `error:` line on stderr naming fragments."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def rows(pg_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(pg_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM messages ORDER BY created_at, id").fetchall()


def stored(cfg: Config, mid: str) -> EmailMessage:
    """The body the relay stored for message mid, parsed."""
    data = (cfg.storage_path / key_for(mid)).read_bytes()
    message = email.message_from_bytes(data, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


def never_shows(result: Result, password: str) -> None:
    output = result.stdout + result.stderr
    assert password not in output
    for blob in (b"\0app\0" + password.encode(), password.encode()):
        assert base64.b64encode(blob).decode() not in output


# -- one message -------------------------------------------------------------------------


async def test_auth_plain_shows_every_reply_and_the_timing(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str
) -> None:
    """AUTH PLAIN over STARTTLS: each reply and the timings are printed; the message is stored."""
    body = "Hi Bob,\n.\n..a line with dots\n"
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *login_args(service.smtp_port, "--subject", "plain check", "--body", body),
            stdin=account["password"] + "\n",
        )
    out = succeeded(result)
    for fragment in (
        "S: 220 ",
        "C: EHLO ",
        "C: STARTTLS",
        "certificate NOT verified (--insecure)",
        "C: AUTH PLAIN ********",
        "S: 235 2.7.0",
        "C: MAIL FROM:<alice@example.com>",
        "C: RCPT TO:<bob@example.org>",
        "S: 354",
        "C: QUIT",
        "S: 221",
    ):
        assert fragment in out, f"{fragment!r} not in\n{out}"
    timing = next(line for line in out.splitlines() if line.startswith("timing: "))
    for label in ("connect ", "TLS ", "AUTH ", "DATA-to-250 ", "total "):
        assert label in timing, timing
    last = out.splitlines()[-1]
    assert last.startswith("accepted: 250 2.0.0 Ok: queued as "), last
    never_shows(result, account["password"])
    [row] = rows(pg_url)
    assert last.endswith(row["id"])
    assert row["mail_from"] == "alice@example.com"
    assert row["rcpt_to"] == ["bob@example.org"]
    assert row["subject"] == "plain check"
    message = stored(cfg, row["id"])
    assert message["Message-ID"].strip("<>") == row["header_message_id"]
    assert message["Date"]
    text = message.get_body(("plain",))
    assert text is not None
    # dot-stuffed on the wire, undone by the server: the same lines arrive
    assert text.get_content().replace("\r\n", "\n") == body


async def test_without_host_and_port_it_uses_the_configs_listen_address(
    service: Service, account: dict[str, Any], tmp_path: Path, pg_url: str
) -> None:
    """With no --host and --port, send-test connects where the config's smtp.listen
    says (on loopback for a listener on every address), not to a fixed 2525."""
    config = write_config(
        tmp_path / "listen.toml", {"smtp": {"listen": [f"0.0.0.0:{service.smtp_port}"]}}
    )
    args = login_args(service.smtp_port)[2:]  # everything but --port
    with trio.fail_after(TIMEOUT):
        result = await trio.to_thread.run_sync(
            partial(
                run_cli,
                config,
                "send-test",
                *args,
                input=account["password"] + "\n",
                timeout=TIMEOUT,
            )
        )
    assert "accepted: 250" in succeeded(result)
    assert len(rows(pg_url)) == 1


async def test_auth_login_with_html_and_attachments_arrives_intact(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str, tmp_path: Path
) -> None:
    """AUTH LOGIN, an HTML alternative and two attachments reach the store byte for byte."""
    binary = bytes(range(256)) * 40 + b"\r\n.\r\n\n.\r\nno final newline"
    (tmp_path / "blob.bin").write_bytes(binary)
    (tmp_path / "notes.txt").write_bytes(b"line one\r\n.line two\n")
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *login_args(
                service.smtp_port,
                *("--auth", "login", "--html", "<p>Hello <b>Bob</b></p>"),
                *("--attach", str(tmp_path / "blob.bin"), "--attach", str(tmp_path / "notes.txt")),
            ),
            stdin=account["password"] + "\n",
        )
    out = succeeded(result)
    assert "C: AUTH LOGIN" in out
    assert "S: 334 VXNlcm5hbWU6" in out  # "Username:"
    assert "C: ********" in out
    never_shows(result, account["password"])
    [row] = rows(pg_url)
    message = stored(cfg, row["id"])
    html = message.get_body(("html",))
    assert html is not None
    assert "<p>Hello <b>Bob</b></p>" in html.get_content()
    attachments = {part.get_filename(): part for part in message.iter_attachments()}
    assert set(attachments) == {"blob.bin", "notes.txt"}
    assert attachments["blob.bin"].get_content_type() == "application/octet-stream"
    assert attachments["blob.bin"].get_payload(decode=True) == binary
    assert attachments["notes.txt"].get_content_type() == "text/plain"
    assert attachments["notes.txt"].get_payload(decode=True) == b"line one\r\n.line two\n"


async def test_wrong_password_shows_535_and_never_the_password(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """A wrong password: the 535 is shown, exit 1, and no output holds the password."""
    wrong = "not-the-password-" + account["password"][::-1]
    with trio.fail_after(TIMEOUT):
        result = await send_test(*login_args(service.smtp_port), stdin=wrong + "\n")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "S: 535 5.7.8 Authentication credentials invalid" in result.stdout
    assert result.stdout.splitlines()[-1] == (
        "not accepted: 535 5.7.8 Authentication credentials invalid (at AUTH)"
    )
    never_shows(result, wrong)
    assert rows(pg_url) == []


async def test_refused_sender_domain_shows_550_in_the_summary(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """A sender outside the account's domains: every message refused with 550, exit 1."""
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *login_args(service.smtp_port, "--from", "eve@elsewhere.test", "--count", "2"),
            stdin=account["password"] + "\n",
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[1/2] not accepted: 550 5.7.1 Sender address not allowed"), lines
    assert lines[0].endswith("(at MAIL)"), lines
    assert lines[2] == "sent 2 in " + lines[2].split("sent 2 in ", 1)[1]
    assert lines[2].endswith("0 accepted, 2 not accepted"), lines
    assert "latency" not in result.stdout  # nothing accepted, nothing to measure
    assert lines[3] == "refused 2 x 550 at MAIL: 5.7.1 Sender address not allowed for this account"
    assert rows(pg_url) == []


# -- many messages -------------------------------------------------------------------------


async def test_count_five_prints_a_line_each_and_the_summary(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """--count 5: five accepted lines, then sent/accepted, msgs/s and latency p50/p95/max."""
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *login_args(service.smtp_port, "--count", "5", "--subject", "batch"),
            stdin=account["password"] + "\n",
        )
    lines = succeeded(result).splitlines()
    assert len(lines) == 7, lines
    for n, line in enumerate(lines[:5], start=1):
        assert line.startswith(f"[{n}/5] 250 2.0.0 Ok: queued as "), line
    assert lines[5].startswith("sent 5 in "), lines
    assert "msgs/s): 5 accepted, 0 not accepted" in lines[5]
    assert lines[6].startswith("latency (connect to 250, accepted messages): p50 "), lines
    assert ", p95 " in lines[6] and ", max " in lines[6]
    stored_rows = rows(pg_url)
    assert len(stored_rows) == 5
    assert sorted(r["subject"] for r in stored_rows) == [f"batch [{n}/5]" for n in range(1, 6)]
    assert len({r["header_message_id"] for r in stored_rows}) == 5  # never a duplicate


async def test_json_result_with_rate_pacing(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """--json --count 3 --rate 10: a machine-readable result, three starts at least 0.2 s apart."""
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *login_args(service.smtp_port, "--count", "3", "--rate", "10", "--json"),
            stdin=account["password"] + "\n",
        )
    data = json.loads(succeeded(result))
    assert data["ok"] is True and data["stopped"] is None and data["count"] == 3
    assert (data["sent"], data["accepted"], data["refused"], data["errors"]) == (3, 3, {}, {})
    assert data["tls"] == "starttls" and data["port"] == service.smtp_port
    assert data["elapsed_s"] >= 0.2
    assert data["msgs_per_s"] <= 3 / 0.2  # three starts a tenth of a second apart, at best
    assert set(data["latency_ms"]) == {"p50", "p95", "max"}
    assert data["latency_ms"]["p50"] <= data["latency_ms"]["p95"] <= data["latency_ms"]["max"]
    queued = [m["queued_as"] for m in data["messages"]]
    assert sorted(queued) == sorted(r["id"] for r in rows(pg_url))
    first = data["messages"][0]
    assert first["stage"] == "DONE" and first["code"] == 250
    assert first["tls"]["verified"] is False
    assert set(first["timing_ms"]) == {"connect", "tls", "auth", "data", "total"}
    never_shows(result, account["password"])


# -- TLS -----------------------------------------------------------------------------------


async def test_implicit_tls_against_a_plain_port_fails_cleanly(
    service: Service, account: dict[str, Any]
) -> None:
    """--tls implicit against the STARTTLS port: exit 1 with one error line and a hint."""
    with trio.fail_after(TIMEOUT):
        result = await send_test(
            *("--port", str(service.smtp_port), "--tls", "implicit", "--insecure"),
            *("--from", "alice@example.com", "--to", "bob@example.org"),
        )
    one_error(result, "TLS handshake with 127.0.0.1:", "use --tls starttls")


async def test_unverifiable_certificate_fails_with_the_hint(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str
) -> None:
    """Without --insecure the self-signed certificate is refused (one line naming --insecure);
    with --ca-file naming that certificate it verifies and the message goes through."""
    args = (
        *("--port", str(service.smtp_port), "--user", "app", "--password-stdin"),
        *("--from", "alice@example.com", "--to", "bob@example.org"),
    )
    with trio.fail_after(TIMEOUT):
        refused = await send_test(*args, stdin=account["password"] + "\n")
        line = one_error(refused, "could not be verified", "--insecure", "--ca-file")
        assert "self-signed" in line
        assert "C: AUTH" not in refused.stdout  # no credentials before the certificate checks
        cert = Path(cfg.data_dir) / "tls" / "selfsigned.crt"
        verified = await send_test(*args, "--ca-file", str(cert), stdin=account["password"] + "\n")
    assert "certificate verified" in succeeded(verified)
    assert len(rows(pg_url)) == 1


@pytest.fixture
async def plaintext_service(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None
) -> AsyncIterator[tuple[Config, int]]:
    """smtpproxy that allows AUTH without TLS (behind a TLS front, or for --tls none)."""
    cfg = make_config(tmp_path, pg_url, redis_url, key_prefix, smtp={"allow_plaintext_auth": True})
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            running = await nursery.start(serve, cfg, stop)
        yield cfg, running.smtp[0][1]
        stop.set()


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        async for chunk in src:
            await dst.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()


async def _tls_front(backend_port: int, cfg: Config, client: trio.SocketStream) -> None:
    """Terminate TLS from client and relay the bytes to the plain SMTP port (an SMTPS port)."""
    tls = trio.SSLStream(client, server_context(cfg), server_side=True)
    try:
        backend = await trio.open_tcp_stream("127.0.0.1", backend_port)
        async with backend, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, tls, backend, nursery.cancel_scope)
            nursery.start_soon(_pump, backend, tls, nursery.cancel_scope)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.move_on_after(1):
            await trio.aclose_forcefully(tls)


async def test_implicit_tls_and_plain_text_both_deliver(
    plaintext_service: tuple[Config, int], account: dict[str, Any], pg_url: str
) -> None:
    """--tls implicit through an SMTPS front and --tls none both authenticate and deliver."""
    cfg, port = plaintext_service
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(_tls_front, port, cfg), 0, host="127.0.0.1")
            )
            smtps_port = listeners[0].socket.getsockname()[1]
            implicit = await send_test(
                *("--port", str(smtps_port), "--tls", "implicit", "--insecure"),
                *("--user", "app", "--password-stdin", "--auth", "login"),
                *("--from", "alice@example.com", "--to", "bob@example.org", "--json"),
                stdin=account["password"] + "\n",
            )
            nursery.cancel_scope.cancel()
        plain = await send_test(
            *("--port", str(port), "--tls", "none", "--user", "app", "--password-stdin"),
            *("--from", "alice@example.com", "--to", "bob@example.org"),
            stdin=account["password"] + "\n",
        )
    [message] = json.loads(succeeded(implicit))["messages"]
    assert message["tls"]["version"].startswith("TLSv1.")
    assert set(message["timing_ms"]) == {"connect", "tls", "auth", "data", "total"}
    out = succeeded(plain)
    assert "C: STARTTLS" not in out and "* TLS" not in out
    assert "S: 235 2.7.0" in out
    timing = next(line for line in out.splitlines() if line.startswith("timing: "))
    assert "AUTH " in timing and "TLS " not in timing
    assert len(rows(pg_url)) == 2


# -- usage -----------------------------------------------------------------------------------


async def test_usage_errors_exit_2_before_connecting() -> None:
    """Options that cannot work exit 2 without a traceback and without reading a password."""
    base = ("--port", "9", "--from", "alice@example.com", "--to", "bob@example.org")
    cases = [
        ("--password-stdin",),  # no --user
        ("--user", "app"),  # a password only from stdin, and stdin is no terminal
        ("--rate", "0"),
        ("--attach", "/nonexistent/file.pdf"),
        ("--from", "not an address"),  # the last --from wins
    ]
    results: dict[tuple[str, ...], Result] = {}

    async def one(extra: tuple[str, ...]) -> None:
        results[extra] = await send_test(*base, *extra, stdin="secret\n")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for extra in cases:
                nursery.start_soon(one, extra)
    for extra, result in results.items():
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and "secret" not in result.stderr
        assert result.stdout == ""
    assert "not an email address" in results[("--from", "not an address")].stderr


# -- the pure helpers ------------------------------------------------------------------------


def test_message_building_and_summary_helpers() -> None:
    """Attachment types, dot-stuffing, unique Message-IDs, nearest-rank percentiles, counts."""
    assert attachment_type("report.pdf") == ("application", "pdf")
    assert attachment_type("archive.tar.gz") == ("application", "octet-stream")
    assert attachment_type("no-extension") == ("application", "octet-stream")
    assert wire_data(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert wire_data(b".") == b"..\r\n.\r\n"
    ids = {
        build_message(
            sender="A <a@example.com>", recipients=["b@example.org"], subject="s", text="t"
        )["Message-ID"]
        for _ in range(3)
    }
    assert len(ids) == 3 and all(i.endswith("@example.com>") for i in ids)
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 95) == 4.0
    assert percentile([7.0], 95) == 7.0
    ok = Outcome(1, stage="DONE", code=250, timings={"total": 0.5})
    refused = Outcome(2, stage="MAIL", code=550, reply="5.7.1 no")
    broken = Outcome(3, stage="DATA", error="x closed the connection")
    summary = summarize([ok, refused, broken], elapsed=2.0)
    assert (summary.sent, summary.accepted, summary.ok) == (3, 1, False)
    assert summary.refused == {"550": 1}
    assert summary.errors == {"x closed the connection": 1}
    assert summary.rate == 1.5
    assert summary.latency == {"p50": 0.5, "p95": 0.5, "max": 0.5}
