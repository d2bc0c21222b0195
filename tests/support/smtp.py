"""Blocking SMTP client helpers for tests (run them with trio.to_thread.run_sync)."""

from __future__ import annotations

import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

HOST = "127.0.0.1"


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(
    subject: str = "hello",
    sender: str = "Alice <alice@example.com>",
    to: str = "bob@example.org",
    body: str = "Hi Bob,\n.\n..a line with dots\n",
    message_id: str | None = None,
) -> bytes:
    """A message with a fresh Message-ID (the same one twice is a duplicate submission)."""
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@example.com>"
    m.set_content(body)
    return m.as_bytes(policy=SMTP_POLICY)


def connect(port: int, *, starttls: bool = True, timeout: float = 10) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, timeout=timeout)
    client.ehlo("client.test")
    if starttls:
        client.starttls(context=insecure_context())
        client.ehlo("client.test")
    return client


def login(client: smtplib.SMTP, user: str, password: str, mechanism: str = "PLAIN") -> None:
    client.user, client.password = user, password
    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
    code, resp = client.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, resp)


def send(
    port: int,
    user: str,
    password: str,
    data: bytes,
    *,
    mail_from: str = "alice@example.com",
    rcpt_to: tuple[str, ...] = ("bob@example.org",),
    mechanism: str = "PLAIN",
) -> tuple[int, bytes]:
    """One authenticated transaction; returns the DATA reply."""
    with connect(port) as client:
        login(client, user, password, mechanism)
        code, resp = client.mail(mail_from)
        assert code == 250, (code, resp)
        for r in rcpt_to:
            code, resp = client.rcpt(r)
            assert code == 250, (code, resp)
        return client.data(data)


def queued_id(reply: bytes) -> str:
    text = reply.decode()
    assert "queued as" in text, text
    return text.rsplit(" ", 1)[1]
