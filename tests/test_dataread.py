"""DataReader: the DATA phase parser (end of data, unstuffing, limits, bare newlines)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import attrs
import pytest

from smtpproxy.ingress.dataread import DataReader, DataResult, Verdict

MiB = 1024 * 1024


def read(
    chunks: Sequence[bytes], size_limit: int | None = None, line_limit: int = 998
) -> DataResult | None:
    """Feed chunks until the reader decides; bytes never fed count as leftover."""
    reader = DataReader(size_limit, line_limit)
    for i, chunk in enumerate(chunks):
        result = reader.feed(chunk)
        if result is not None:
            unread = b"".join(chunks[i + 1 :])
            return attrs.evolve(result, leftover=result.leftover + unread)
    return None


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The data in one chunk, in every possible 2-way split, and byte by byte."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def read_every_way(data: bytes, size_limit: int | None = None) -> DataResult | None:
    """The one result the data gives however it is chunked (fails if chunking matters)."""
    example: dict[DataResult | None, list[bytes]] = {}
    for chunks in splits(data):
        example.setdefault(read(chunks, size_limit), chunks)
    assert len(example) == 1, example  # each distinct result with a chunking that gives it
    return next(iter(example))


def verdicts_every_way(data: bytes) -> set[Verdict | None]:
    """The verdicts the data gives over all chunkings (leftover ignored)."""
    return {r.verdict if r else None for r in map(read, splits(data))}


def ok(content: bytes, leftover: bytes = b"") -> DataResult:
    return DataResult(Verdict.OK, content, leftover)


def stuff(lines: Sequence[bytes]) -> bytes:
    """What an SMTP client sends for these lines: dot-stuffed, then the end of data."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + (
        b".\r\n"
    )


# -- end of data and unstuffing -----------------------------------------------------


def test_simple_body() -> None:
    """A plain two-line body comes back unchanged, CRLF included."""
    assert read([b"Subject: hi\r\n\r\nhello\r\n.\r\n"]) == ok(b"Subject: hi\r\n\r\nhello\r\n")


def test_empty_body() -> None:
    """A lone '.' line right after the 354 is an empty message."""
    assert read_every_way(b".\r\n") == ok(b"")


def test_empty_body_with_pipelined_command() -> None:
    """Commands pipelined after an empty body are returned as leftover."""
    assert read([b".\r\nQUIT\r\n"]) == ok(b"", b"QUIT\r\n")


def test_no_terminator_yet_returns_none() -> None:
    """Until the end-of-data line arrives the reader returns None."""
    reader = DataReader(None)
    assert reader.feed(b"hello\r\n") is None
    assert reader.feed(b"world\r\n.") is None
    assert reader.feed(b"\r") is None
    assert reader.feed(b"\n") == ok(b"hello\r\nworld\r\n")


def test_dot_lines_are_unstuffed() -> None:
    """'..' becomes '.', '...foo' becomes '..foo', other lines are untouched."""
    data = b"a\r\n..\r\n...foo\r\nb.c\r\n.\r\n"
    assert read_every_way(data) == ok(b"a\r\n.\r\n..foo\r\nb.c\r\n")


def test_first_line_dot_is_unstuffed() -> None:
    """A stuffed dot on the very first line is removed too."""
    assert read_every_way(b"..hidden\r\nx\r\n.\r\n") == ok(b".hidden\r\nx\r\n")


def test_terminator_split_across_chunks_gives_same_result() -> None:
    """Every 2-way split and byte-by-byte feeding give the one-chunk result."""
    data = b"From: a@x\r\n\r\n..dot\r\nbody\r\n.\r\n"
    assert read_every_way(data) == ok(b"From: a@x\r\n\r\n.dot\r\nbody\r\n")


