"""The MIME message Graph is given, as pure functions: the envelope written into its
header, the From field Exchange accepts, and the split of a large message into a draft
and the attachments sent after it.

Recipients: Graph sends a MIME message to the addresses in its To, Cc and Bcc header
fields (Exchange never shows Bcc to recipients); it has no envelope. prepare_mime()
makes the headers say exactly this delivery's envelope:
  - every envelope recipient that no To/Cc/Bcc field names is added in one Bcc field
    at the top of the header (merged with a Bcc field the message already has, which
    is then taken out), so Bcc recipients and route groups of envelope-only recipients
    are reached and nobody sees them; nothing else in the message changes;
  - when a To/Cc/Bcc (or Resent-To/Cc/Bcc) field names an address that is not an
    envelope recipient of this delivery, the delivery is refused as permanent, without
    a request: Graph would send to that address too, which the SMTP client did not ask
    for (a message split across providers, or headers that differ from the envelope,
    such as a mailing list's). Addresses compare case-insensitively, domains by their
    Punycode form.

From: Exchange refuses a From field whose display name contains "@" (scanners write
`"scanner@corp.example" <scanner@corp.example>`) as if Send As were denied; such a
display name is dropped, the address kept (normalise_from).

Large messages: one Graph request carries at most 4 MB, so about 3 MB of MIME. A larger
message becomes a draft created from its MIME without its largest attachments
(split_large), then those attachments: under 3 MB each in one request, larger ones
through an upload session, then `send`.
"""

from __future__ import annotations

import base64
import contextlib
import email.header
import email.policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from io import BytesIO

import attrs

from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import Delivery

MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_RECIPIENTS = 500
RECIPIENT_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
BCC_LINE = 78
# a draft's MIME, in base64, must fit one request with room to spare
DRAFT_LIMIT = MAX_REQUEST_BYTES - 64 * 1024
SMALL_ATTACHMENT = 3 * 1000 * 1000  # under this, one request; else an upload session

_HEADERS = BytesHeaderParser(policy=email.policy.default)
_STRUCTURE = BytesParser(policy=email.policy.compat32)


class RequestError(ValueError):
    """The delivery cannot be sent as this MIME message through Graph (permanent)."""


# ---------------------------------------------------------------------------- the message


def _key(address: str) -> str:
    """An address as compared: lower case, the domain in Punycode."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):  # not a valid IDN: compared as it is
            domain = domain.encode("idna").decode("ascii")
    return f"{local}@{domain}".lower()


def header_recipients(raw: bytes, fields: tuple[str, ...] = RECIPIENT_FIELDS) -> list[str]:
    """The addresses of the To, Cc, Bcc (and Resent-) fields, in order.

    Raises RequestError when such a field cannot be read: Graph would still address
    the message from it, to recipients nobody can check.
    """
    msg = _HEADERS.parsebytes(raw)
    out: list[str] = []
    for name in fields:
        for value in msg.get_all(name) or []:
            try:
                addresses = value.addresses
            except (AttributeError, ValueError, IndexError):
                raise RequestError(f"cannot read the {name.title()} header field") from None
            out.extend(_unescape(a.addr_spec) for a in addresses if a.addr_spec)
    return out


def _unescape(text: str) -> str:
    """Header text as UTF-8: the parser keeps 8-bit bytes (RFC 6532) as surrogates."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header_block(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(header lines with their line ends, the rest from the blank line on, newline)."""
    first = raw.find(b"\n")
    newline = b"\r\n" if first > 0 and raw[first - 1 : first] == b"\r" else b"\n"
    lines: list[bytes] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        pos = end
    return lines, raw[pos:], newline


