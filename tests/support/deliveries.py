"""What the provider tests (tests/providers) send: messages, their bytes on the wire, the
Delivery that carries them, and a provider opened for one test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.policy import SMTP
from typing import TypeVar

from smtpproxy.delivery.providers.base import Delivery, Provider


def message(
    *,
    sender: str | None = "Alice Example <alice@example.com>",
    to: str | None = "Bob <bob@example.org>",
    cc: str | None = None,
    bcc: str | None = None,
    reply_to: str | None = None,
    subject: str | None = "hello",
    text: str | None = "Hi Bob,\n",
    html: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> EmailMessage:
    """A message with these headers (None: left out), in this order, then a text/plain
    body, a text/html one, or both as alternatives."""
    m = EmailMessage()
    for name, value in (("From", sender), ("To", to), ("Cc", cc), ("Bcc", bcc)):
        if value is not None:
            m[name] = value
    if reply_to is not None:
        m["Reply-To"] = reply_to
    if subject is not None:
        m["Subject"] = subject
    for name, value in headers:
        m[name] = value
    if text is not None:
        m.set_content(text)
    if html is not None:
        if text is None:
            m.set_content(html, subtype="html")
        else:
            m.add_alternative(html, subtype="html")
    return m


def wire(m: EmailMessage) -> bytes:
    """The message as an SMTP client sends it (CRLF line ends)."""
    data = m.as_bytes(policy=SMTP)
    assert b"\r\n" in data
    return data


def delivery(
    body: bytes,
    *recipients: str,
    mail_from: str = "alice@example.com",
    message_id: str = "msg-1",
) -> Delivery:
    """A delivery of body from mail_from to the recipients (bob@example.org when none)."""
    return Delivery(
        message_id=message_id,
        tenant_id=1,
        account_id=1,
        mail_from=mail_from,
        recipients=recipients or ("bob@example.org",),
        body=body,
    )


P = TypeVar("P", bound=Provider)


@asynccontextmanager
async def opened(provider: P) -> AsyncIterator[P]:
    """The provider, closed when the block ends."""
    try:
        yield provider
    finally:
        await provider.aclose()
