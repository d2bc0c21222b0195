"""RelaySMTP against stock aiosmtpd 1.4.6 on the same wire input.

RelaySMTP overrides DATA, MAIL, RCPT, AUTH and EHLO and relies on aiosmtpd internals,
so these tests pin its behaviour to stock aiosmtpd's where they must agree (the bytes a
valid message arrives as, the reply class, what happens to pipelined commands) and
name the places where RelaySMTP is deliberately stricter (bare CR/LF, a 999-octet line,
addresses it would otherwise rewrite, data pipelined after a refused DATA).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from smtpproxy.ingress.gate import Gate
from smtpproxy.ingress.protocol import RelaySMTP
from smtpproxy.models import AccountIdentity

LIMIT = 4096
ACCOUNT = AccountIdentity(1, 1, "u", "t", ())


class Capture:
    """A handler that records what each server received."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []
        self.senders: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.original_content)
        self.senders.append(envelope.mail_from)
        return "250 OK"

    async def authenticate(self, server: Any, session: Any, login: bytes, password: bytes) -> Any:
        return ACCOUNT


class Server:
    def __init__(self, factory: Callable[[asyncio.AbstractEventLoop], Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self._factory = factory
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            srv = self.loop.run_until_complete(
                self.loop.create_server(lambda: factory(self.loop), "127.0.0.1", 0)
            )
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            srv.close()
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def servers() -> Iterator[tuple[tuple[Server, Capture], tuple[Server, Capture]]]:
    stock_cap, relay_cap = Capture(), Capture()
    stock = Server(lambda loop: SMTP(stock_cap, data_size_limit=LIMIT, loop=loop, hostname="s"))
    gate = Gate(100)
    relay = Server(
        lambda loop: RelaySMTP(
            relay_cap,
            gate=gate,
            auth_requires_tls=False,
            data_size_limit=LIMIT,
            loop=loop,
            hostname="r",
            enable_SMTPUTF8=True,
        )
    )
    yield (stock, stock_cap), (relay, relay_cap)
    stock.close()
    relay.close()


class Client:
    def __init__(self, port: int, auth: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.reply()
        self.cmd(b"EHLO client.test")
        if auth:
            token = base64.b64encode(b"\0u\0p")
            assert self.cmd(b"AUTH PLAIN " + token)[0] == 235

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def reply(self) -> tuple[int, str]:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return 0, "closed"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode()

    def cmd(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def transaction(self, wire: bytes) -> tuple[int, int]:
        """MAIL, RCPT, DATA, the raw DATA bytes; returns (DATA reply code, NOOP reply code)."""
        assert self.cmd(b"MAIL FROM:<a@example.com>")[0] == 250
        assert self.cmd(b"RCPT TO:<b@example.org>")[0] == 250
        assert self.cmd(b"DATA")[0] == 354
        self.sock.sendall(wire)
        code = self.reply()[0]
        try:
            after = self.cmd(b"NOOP")[0]
        except OSError:
            after = 0
        return code, after


def run_both(
    servers: Any, wire: bytes
) -> tuple[tuple[int, int, list[bytes]], tuple[int, int, list[bytes]]]:
    out = []
    for (server, cap), auth in zip(servers, (False, True), strict=True):
        with Client(server.port, auth) as client:
            code, after = client.transaction(wire)
        out.append((code, after, cap.contents))
    return out[0], out[1]


SAME = {
    "simple": b"Subject: x\r\n\r\nhello\r\n.\r\n",
    "empty body": b".\r\n",
    "dot stuffing": b"..\r\n...three\r\n.x\r\nend\r\n.\r\n",
    "first line stuffed": b"..leading\r\n.\r\n",
    "998-octet line": b"a" * 998 + b"\r\n.\r\n",
    "stuffed 998-octet line": b"." + b"." * 998 + b"\r\n.\r\n",
    "8-bit bytes": "Grüße, ☃\r\n".encode() + b"\xff\xfe\r\n.\r\n",
    "exactly at the size limit": (b"x" * 98 + b"\r\n") * (LIMIT // 100)
    + b"x" * (LIMIT % 100 - 2)
    + b"\r\n.\r\n",
    "over the size limit": (b"x" * 98 + b"\r\n") * (LIMIT // 100 + 1) + b".\r\n",
    "way over the size limit": (b"y" * 998 + b"\r\n") * 50 + b".\r\n",
    "pipelined after the dot": b"body\r\n.\r\nNOOP\r\n",
}


@pytest.mark.parametrize("wire", SAME.values(), ids=SAME.keys())
def test_same_as_stock(servers: Any, wire: bytes) -> None:
    """For conforming input RelaySMTP answers in the same class and stores the same bytes."""
    (s_code, s_after, s_content), (r_code, r_after, r_content) = run_both(servers, wire)
    assert r_code == s_code
    assert r_after == s_after == 250
    assert r_content == s_content


def test_pipelined_command_is_answered_once(servers: Any) -> None:
    """A NOOP sent in the same packet as the final dot is answered after the 250."""
    (_, relay_cap) = servers[1]
    with Client(servers[1][0].port, auth=True) as client:
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.cmd(b"RCPT TO:<b@example.org>")
        client.cmd(b"DATA")
        client.sock.sendall(b"x\r\n.\r\nNOOP\r\n")
        assert client.reply()[0] == 250  # the message
        assert client.reply()[0] == 250  # the pipelined NOOP
    assert relay_cap.contents == [b"x\r\n"]


STRICTER = {
    "bare LF": b"one\ntwo\r\n.\r\n",
    "bare CR": b"one\rtwo\r\n.\r\n",
    "LF dot CRLF smuggling": b"one\r\n\n.\r\nMAIL FROM:<evil@example.com>\r\n.\r\n",
    "CRLF dot LF smuggling": b"one\r\n.\nMAIL FROM:<evil@example.com>\r\n.\r\n",
}


@pytest.mark.parametrize("wire", STRICTER.values(), ids=STRICTER.keys())
def test_bare_newlines_are_refused_where_stock_accepts(servers: Any, wire: bytes) -> None:
    """Stock aiosmtpd stores data with bare CR/LF; RelaySMTP refuses it (550) and hangs up,
    so nothing after the ambiguous end of data is read as a command."""
    (s_code, _, s_content), (r_code, r_after, r_content) = run_both(servers, wire)
    assert s_code == 250 and s_content
    assert r_code == 550
    assert r_after == 0  # the connection is closed
    assert r_content == []


def test_999_octet_line_is_refused_where_stock_accepts(servers: Any) -> None:
    """RFC 5322 allows 998 octets plus CRLF; stock aiosmtpd lets one more through. The
    refusal names the problem (554 5.6.0), not an unknown command (500), and the session
    goes on."""
    (s_code, _, _), (r_code, r_after, r_content) = run_both(servers, b"a" * 999 + b"\r\n.\r\n")
    assert s_code == 250
    assert r_code == 554 and r_after == 250 and r_content == []


def test_null_sender(servers: Any) -> None:
    """MAIL FROM:<> (bounces, DSNs) is accepted by both; RelaySMTP records it as the
    empty reverse-path, where stock aiosmtpd keeps the literal string "<>"."""
    for (server, _), auth in zip(servers, (False, True), strict=True):
        with Client(server.port, auth) as client:
            assert client.cmd(b"MAIL FROM:<>")[0] == 250
            assert client.cmd(b"RCPT TO:<b@example.org>")[0] == 250
            assert client.cmd(b"DATA")[0] == 354
            client.sock.sendall(b"bounce\r\n.\r\n")
            assert client.reply()[0] == 250
    assert servers[0][1].senders == ["<>"]
    assert servers[1][1].senders == [""]


def test_replies_carry_enhanced_status_codes(servers: Any) -> None:
    """Every 2xx/4xx/5xx reply after the greeting has an enhanced status code."""
    with Client(servers[1][0].port, auth=True) as client:
        check_codes(client)


def check_codes(client: Client) -> None:
    for line, code in (
        (b"RCPT TO:<b@example.org>", 503),
        (b"MAIL FROM:<a@example.com> SIZE=99999999", 552),
        (b"MAIL FROM:<a@example.com>", 250),
        (b"MAIL FROM:<a@example.com>", 503),
        (b"RCPT TO:<>", 501),
        (b"BOGUS", 500),
        (b"NOOP", 250),
        (b"RSET", 250),
    ):
        got, text = client.cmd(line)
        assert got == code, (line, got, text)
        assert text[:1] == str(code)[0] and text[1] == "." and text.split()[0].count(".") == 2, text


BAD_ADDRESSES = {
    "NUL": b"bob\x00by@example.org",
    "invalid UTF-8": b"\xff\xfeuser@example.org",
    "control character": b"bob\x01by@example.org",
}


@pytest.mark.parametrize("address", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_an_address_is_refused_never_rewritten(servers: Any, address: bytes) -> None:
    """A NUL, a control character or invalid UTF-8 in an address is refused (553 5.1.3),
    in MAIL and in RCPT, even with SMTPUTF8: the relay must not deliver to another
    address than the one it was given."""
    with Client(servers[1][0].port, auth=True) as client:
        code, text = client.cmd(b"MAIL FROM:<" + address + b"> SMTPUTF8")
        assert (code, text[:5]) == (553, "5.1.3")
        assert client.cmd(b"MAIL FROM:<a@example.com> SMTPUTF8")[0] == 250
        code, text = client.cmd(b"RCPT TO:<" + address + b">")
        assert (code, text[:5]) == (553, "5.1.3")
        assert client.cmd(b"RCPT TO:<b@example.org>")[0] == 250


def test_utf8_addresses_need_the_smtputf8_parameter(servers: Any) -> None:
    """A UTF-8 address is refused with 553 5.6.7 unless MAIL declared SMTPUTF8 (as
    Postfix does), and taken when it did."""
    with Client(servers[1][0].port, auth=True) as client:
        code, text = client.cmd("MAIL FROM:<jörg@example.com>".encode())
        assert (code, text[:5]) == (553, "5.6.7")
        assert client.cmd(b"MAIL FROM:<a@example.com>")[0] == 250
        code, text = client.cmd("RCPT TO:<zoë@example.org>".encode())
        assert (code, text[:5]) == (553, "5.6.7")
        assert client.cmd(b"RSET")[0] == 250
        assert client.cmd("MAIL FROM:<jörg@example.com> SMTPUTF8".encode())[0] == 250
        assert client.cmd("RCPT TO:<zoë@example.org>".encode())[0] == 250
        assert client.cmd(b"DATA")[0] == 354
        client.sock.sendall(b"hi\r\n.\r\n")
        assert client.reply()[0] == 250
    assert servers[1][1].senders == ["jörg@example.com"]


def test_a_message_pipelined_after_a_refused_data_is_never_read_as_commands(
    servers: Any,
) -> None:
    """DATA refused (no recipient) with the message already sent behind it: the session
    ends (421) instead of running the MAIL/RCPT/DATA inside that message."""
    inner = b"MAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nevil\r\n.\r\n"
    with Client(servers[1][0].port, auth=True) as client:
        assert client.cmd(b"MAIL FROM:<a@example.com>")[0] == 250
        client.sock.sendall(b"RCPT TO:<>\r\nDATA\r\n" + inner + b"QUIT\r\n")
        codes = [client.reply()[0] for _ in range(4)]
    assert codes[:3] == [501, 503, 421]
    assert codes[3] == 0  # closed: nothing more was answered
    assert servers[1][1].contents == []


def test_help_works_before_auth(servers: Any) -> None:
    """HELP is advertised in EHLO, so it must answer before AUTH too."""
    with Client(servers[1][0].port, auth=False) as client:
        assert client.cmd(b"HELP")[0] == 250
        assert client.cmd(b"HELP MAIL")[0] == 250


def test_data_trickling_below_the_minimum_rate_is_cut_off() -> None:
    """A client trickling message data (a byte at a time, each before the idle timeout)
    is told 421 4.4.2 once it falls behind timeout + bytes / min_data_rate."""
    cap = Capture()
    server = Server(
        lambda loop: RelaySMTP(
            cap,
            gate=Gate(10),
            auth_requires_tls=False,
            loop=loop,
            hostname="r",
            timeout=1,
            min_data_rate=100,
        )
    )
    try:
        with Client(server.port, auth=True) as client:
            assert client.cmd(b"MAIL FROM:<a@example.com>")[0] == 250
            assert client.cmd(b"RCPT TO:<b@example.org>")[0] == 250
            assert client.cmd(b"DATA")[0] == 354
            started = time.monotonic()
            code, text = 0, ""
            for _ in range(100):  # 0.2 s a byte: never idle for 1 s, 5 bytes a second
                try:
                    client.sock.sendall(b"x")
                except OSError:
                    break
                client.sock.settimeout(0.2)
                try:
                    code, text = client.reply()
                    break
                except TimeoutError:
                    continue
            took = time.monotonic() - started
    finally:
        server.close()
    assert (code, text[:5]) == (421, "4.4.2")
    assert 1 <= took < 3
    assert cap.contents == []


def test_a_finished_session_is_freed_without_a_garbage_collection() -> None:
    """When a session ends, its protocol (with its TLS state and buffers) is freed by
    reference counting at once: no reference cycle keeps it for the next full garbage
    collection (2,000 closed STARTTLS sessions used to hold ~100 MB until then)."""
    made: list[weakref.ref[RelaySMTP]] = []

    def factory(loop: asyncio.AbstractEventLoop) -> RelaySMTP:
        protocol = RelaySMTP(Capture(), gate=Gate(10), auth_requires_tls=False, loop=loop)
        made.append(weakref.ref(protocol))
        return protocol

    server = Server(factory)
    gc.disable()
    try:
        for quit_first in (True, False):
            with Client(server.port, auth=True) as client:
                assert client.cmd(b"MAIL FROM:<a@example.com>")[0] == 250
                if quit_first:
                    assert client.cmd(b"QUIT")[0] == 221
        deadline = time.monotonic() + 5
        while any(ref() is not None for ref in made) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [ref() is not None for ref in made]
    finally:
        gc.enable()
        server.close()
    assert alive == [False, False]