def test_pipelined_bytes_come_back_as_leftover() -> None:
    """Bytes after the end of data are not content but leftover, however chunked."""
    data = b"body\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
    assert read_every_way(data) == ok(b"body\r\n", b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")


def test_only_the_first_terminator_ends_data() -> None:
    """A second '.' line in the pipelined bytes stays in the leftover."""
    assert read([b"a\r\n.\r\nb\r\n.\r\n"]) == ok(b"a\r\n", b"b\r\n.\r\n")


def test_dot_text_inside_lines_is_not_a_terminator() -> None:
    """'.' in mid-line, a line ending in '.', and '.x' lines do not end the data."""
    data = b"a.\r\nb.\r\n.\r\n"
    assert read_every_way(data) == ok(b"a.\r\nb.\r\n")


@pytest.mark.parametrize("seed", range(25))
def test_random_bodies_round_trip(seed: int) -> None:
    """Random dot-heavy CRLF bodies, stuffed and randomly chunked, unstuff to the original."""
    rng = random.Random(seed)
    alphabet = b"ab .\t-:="
    for _ in range(20):
        lines = []
        for _ in range(rng.randrange(0, 12)):
            text = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
            if rng.random() < 0.4:
                text = b"." * rng.randrange(1, 4) + text
            lines.append(text)
        original = b"".join(ln + b"\r\n" for ln in lines)
        leftover = rng.choice([b"", b"QUIT\r\n", b"RSET\r\nNOOP\r\n"])
        data = stuff(lines) + leftover
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 6))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert read(chunks) == ok(original, leftover), (lines, chunks)


# -- size limit --------------------------------------------------------------------


def test_body_exactly_at_size_limit_is_accepted() -> None:
    """A body (final CRLF included) exactly the size limit is accepted."""
    body = b"0123456789" * 10 + b"\r\n"
    assert read([body + b".\r\n"], size_limit=len(body)) == ok(body)


def test_body_one_byte_over_size_limit_is_too_big() -> None:
    """One byte over the limit is TOO_BIG, with the pipelined bytes still returned."""
    body = b"0123456789" * 10 + b"\r\n"
    result = read_every_way(body + b".\r\nQUIT\r\n", size_limit=len(body) - 1)
    assert result == DataResult(Verdict.TOO_BIG, leftover=b"QUIT\r\n")


@pytest.mark.parametrize("slack", [0, 1, 2])
def test_body_at_or_just_under_size_limit_is_accepted_however_chunked(slack: int) -> None:
    """A body at or 1-2 bytes under the limit is accepted however the '.\\r\\n' is split."""
    body = b"0123456789" * 10 + b"\r\n"
    assert read_every_way(body + b".\r\n", size_limit=len(body) + slack) == ok(body)


def test_size_counts_bytes_as_sent() -> None:
    """The limit applies to the stuffed bytes on the wire, not the unstuffed content."""
    data = b"..x\r\n.\r\n"  # 5 bytes sent, 4 bytes of content
    assert read([data], size_limit=5) == ok(b".x\r\n")
    assert read([data], size_limit=4) == DataResult(Verdict.TOO_BIG)


@pytest.mark.parametrize("limit", [None, 0])
def test_no_size_limit(limit: int | None) -> None:
    """None and 0 both mean no size limit."""
    body = b"x" * 500 + b"\r\n"
    assert read([body * 100, b".\r\n"], size_limit=limit) == ok(body * 100)


