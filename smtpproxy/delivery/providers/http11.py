"""A small HTTP/1.1 client for provider APIs, on trio: keep-alive connections, one pool
per provider, h11 for the protocol.

Why not httpx: profiled on a drain to an instant provider, httpx and httpcore cost
~0.5 ms of CPU per request (request and response models, auth and redirect layers,
cookies, and a pool that scans every connection for each request), a quarter of all
delivery CPU. A provider call needs much less: POST a body to one origin and read the
status, a few headers and a short body. This client does exactly that, and nothing a
provider call does not need: no redirects, no cookies, no decompression (providers
answer short JSON). HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured as httpx did, with
a CONNECT tunnel.

Errors: a request that got no complete answer raises TransportError (a transient
failure for every provider); Timeout when it took longer than the client's timeout.
"""

from __future__ import annotations

import collections
import functools
import os
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence

import attrs
import h11
import trio

READ_SIZE = 65536


class TransportError(Exception):
    """No complete HTTP answer: connection refused or broken, TLS failure, protocol error."""


class Timeout(TransportError):
    """No complete answer within the client's timeout."""


@attrs.frozen
class Response:
    status: int
    headers: Mapping[str, str]  # names lower-cased; a repeated header keeps the last
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@attrs.frozen
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str  # prefix of every request path ("" or "/v1", no trailing slash)

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def proxy_for(origin: Origin, environ: Mapping[str, str]) -> Origin | None:
    """The proxy the environment names for this origin (HTTPS_PROXY, HTTP_PROXY,
    ALL_PROXY, in either case; NO_PROXY exempts hosts and domains), as httpx reads it."""

    def env(name: str) -> str:
        return environ.get(name.lower()) or environ.get(name.upper()) or ""

    host = origin.host.lower()
    for raw in env("no_proxy").split(","):
        entry = raw.strip().lstrip(".").lower()
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    url = env(f"{origin.scheme}_proxy") or env("all_proxy")
    return Origin.parse(url if "://" in url else f"http://{url}") if url else None


@functools.cache
def _default_ssl() -> ssl.SSLContext:
    """One context for every provider: building one loads the system's CA store."""
    return ssl.create_default_context()


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class Client:
    """Keep-alive connections to one origin, at most max_connections at once."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_connections: int = 20,
        headers: Sequence[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self._slots = trio.Semaphore(max_connections)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._headers = [("Host", self.origin.host_header), ("User-Agent", "smtpproxy")]
        self._headers += list(headers)
        self._ssl = ssl_context
        self._proxy = proxy_for(self.origin, os.environ if environ is None else environ)
        self._closed = False

    async def post(
        self, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> Response:
        return await self.request("POST", path, body, headers)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> Response:
        """One request to a path under the base URL, or to a whole URL of the same origin;
        raises TransportError (Timeout) when no complete answer came."""
        target = self._target(path)
        all_headers = [*self._headers, *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append(("Content-Length", str(len(body))))
        async with self._slots:
            try:
                with trio.fail_after(self.timeout):
                    return await self._exchange(method, target, all_headers, body)
            except trio.TooSlowError:
                raise Timeout(f"no answer within {self.timeout:g} s") from None

    def _target(self, path: str) -> str:
        if "://" not in path:
            return self.origin.base_path + path
        other = Origin.parse(path)
        if (other.scheme, other.host, other.port) != (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        ):
            raise ValueError(f"{path!r} is not on {self.origin.host_header}")
        query = urllib.parse.urlsplit(path).query
        return (other.base_path or "/") + (f"?{query}" if query else "")

    async def _exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        # a kept-alive connection the server closed meanwhile fails on first use: that
        # request never reached the server, so one retry on a new connection is safe
        for fresh in (False, True):
            conn = None if fresh else await self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                response = await self._round_trip(conn, method, target, headers, body)
            except (TransportError, h11.ProtocolError, OSError, trio.BrokenResourceError) as exc:
                await conn.aclose()
                if reused and _unsent(conn):
                    continue
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(f"{type(exc).__name__}: {exc}") from None
            except BaseException:  # cancelled or timed out mid-exchange: never reuse it
                await conn.aclose()
                raise
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                self._idle.append(conn)
            else:
                await conn.aclose()
            return response
        raise TransportError("connection closed")  # not reached

    async def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection the server has not closed."""
        while self._idle:
            conn = self._idle.pop()
            if not _peer_closed(conn):
                return conn
            await conn.aclose()
        return None

    async def _connect(self) -> _Connection:
        hop = self._proxy or self.origin
        try:
            with trio.fail_after(self.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(hop.host, hop.port)
                try:
                    if self._proxy is not None and self.origin.scheme == "https":
                        await _tunnel(stream, self.origin)
                    if self.origin.scheme == "https":
                        tls = trio.SSLStream(
                            stream, self._ssl or _default_ssl(), server_hostname=self.origin.host
                        )
                        await tls.do_handshake()
                        stream = tls
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise Timeout(f"no connection within {self.connect_timeout:g} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            # trio reports a failed handshake as BrokenResourceError from the SSLError
            failed = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
            if isinstance(failed, ssl.SSLError):
                why = failed.reason or type(failed).__name__
                raise TransportError(f"TLS with {self.origin.host_header} failed: {why}") from None
            raise TransportError(f"cannot connect to {hop.host_header}") from None
        return _Connection(stream)

    async def _round_trip(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> Response:
        if self._proxy is not None and self.origin.scheme == "http":
            target = f"http://{self.origin.host_header}{target}"  # plain HTTP via a proxy
        h = conn.h11
        data = h.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += h.send(h11.Data(data=body))
        data += h.send(h11.EndOfMessage())
        await conn.stream.send_all(data)
        status = 0
        got: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                # b"" is the end of the stream: h11 then ends a body delimited by the
                # close, or raises for an incomplete one
                h.receive_data(bytes(await conn.stream.receive_some(READ_SIZE)))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, got, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("the server closed the connection")

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            await self._idle.pop().aclose()


def _unsent(conn: _Connection) -> bool:
    """Nothing of an answer arrived (the server had closed the idle connection)."""
    return conn.h11.their_state is h11.SEND_RESPONSE


def _peer_closed(conn: _Connection) -> bool:
    """An idle connection the server has closed (readable with nothing, or EOF)."""
    stream = conn.stream
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None
    )
    if sock is None:
        return False
    return bool(sock.is_readable())


async def _tunnel(stream: trio.abc.Stream, origin: Origin) -> None:
    """CONNECT through an HTTP proxy to origin."""
    authority = f"{origin.host}:{origin.port}"
    h = h11.Connection(h11.CLIENT)
    request = h11.Request(method="CONNECT", target=authority, headers=[("Host", authority)])
    await stream.send_all(h.send(request))
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(bytes(await stream.receive_some(READ_SIZE)))
            continue
        if isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                raise TransportError(f"proxy refused CONNECT: HTTP {event.status_code}")
            return
        if isinstance(event, h11.ConnectionClosed):
            raise TransportError("proxy closed the connection")