def _fields(lines: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """The header's fields in order: (name in lower case, its lines with continuations)."""
    out: list[tuple[bytes, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:  # a continuation of the field before
            out[-1][1].append(line)
        else:
            out.append((line.split(b":", 1)[0].strip().lower(), [line]))
    return out


def _without_bcc(lines: list[bytes]) -> list[bytes]:
    return [line for name, field in _fields(lines) if name != b"bcc" for line in field]


def _bcc_field(addresses: list[str], newline: bytes) -> bytes:
    """One Bcc field, folded between addresses to keep lines near 78 characters."""
    lines: list[str] = []
    current = "Bcc: " + addresses[0]
    for address in addresses[1:]:
        if len(current) + 2 + len(address) > BCC_LINE:
            lines.append(current + ",")
            current = " " + address
        else:
            current += ", " + address
    lines.append(current)
    return b"".join(line.encode("utf-8") + newline for line in lines)


def prepare_mime(delivery: Delivery) -> bytes:
    """The MIME message Graph is to send: the body, with a Bcc field for the envelope
    recipients its header does not name. Raises RequestError when the header names an
    address that is not a recipient of this delivery (see the module docstring)."""
    envelope = {_key(r): r for r in delivery.recipients}
    if not envelope:
        raise RequestError("no recipients")
    if len(envelope) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one Graph message")
    if any("\r" in r or "\n" in r for r in envelope.values()):
        raise RequestError("a recipient address contains a line break")
    named = header_recipients(delivery.body)
    named_keys = {_key(a) for a in named}
    strangers = [a for a in dict.fromkeys(named) if _key(a) not in envelope]
    if strangers:
        raise RequestError(
            "the header names recipients that are not in this delivery's envelope, and "
            f"Graph sends to every address in To/Cc/Bcc: {http.short(', '.join(strangers), 200)}"
        )
    missing = [r for key, r in envelope.items() if key not in named_keys]
    if not missing:
        return delivery.body
    lines, rest, newline = _header_block(delivery.body)
    blind = {_key(a): a for a in [*header_recipients(delivery.body, ("bcc",)), *missing]}
    return _bcc_field(list(blind.values()), newline) + b"".join(_without_bcc(lines)) + rest


def header_from(raw: bytes) -> str:
    """The address of the From header field ("" when there is none or it cannot be
    read)."""
    try:
        value = _HEADERS.parsebytes(raw).get("from")
        addresses = value.addresses if value is not None else ()
    except (AttributeError, ValueError, IndexError):
        return ""
    return _unescape(addresses[0].addr_spec) if addresses else ""


def normalise_from(raw: bytes) -> bytes:
    """The message with a From display name that contains "@" dropped (the address
    kept): Exchange refuses such a From as if Send As were denied. Anything else is
    returned as it is."""
    lines, rest, newline = _header_block(raw)
    fields = _fields(lines)
    for i, (name, field) in enumerate(fields):
        if name != b"from":
            continue
        value = b"".join(field).split(b":", 1)[1].decode("ascii", "surrogateescape").strip()
        try:
            addresses = email.policy.default.header_factory("From", value).addresses
        except (AttributeError, ValueError, IndexError):
            return raw
        if len(addresses) != 1 or "@" not in (addresses[0].display_name or ""):
            return raw
        spec = addresses[0].addr_spec.encode("utf-8", "surrogateescape")
        fields[i] = (name, [b"From: " + spec + newline])
        return b"".join(line for _, f in fields for line in f) + rest
    return raw


def sending_mime(delivery: Delivery) -> bytes:
    """The MIME message to give Graph for this delivery (its envelope in the header,
    its From as Exchange takes it)."""
    return normalise_from(prepare_mime(delivery))


def request_size(mime: bytes) -> int:
    """Bytes of a MIME message once base64-encoded, as a Graph request carries it."""
    return (len(mime) + 2) // 3 * 4


def build_request(delivery: Delivery) -> bytes:
    """The sendMail request body: the prepared MIME message in base64 (ASCII, one line).

    Raises RequestError when Graph cannot take it (recipients, or over 4 MB)."""
    payload = base64.b64encode(sending_mime(delivery))
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestError(
            f"message too large for Graph ({len(payload)} bytes in base64, "
            f"{MAX_REQUEST_BYTES} per request)"
        )
    return payload


# ---------------------------------------------------------------------------- large mail


@attrs.frozen
class Detached:
    """An attachment taken out of a large message, to be attached to its draft."""

    name: str
    content_type: str
    content: bytes = attrs.field(repr=False)
    inline: bool = False
    content_id: str = ""

    @property
    def small(self) -> bool:
        """Attached in one request (under 3 MB), else through an upload session."""
        return len(self.content) < SMALL_ATTACHMENT


def _attachment_leaves(msg: Message) -> list[tuple[Message, Message]]:
    """(parent, part) of every leaf that is an attachment or inline part, not the text or
    HTML body (the first text/plain and text/html without a file name)."""
    out: list[tuple[Message, Message]] = []
    seen_body: set[str] = set()

    def walk(part: Message) -> None:
        for sub in part.get_payload():
            if not isinstance(sub, Message):
                continue
            ctype = sub.get_content_type()
            if sub.is_multipart() and ctype != "message/rfc822":
                walk(sub)
                continue
            disposition = (sub.get_content_disposition() or "").lower()
            body = (
                ctype in ("text/plain", "text/html")
                and disposition != "attachment"
                and not sub.get_filename()
                and ctype not in seen_body
            )
            if body:
                seen_body.add(ctype)
            else:
                out.append((part, sub))

    if msg.is_multipart():
        walk(msg)
    return out


def _detach(part: Message, n: int) -> Detached:
    ctype = part.get_content_type()
    payload = part.get_payload(decode=True)
    if ctype == "message/rfc822" or not isinstance(payload, bytes):
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            payload = inner[0].as_bytes()
        else:
            payload = b""
    name = part.get_filename() or f"attachment{n}"
    with contextlib.suppress(ValueError, LookupError, UnicodeDecodeError):
        name = str(email.header.make_header(email.header.decode_header(name)))
    cid = str(part.get("Content-ID") or "").strip().strip("<>")
    disposition = (part.get_content_disposition() or "").lower()
    return Detached(
        name=name,
        content_type=ctype,
        content=payload,
        inline=disposition == "inline" or (bool(cid) and disposition != "attachment"),
        content_id=cid,
    )


def _flatten(msg: Message) -> bytes:
    out = BytesIO()
    policy = email.policy.compat32.clone(linesep="\r\n")
    BytesGenerator(out, mangle_from_=False, policy=policy).flatten(msg)
    return out.getvalue()


def split_large(mime: bytes, limit: int = DRAFT_LIMIT) -> tuple[bytes, list[Detached]]:
    """A message too big for one request: (the MIME of a draft without its largest
    attachments, those attachments), detaching the largest first until the draft fits.
    A message that fits comes back whole. Raises RequestError when even the message
    without any attachment does not fit."""
    if request_size(mime) <= limit:
        return mime, []
    msg = _STRUCTURE.parsebytes(mime)
    leaves = sorted(
        _attachment_leaves(msg), key=lambda pair: len(str(pair[1].get_payload())), reverse=True
    )
    detached: list[Detached] = []
    draft = mime
    for parent, part in leaves:
        detached.append(_detach(part, len(detached) + 1))
        siblings = parent.get_payload()
        assert isinstance(siblings, list)  # a parent found by walking a multipart
        siblings.remove(part)
        draft = _flatten(msg)
        if request_size(draft) <= limit:
            return draft, detached
    raise RequestError(
        f"the message without its attachments is still over {MAX_REQUEST_BYTES} bytes "
        "in base64 (Graph's limit per request)"
    )
