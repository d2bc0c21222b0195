"""The header summary kept in PostgreSQL: Subject, Message-ID, From, To, Cc. Pure.

Only the header block is scanned (up to the first empty line), with the obvious
tolerance for folded lines and bare LF; values are unfolded, RFC 2047 words in the
subject are decoded, NULs removed and lengths capped, so any input is safe to store.
"""

from __future__ import annotations

import email.header

from smtpproxy.models import HeaderSummary

_WANTED = {b"subject", b"message-id", b"from", b"to", b"cc"}
_MAX = 998


def _header_lines(raw: bytes) -> list[bytes]:
    """The lines before the first empty line (the header block), at most 64 KiB of them."""
    lines = []
    for line in raw[:65536].splitlines():
        if not line:
            break
        lines.append(line)
    return lines


def _clean(value: str) -> str:
    return " ".join(value.replace("\x00", "").split())[:_MAX]


def decode_subject(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def summarize(raw: bytes) -> HeaderSummary:
    """The first occurrence of each wanted header, unfolded and cleaned."""
    fields: dict[bytes, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in _header_lines(raw):
        if line[:1] in (b" ", b"\t"):  # a folded continuation line
            if current is not None:
                current.append(line)
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key in _WANTED and key not in fields:
            current = fields[key] = [value]
        else:
            current = None
    values = {k: _clean(b" ".join(v).decode("utf-8", "replace")) for k, v in fields.items()}
    return HeaderSummary(
        subject=_clean(decode_subject(values.get(b"subject", ""))),
        message_id=values.get(b"message-id", "").strip("<>"),
        from_=values.get(b"from", ""),
        to=values.get(b"to", ""),
        cc=values.get(b"cc", ""),
    )
