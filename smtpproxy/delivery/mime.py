"""Reading a raw RFC 5322 message into the parts JSON APIs ask for. Pure.

Providers that take raw MIME (SES, Mailgun, Graph, SMTP) never use this: they send the
exact bytes. Providers that take JSON (SendGrid, Postmark) rebuild the message from
what this returns: addresses with display names, the decoded subject, the text and
HTML bodies, attachments and inline parts with their Content-ID, and the remaining
headers.

The structure is parsed with the compat32 policy, and each header the result needs is
decoded once with the default policy's header parser. Parsing everything with the
default policy gave the same result at many times the cost: it re-parses a part's
Content-Type every time it is asked (the parser itself asks a dozen times a part), and
a rich message (text, HTML, a PDF) took 3.4 ms.
"""

from __future__ import annotations

import contextlib
import email.policy
import re
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.message import Message
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


class _Registry(HeaderRegistry):
    """The default header registry, without its cost per header: it builds a new class
    for every header it parses (8 us each); these are built once per kind."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        found = self._classes.get(key)
        if found is None:
            found = self._classes[key] = super().__getitem__(name)
        return found


_PARSER = BytesParser(policy=email.policy.compat32)
# decodes the headers we read, as EmailMessage would
_DECODE = email.policy.default.clone(header_factory=_Registry())
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _message(raw: bytes) -> Message:
    """The parsed message. A single-part one is parsed up to its blank line only and
    takes the rest as its payload: the parser would walk every line of the body."""
    end = _HEADER_END.search(raw)
    if end is None:
        return _PARSER.parsebytes(raw)
    msg = _PARSER.parsebytes(raw[: end.end()], headersonly=True)
    if msg.get_content_maintype() in ("multipart", "message"):
        return _PARSER.parsebytes(raw)
    msg.set_payload(raw[end.end() :].decode("ascii", "surrogateescape"))
    return msg


def utf8(text: str) -> str:
    """Header text as UTF-8: the parser keeps raw 8-bit header bytes (RFC 6532, sent by
    SMTPUTF8 clients) as surrogate escapes, which cannot be encoded as JSON or sent on."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decoded(name: str, raw: str) -> object:
    """A header's value as the default policy parses it (an object with .addresses for
    address headers; str() the decoded text)."""
    return _DECODE.header_fetch_parse(name, raw)


def _raw_values(msg: Message, name: str) -> list[str]:
    """The header's values as the parser read them: 8-bit bytes (RFC 6532) kept as
    surrogate escapes, which the default policy decodes as UTF-8 (compat32's own
    accessors turn them into unknown-8bit Header objects)."""
    key = name.lower()
    return [str(value) for n, value in msg.raw_items() if n.lower() == key]


# a plain address or "Display Name <address>", where the name is words of atext and the
# address has nothing a quoted string, comment, group or route could start
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_ITEM = re.compile(rf"\s*(?:((?:{_ATEXT}[ \t]+)*{_ATEXT})?[ \t]*<({_ADDR})>|({_ADDR}))\s*")


def simple_addresses(value: str) -> list[Address] | None:
    """The addresses of an address list written in the plain form nearly all mail uses,
    without the full RFC 5322 parser (10x the time); None when it is anything more
    (quotes, comments, encoded words, groups, non-ASCII, a malformed item): the full
    parser decides those."""
    if not value.isascii() or "=?" in value:
        return None
    out = []
    for item in value.split(","):
        if not item.strip():
            continue
        m = _SIMPLE_ITEM.fullmatch(item)
        if m is None:
            return None
        name, bracketed, bare = m.groups()
        out.append(Address(bracketed or bare, " ".join((name or "").split())))
    return out


def _addresses(msg: Message, name: str) -> tuple[Address, ...]:
    out: list[Address] = []
    for raw in _raw_values(msg, name):
        simple = simple_addresses(raw)
        if simple is not None:
            out.extend(simple)
            continue
        try:
            addrs = _decoded(name, raw).addresses  # type: ignore[attr-defined]
        except (AttributeError, ValueError, IndexError):
            continue  # unparseable header: nothing we can address
        out.extend(
            Address(utf8(a.addr_spec), utf8(a.display_name or "")) for a in addrs if a.addr_spec
        )
    return tuple(out)


def _header_text(msg: Message, name: str) -> str:
    values = _raw_values(msg, name)
    if not values:
        return ""
    try:
        return utf8(str(_decoded(name, values[0])))
    except (ValueError, IndexError):
        return utf8(" ".join(values[0].split()))


def _content(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text(part: Message) -> str:
    raw = _content(part)
    charset = part.get_content_charset() or "us-ascii"
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return raw.decode("utf-8", errors="replace")


def _leaves(part: Message) -> Iterator[Message]:
    """The leaf parts in order; an attached message/rfc822 is one leaf, not walked into
    (its text is the forwarded mail's, not this message's body)."""
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        yield part
        return
    for sub in part.get_payload():
        if isinstance(sub, Message):
            yield from _leaves(sub)


def _filename(part: Message) -> str:
    """The part's file name, RFC 2231 and RFC 2047 (common, though not standard in a
    parameter) encodings decoded."""
    name = part.get_filename() or ""
    if "=?" in name:
        with contextlib.suppress(ValueError, LookupError, UnicodeDecodeError):
            name = str(make_header(decode_header(name)))  # else kept as written
    return utf8(name)


def _walk(msg: Message) -> tuple[str | None, str | None, list[Attachment]]:
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    for part in _leaves(msg):
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = _filename(part)
        cid = str(part.get("Content-ID") or "").strip().strip("<>")
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


def _attached_message(part: Message) -> bytes:
    """An attached message/rfc822 part as bytes (the parser holds it as a Message)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0].as_bytes(policy=email.policy.default)
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
    msg = _message(raw)
    from_ = _addresses(msg, "From")
    text, html, attachments = _walk(msg)
    others = []
    for name, raw_value in msg.raw_items():
        if name.lower() in STRUCTURAL:
            continue
        try:
            value = str(_decoded(name, str(raw_value)))
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
