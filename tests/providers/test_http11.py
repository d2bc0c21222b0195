"""The providers' HTTP/1.1 client (delivery/providers/http11.py) against real servers on
127.0.0.1: keep-alive reuse, the pool's limit, answers with a length, chunked or ended by
close, idle connections the server closed, timeouts, refused connections, a server
that hangs up mid-answer, and the proxy settings of the environment (with a CONNECT
tunnel through a real proxy)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from smtpproxy.delivery.providers.http11 import Client, Origin, Timeout, TransportError, proxy_for
from smtpproxy.ingress.tls import generate_self_signed
from tests.support.net import closed_port

Handler = Callable[[trio.SocketStream, bytes], Awaitable[bool]]  # False: close after


async def _read_request(stream: trio.abc.Stream, buf: bytearray) -> bytes | None:
    """One request (headers and a Content-Length body) from the stream, None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buf[:end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < end + length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    request = bytes(buf[: end + length])
    del buf[: end + length]
    return request


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """An HTTP server on 127.0.0.1 calling handler(stream, request) per request; yields
    (base URL, the number of requests each connection carried)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    per_connection: list[int] = []

    async def serve(stream: trio.SocketStream) -> None:
        index = len(per_connection)
        per_connection.append(0)
        buf = bytearray()
        async with stream:
            while (request := await _read_request(stream, buf)) is not None:
                per_connection[index] += 1
                if not await handler(stream, request):
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, [listener])
        yield f"http://127.0.0.1:{port}", per_connection
        nursery.cancel_scope.cancel()


def answer(status: int, body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def ok(stream: trio.SocketStream, request: bytes) -> bool:
    await stream.send_all(answer(202, b'{"ok":true}', "X-Message-Id: abc\r\n"))
    return True


async def test_requests_reuse_connections_up_to_the_limit() -> None:
    """40 requests, 4 at a time on a client limited to 4 connections: every answer is
    read, and no more than 4 connections are ever opened."""
    async with server(ok) as (url, per_connection):
        client = Client(url, max_connections=4)
        statuses = []

        async def post() -> None:
            r = await client.post("/v3/mail/send", b"x" * 10_000, [("X-Key", "k")])
            statuses.append((r.status, r.headers["x-message-id"], r.body))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(post)
        await client.aclose()
    assert statuses == [(202, "abc", b'{"ok":true}')] * 40
    assert len(per_connection) <= 4 and sum(per_connection) == 40


async def test_base_path_and_absolute_urls_of_the_same_origin() -> None:
    seen: list[bytes] = []

    async def record(stream: trio.SocketStream, request: bytes) -> bool:
        seen.append(request.split(b"\r\n", 1)[0])
        return await ok(stream, request)

    async with server(record) as (url, _):
        client = Client(url + "/api/")
        with trio.fail_after(10):
            await client.post("/send", b"{}")
            await client.post(url + "/v3/x/messages.mime?a=1", b"{}")
            with pytest.raises(ValueError, match="not on"):
                await client.post("http://elsewhere.example/x", b"{}")
        await client.aclose()
    assert seen == [b"POST /api/send HTTP/1.1", b"POST /v3/x/messages.mime?a=1 HTTP/1.1"]


async def test_chunked_and_close_delimited_answers() -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbroken for now",
        ]
    )

    async def scripted(stream: trio.SocketStream, request: bytes) -> bool:
        data = next(answers)
        await stream.send_all(data)
        return b"close" not in data

    async with server(scripted) as (url, per_connection):
        client = Client(url)
        with trio.fail_after(10):
            first = await client.post("/", b"a")
            second = await client.post("/", b"b")
        await client.aclose()
    assert (first.status, first.body) == (200, b"hello world")
    assert (second.status, second.text) == (500, "broken for now")
    assert per_connection == [2]


async def test_an_idle_connection_the_server_closed_is_not_an_error() -> None:
    """A server that closes each connection after one answer (without saying so): the
    next request finds the kept connection dead and opens another."""

    async def once(stream: trio.SocketStream, request: bytes) -> bool:
        await ok(stream, request)
        return False

    async with server(once) as (url, per_connection):
        client = Client(url)
        with trio.fail_after(10):
            for _ in range(3):
                assert (await client.post("/", b"{}")).status == 202
                await trio.sleep(0.05)
        await client.aclose()
    assert per_connection == [1, 1, 1]


async def test_timeouts_refusals_and_broken_answers_are_transport_errors() -> None:
    async def silent(stream: trio.SocketStream, request: bytes) -> bool:
        await trio.sleep_forever()
        return False

    async def half(stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        return False

    with trio.fail_after(10):
        async with server(silent) as (url, _):
            client = Client(url, timeout=0.3)
            with pytest.raises(Timeout, match=r"no answer within 0\.3 s"):
                await client.post("/", b"{}")
            await client.aclose()
        async with server(half) as (url, per_connection):
            client = Client(url)
            with pytest.raises(TransportError, match="closed"):
                await client.post("/", b"{}")
            await client.aclose()
        assert per_connection == [1]  # an answer had started: never sent again
        refused = Client(f"http://127.0.0.1:{closed_port()}")
        with pytest.raises(TransportError, match=r"cannot connect to 127\.0\.0\.1:"):
            await refused.post("/", b"{}")


def test_proxy_settings_from_the_environment() -> None:
    api = Origin.parse("https://api.sendgrid.com")
    assert proxy_for(api, {}) is None
    assert proxy_for(api, {"HTTPS_PROXY": "proxy.lan:3128"}) == Origin(
        "http", "proxy.lan", 3128, ""
    )
    assert proxy_for(api, {"https_proxy": "http://p:1", "NO_PROXY": ".sendgrid.com"}) is None
    assert proxy_for(api, {"HTTP_PROXY": "http://p:1"}) is None  # only for http:// URLs
    assert proxy_for(api, {"ALL_PROXY": "http://p:1", "no_proxy": "*"}) is None


async def test_plain_http_through_a_proxy_and_https_through_a_connect_tunnel() -> None:
    """HTTP_PROXY: the request goes to the proxy with an absolute URL. HTTPS_PROXY: the
    client asks the proxy to CONNECT, then speaks TLS through the tunnel (the proxy
    here refuses, after checking what it was asked)."""
    asked: list[bytes] = []

    async def proxy(stream: trio.SocketStream, request: bytes) -> bool:
        asked.append(request.split(b"\r\n", 1)[0])
        if request.startswith(b"CONNECT"):
            await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return False
        return await ok(stream, request)

    async with server(proxy) as (proxy_url, _):
        plain = Client("http://api.example.test:8080/v1", environ={"HTTP_PROXY": proxy_url})
        secure = Client("https://api.example.test", environ={"HTTPS_PROXY": proxy_url})
        with trio.fail_after(10):
            assert (await plain.post("/send", b"{}")).status == 202
            with pytest.raises(TransportError, match="proxy refused CONNECT: HTTP 403"):
                await secure.post("/send", b"{}")
        await plain.aclose()
    assert asked == [
        b"POST http://api.example.test:8080/v1/send HTTP/1.1",
        b"CONNECT api.example.test:443 HTTP/1.1",
    ]


async def test_https_keeps_its_tls_connections_and_verifies_the_certificate(
    tmp_path: Path,
) -> None:
    """Over TLS: the certificate is verified against the given trust (a wrong one is a
    TransportError naming TLS), and the connection is kept for the next requests."""
    cert, key = generate_self_signed(tmp_path / "tls", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    connections: list[int] = []

    async def serve(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, server_ctx, server_side=True)
        connections.append(0)
        buf = bytearray()
        try:
            while (await _read_request(stream, buf)) is not None:
                connections[-1] += 1
                await stream.send_all(answer(200, b"{}"))
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    trusted = ssl.create_default_context(cafile=str(cert))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, [listener])
        client = Client(f"https://localhost:{port}", ssl_context=trusted)
        stranger = Client(f"https://localhost:{port}")  # the system's CAs only
        with trio.fail_after(10):
            for _ in range(5):
                assert (await client.post("/", b"{}")).status == 200
            with pytest.raises(TransportError, match="TLS with localhost"):
                await stranger.post("/", b"{}")
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert connections[0] == 5
