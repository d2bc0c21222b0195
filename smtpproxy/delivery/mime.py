"""Reading a raw RFC 5322 message into the parts JSON APIs ask for. Pure.

Providers that take raw MIME (SES, Mailgun, Graph, SMTP) never use this: they send the
exact bytes. Providers that take JSON (SendGrid, Postmark) rebuild the message from
what this returns: addresses with display names, the decoded subject, the text and
HTML bodies, attachments and inline parts with their Content-ID, and the remaining
headers.
"""

from __future__ import annotations

import email.policy
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser

import attrs

# headers a JSON API rebuilds from its own fields (never passed as custom headers)
STRUCTURAL = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "return-path",
    }
)


@attrs.frozen
class Address:
    email: str
    name: str = ""


@attrs.frozen
class Attachment:
    filename: str
    content_type: str
    content: bytes = attrs.field(repr=False)
    inline: bool = False
    content_id: str = ""


@attrs.frozen
class ParsedMessage:
    from_: Address | None
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]  # other headers, in order, values decoded


_PARSER = BytesParser(policy=email.policy.default)


def utf8(text: str) -> str:
    """Header text as UTF-8: the parser keeps raw 8-bit header bytes (RFC 6532, sent by
    SMTPUTF8 clients) as surrogate escapes, which cannot be encoded as JSON or sent on."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _addresses(msg: EmailMessage, name: str) -> tuple[Address, ...]:
    out: list[Address] = []
    for value in msg.get_all(name) or []:
        try:
            addrs = value.addresses
        except (AttributeError, ValueError, IndexError):
            continue  # unparseable header: nothing we can address
        out.extend(
            Address(utf8(a.addr_spec), utf8(a.display_name or "")) for a in addrs if a.addr_spec
        )
    return tuple(out)


def _header_text(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
    except (ValueError, IndexError):
        return ""
    return utf8(str(value)) if value is not None else ""


def _content(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text(part: EmailMessage) -> str:
    raw = _content(part)
    charset = part.get_content_charset() or "us-ascii"
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return raw.decode("utf-8", errors="replace")


def _leaves(part: EmailMessage) -> Iterator[EmailMessage]:
    """The leaf parts in order; an attached message/rfc822 is one leaf, not walked into
    (its text is the forwarded mail's, not this message's body)."""
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        yield part
        return
    for sub in part.iter_parts():
        if isinstance(sub, EmailMessage):
            yield from _leaves(sub)


def _walk(msg: EmailMessage) -> tuple[str | None, str | None, list[Attachment]]:
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    for part in _leaves(msg):
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = part.get_filename() or ""
        cid = (part.get("Content-ID") or "").strip().strip("<>")
        if disposition != "attachment" and not filename:
            if ctype == "text/plain" and text is None:
                text = _text(part)
                continue
            if ctype == "text/html" and html is None:
                html = _text(part)
                continue
        data = _attached_message(part) if ctype == "message/rfc822" else _content(part)
        attachments.append(
            Attachment(
                filename=filename or _default_name(len(attachments) + 1, ctype),
                content_type=ctype,
                content=data,
                inline=disposition == "inline" or (bool(cid) and disposition != "attachment"),
                content_id=cid,
            )
        )
    return text, html, attachments


def _attached_message(part: EmailMessage) -> bytes:
    """An attached message/rfc822 part as bytes (the parser holds it as a Message)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], EmailMessage):
        return payload[0].as_bytes()
    return _content(part)


def _default_name(n: int, ctype: str) -> str:
    ext = {
        "text/plain": "txt",
        "text/html": "html",
        "image/png": "png",
        "image/jpeg": "jpg",
        "image/gif": "gif",
        "application/pdf": "pdf",
        "message/rfc822": "eml",
        "text/calendar": "ics",
    }.get(ctype, "bin")
    return f"part{n}.{ext}"


def parse(raw: bytes) -> ParsedMessage:
    msg = _PARSER.parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    from_ = _addresses(msg, "From")
    text, html, attachments = _walk(msg)
    others = []
    for name, raw_value in msg.raw_items():
        if name.lower() in STRUCTURAL:
            continue
        try:
            value = str(msg.policy.header_fetch_parse(name, raw_value))
        except (ValueError, IndexError):  # malformed: keep its text, unfolded
            value = " ".join(str(raw_value).split())
        others.append((name, utf8(value)))
    return ParsedMessage(
        from_=from_[0] if from_ else None,
        reply_to=_addresses(msg, "Reply-To"),
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        subject=_header_text(msg, "Subject"),
        text=text,
        html=html,
        attachments=tuple(attachments),
        headers=tuple(others),
    )