def test_huge_body_keeps_memory_bounded() -> None:
    """5 MiB over a 1 MiB limit in 64 KiB chunks: past the limit the buffer stays one chunk."""
    reader = DataReader(size_limit=MiB)
    data = (b"a" * 62 + b"\r\n") * (5 * MiB // 64)
    for i in range(0, len(data), 64 * 1024):
        assert reader.feed(data[i : i + 64 * 1024]) is None
        assert len(reader._buf) <= MiB + 64 * 1024 + 2
        if i >= MiB:
            assert len(reader._buf) < 70000
    assert reader.feed(b".\r\nQUIT\r\n") == DataResult(Verdict.TOO_BIG, leftover=b"QUIT\r\n")


def test_over_limit_terminator_split_across_chunks_is_found() -> None:
    """After discarding, a terminator straddling chunk boundaries still ends the data."""
    reader = DataReader(size_limit=100)
    assert reader.feed(b"x" * 300 + b"\r\n") is None
    assert reader.feed(b".") is None
    assert reader.feed(b"\r") is None
    assert reader.feed(b"\nNOOP\r\n") == DataResult(Verdict.TOO_BIG, leftover=b"NOOP\r\n")


def test_bare_newline_is_still_caught_beyond_size_limit() -> None:
    """A bare LF in the discarded part of an oversized body is still BARE_NEWLINE."""
    chunks = [b"x" * 200, b"y\nz" * 10, b"\r\n.\r\n"]
    assert read(chunks, size_limit=50) == DataResult(Verdict.BARE_NEWLINE)


# -- line length limit ----------------------------------------------------------------


def line_body(line: bytes) -> bytes:
    return b"short\r\n" + line + b"\r\nend\r\n.\r\n"


def test_998_char_line_is_accepted() -> None:
    """998 characters plus CRLF (1000 octets) is within the RFC 5321 limit."""
    line = b"x" * 998
    assert read([line_body(line)]) == ok(b"short\r\n" + line + b"\r\nend\r\n")


def test_999_char_line_is_rejected() -> None:
    """999 characters plus CRLF (1001 octets) without a stuffed dot is LINE_TOO_LONG."""
    assert read([line_body(b"x" * 999)]) == DataResult(Verdict.LINE_TOO_LONG)


@pytest.mark.parametrize("length", [1000, 1001, 5000])
def test_longer_lines_are_rejected(length: int) -> None:
    """Lines of 1000 characters and more are LINE_TOO_LONG."""
    assert read([line_body(b"x" * length)]) == DataResult(Verdict.LINE_TOO_LONG)


def test_long_line_verdict_keeps_leftover() -> None:
    """A LINE_TOO_LONG verdict still hands back the pipelined bytes."""
    result = read([line_body(b"x" * 2000) + b"QUIT\r\n"])
    assert result == DataResult(Verdict.LINE_TOO_LONG, leftover=b"QUIT\r\n")


@pytest.mark.parametrize("where", ["first", "middle"])
def test_stuffed_dot_line_may_use_the_extra_octet(where: str) -> None:
    """A dot-stuffed line of 998 characters (999 + CRLF on the wire) is accepted."""
    line = b"." + b"." + b"x" * 997  # content ".xxx…" (998 chars), sent stuffed
    data = line + b"\r\n.\r\n" if where == "first" else line_body(line)
    expected = line[1:] + b"\r\n" if where == "first" else b"short\r\n" + line[1:] + b"\r\nend\r\n"
    assert read([data]) == ok(expected)


def test_stuffed_dot_line_one_longer_is_rejected() -> None:
    """A stuffed line carrying 999 characters of content (1002 octets sent) is too long."""
    assert read([line_body(b".." + b"x" * 998)]) == DataResult(Verdict.LINE_TOO_LONG)


def test_custom_line_limit() -> None:
    """line_limit (smtp.max_line_length) counts the octets of a line without CRLF and
    without a stuffed dot."""
    assert read([b"abcd\r\n.\r\n"], line_limit=4) == ok(b"abcd\r\n")
    assert read([b"abcde\r\n.\r\n"], line_limit=4) == DataResult(Verdict.LINE_TOO_LONG)
    assert read([b"..bcd\r\n.\r\n"], line_limit=4) == ok(b".bcd\r\n")
    long = b"x" * 5000
    assert read([long + b"\r\n.\r\n"], line_limit=5000) == ok(long + b"\r\n")


# -- bare CR / bare LF (SMTP smuggling defence) -----------------------------------------

BARE = DataResult(Verdict.BARE_NEWLINE)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\nabc\r\n.\r\n", id="bare-lf-at-start"),
        pytest.param(b"\rabc\r\n.\r\n", id="bare-cr-at-start"),
        pytest.param(b"ab\ncd\r\n.\r\n", id="bare-lf-in-middle"),
        pytest.param(b"ab\rcd\r\n.\r\n", id="bare-cr-in-middle"),
        pytest.param(b"abc\r\r\n.\r\n", id="cr-before-crlf"),
        pytest.param(b"abc\r\n\n.\r\n", id="lf-after-crlf"),
        pytest.param(b"abc\n\r\n.\r\n", id="lf-before-crlf"),
        pytest.param(b"abc\r\n.\n", id="crlf-dot-lf"),
        pytest.param(b"abc\n.\r\n", id="lf-dot-crlf"),
        pytest.param(b"abc\n.\n", id="lf-dot-lf"),
        pytest.param(b"abc\r.\r", id="cr-dot-cr"),
        pytest.param(b"abc\r.\r\n", id="cr-dot-crlf"),
        pytest.param(b"abc\r\n.\rX", id="crlf-dot-cr"),
        pytest.param(b".\n", id="dot-lf-as-first-line"),
        pytest.param(b"abc\r\n.\nMAIL FROM:<evil@x>\r\n.\r\n", id="smuggling-attempt"),
    ],
)
def test_bare_newlines_are_rejected(data: bytes) -> None:
    """A bare CR or LF anywhere, or a dot line with a bare line end, is BARE_NEWLINE."""
    assert verdicts_every_way(data) == {Verdict.BARE_NEWLINE}
    assert read([data]) == BARE


