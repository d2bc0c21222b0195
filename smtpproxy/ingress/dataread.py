"""The DATA phase as a sans-I/O parser: bytes in, one verdict out.

aiosmtpd reads DATA one line at a time, which is where stock aiosmtpd spends most of its
CPU (docs/architecture.md). This reader takes whole chunks and finds the end of data with
bytes.find. It enforces, in one pass:

* the end-of-data sequence <CRLF>.<CRLF> (an empty body too, via a virtual leading CRLF);
* SMTP smuggling defence: a bare LF or bare CR anywhere in the data rejects the message,
  and a "dot line" ended by a bare newline also ends the data, so the connection can be
  closed without ever reading what follows as commands (Postfix smtpd_forbid_bare_newline);
* the size limit, counted on the bytes as sent; beyond it the data is discarded while
  still looking for the end, so memory stays bounded;
* a line length limit (RFC 5322 2.1.1: 998 octets plus CRLF; smtp.max_line_length),
  measured after removing a stuffed dot (stock aiosmtpd lets every line have one octet
  more);
* dot-unstuffing (RFC 5321 4.5.2).

Bytes a client pipelined after the end of data are returned for the caller to push back.
"""

from __future__ import annotations

import enum
import re

import attrs

_TERM = b"\r\n.\r\n"
# any dot line whose line ends are not both CRLF: only searched for once a bare newline
# was seen, to find where a non-conforming client thinks the data ends
_LOOSE_TERM = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")


class Verdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"
    BARE_NEWLINE = "bare_newline"


@attrs.frozen
class DataResult:
    verdict: Verdict
    content: bytes = b""
    leftover: bytes = b""  # pipelined bytes after the end of data


class DataReader:
    """Feed it chunks until it returns a DataResult."""

    def __init__(self, size_limit: int | None, line_limit: int = 998) -> None:
        self._limit = size_limit or 0
        self._line_limit = line_limit
        self._buf = bytearray(b"\r\n")  # virtual CRLF so an empty body matches too
        self._dropped = 0  # bytes discarded once over the size limit
        self._scan = 0  # where the next terminator search starts
        self._lf_from = 2  # every LF before this index is known to follow a CR
        self._cr_from = 2  # every CR before this index is known to precede an LF
        self._bare = False
        self._loose_scan = 0

    def feed(self, chunk: bytes) -> DataResult | None:
        buf = self._buf
        buf += chunk
        end = buf.find(_TERM, self._scan)
        checked_to = end + 2 if end != -1 else len(buf)
        if not self._bare:
            self._bare = self._has_bare_newline(checked_to)
        if self._bare:
            m = _LOOSE_TERM.search(buf, max(self._loose_scan - 2, 0))
            if m is not None or end != -1:
                return DataResult(Verdict.BARE_NEWLINE)
            self._loose_scan = len(buf)
        if end == -1:
            self._scan = max(len(buf) - 4, 0)
            self._discard_over_limit()
            return None
        return self._finish(end)

    def _has_bare_newline(self, upto: int) -> bool:
        buf = self._buf
        # an LF at index k is fine when buf[k-1] is CR
        lfs = buf.count(b"\n", self._lf_from, upto)
        crlfs = buf.count(b"\r\n", self._lf_from - 1, upto)
        # a CR at index k is fine when buf[k+1] is LF; the last byte may still get its LF
        crs = buf.count(b"\r", self._cr_from, upto - 1)
        crlfs_cr = buf.count(b"\r\n", self._cr_from, upto)
        self._lf_from = upto
        self._cr_from = max(upto - 1, self._cr_from)
        return lfs != crlfs or crs != crlfs_cr

    def _discard_over_limit(self) -> None:
        buf = self._buf
        # up to 3 trailing bytes may be the start of the terminator (".", ".\r") rather
        # than body, so only more than limit + 3 bytes prove the body too big
        body_at_least = len(buf) - 2 + self._dropped - 3
        if not self._limit or body_at_least <= self._limit or len(buf) <= 8:
            return
        # keep the tail: the terminator (or a bare newline pair) may straddle chunks
        cut = len(buf) - 4
        del buf[:cut]
        self._dropped += cut
        self._scan = 0
        self._lf_from = max(self._lf_from - cut, 1)
        self._cr_from = max(self._cr_from - cut, 0)
        self._loose_scan = max(self._loose_scan - cut, 0)

    def _finish(self, end: int) -> DataResult:
        buf = self._buf
        leftover = bytes(buf[end + 5 :])
        del buf[end + 2 :]  # keep the CRLF that ends the last line
        if self._dropped:
            return DataResult(Verdict.TOO_BIG, leftover=leftover)
        del buf[:2]  # the virtual CRLF
        if self._limit and len(buf) > self._limit:
            return DataResult(Verdict.TOO_BIG, leftover=leftover)
        if buf.startswith(b"."):
            del buf[0]
        content = bytes(buf.replace(b"\r\n.", b"\r\n"))
        # lines are measured unstuffed, without CRLF (the stuffed dot is transport)
        longest_allowed = self._line_limit
        if len(content) > longest_allowed and (
            max(map(len, content.split(b"\r\n"))) > longest_allowed
        ):
            return DataResult(Verdict.LINE_TOO_LONG, leftover=leftover)
        return DataResult(Verdict.OK, content, leftover)