def test_bare_lf_waits_for_a_dot_line() -> None:
    """After a bare LF the reader keeps reading until a proper terminator, then rejects."""
    reader = DataReader(None)
    assert reader.feed(b"abc\ndef\r\n") is None
    assert reader.feed(b"more text\r\n") is None
    assert reader.feed(b"\r\n.") is None
    assert reader.feed(b"\r\n") == BARE


@pytest.mark.parametrize("ending", [b".\n", b".\r", b"\n.\n"])
def test_bare_lf_then_loose_dot_line_ends_data(ending: bytes) -> None:
    """After a bare LF, a loose dot line (bare line end) also ends the data."""
    reader = DataReader(None)
    assert reader.feed(b"abc\ndef\r\n") is None
    assert reader.feed(ending) == BARE


def test_crlf_split_across_chunks_is_not_bare() -> None:
    """A CR ending one chunk and the LF starting the next form a proper CRLF."""
    assert read([b"abc\r", b"\ndef\r", b"\n.\r", b"\n"]) == ok(b"abc\r\ndef\r\n")


def test_every_split_of_a_crlf_body_is_clean() -> None:
    """No split of a CRLF-only body is mistaken for a bare CR or LF."""
    data = b"\r\n\r\nx\r\n\r\n..\r\n\r\n.\r\n"
    assert read_every_way(data) == ok(b"\r\n\r\nx\r\n\r\n.\r\n\r\n")


def test_bare_lf_straddling_a_chunk_boundary() -> None:
    """A CR ending one chunk followed by a non-LF byte is a bare CR."""
    assert read([b"abc\r", b"def\r\n.\r\n"]) == BARE
    assert read([b"abc", b"\ndef\r\n.\r\n"]) == BARE


def test_bare_lf_in_leftover_does_not_reject() -> None:
    """Bare newlines only in the bytes pipelined after a proper terminator are not checked."""
    data = b"body\r\n.\r\nRSET\nQUIT\r\n"
    assert read_every_way(data) == ok(b"body\r\n", b"RSET\nQUIT\r\n")


def test_bare_cr_right_after_terminator_does_not_reject() -> None:
    """A bare CR directly after the terminator belongs to the leftover."""
    assert read([b"body\r\n.\r\n\rX"]) == ok(b"body\r\n", b"\rX")
