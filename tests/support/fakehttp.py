"""The harness every fake provider API in tests/support is built on (fake_sendgrid,
fake_mailgun, fake_postmark, fake_graph).

A FakeHTTP is a real HTTP/1.1 server (http.server.ThreadingHTTPServer on 127.0.0.1, a
free port, serving from a daemon thread, keep-alive as httpx expects). For each request,
whatever its method, it builds a record (a ReceivedRequest, or the fake's subclass of
it), lets the fake's ``_answer()`` check it and decide the answer, then records the
request and what it was answered in ``requests`` and every reason it was refused in
``errors``. ``_answer()`` refuses by returning an error answer after filling in
``record.errors``, or by raising Refused.

Scripting: ``respond_with()`` queues answers that the fake hands out, in order, through
``_scripted()``; bodies are given as dict or list (sent as JSON), str (UTF-8 text),
bytes (as they are) or None (empty).

    class FakeExample(FakeHTTP[ReceivedRequest]):
        server_version = "FakeExample/1"

        def __init__(self) -> None:
            super().__init__(ReceivedRequest)

        def _answer(self, record: ReceivedRequest) -> Answer:
            return self._scripted() or Answer.of(200, {"ok": True})
"""

from __future__ import annotations

import collections
import json
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, NamedTuple, Self, TypeVar

from tests.support.lifecycle import StartStop


@dataclass
class ReceivedRequest:
    """One request as the fake saw it, and how it answered."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    raw: bytes  # the body as received
    errors: list[str] = field(default_factory=list)  # why it was refused; [] if valid
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def accepted(self) -> bool:
        """Valid, and answered with a 2xx status."""
        return self.valid and 200 <= self.status < 300


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]

    @classmethod
    def of(
        cls, status: int, body: object = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        """An answer with body as the fake sends it: a dict or list as JSON, str as UTF-8
        text (each with a Content-Type unless headers give one), bytes as they are, None
        as an empty body."""
        out = dict(headers or {})
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            out.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            data = body.encode()
            out.setdefault("Content-Type", "text/plain; charset=utf-8")
        elif isinstance(body, bytes):
            data = body
        elif body is None:
            data = b""
        else:
            raise TypeError(f"cannot send a {type(body).__name__} body")
        return cls(status, data, out)


class Refused(Exception):
    """Raised by a fake's checks: answer the request with answer, refused for reason."""

    def __init__(self, answer: Answer, reason: str) -> None:
        super().__init__(reason)
        self.answer = answer
        self.reason = reason


R = TypeVar("R", bound=ReceivedRequest)


class FakeHTTP(StartStop, Generic[R]):
    """The server, the records and the scripted answers; subclasses give ``_answer()``."""

    server_version = "FakeHTTP/1"  # the Server header's product

    def __init__(self, record_type: type[R]) -> None:
        self.requests: list[R] = []
        self.errors: list[str] = []  # every reason any request was refused, in order
        self._record_type = record_type
        self._answers: collections.deque[Answer] = collections.deque()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # called with each record after its answer is decided, before it is sent: a test
        # can make something happen between the provider's acceptance and our client
        # hearing of it
        self.before_reply: Callable[[R], None] | None = None

    # lifecycle

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        """The base URL, http://127.0.0.1:PORT (still known after stop())."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # scripting

    def respond_with(
        self, status: int, body: object = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Queue the answer to the next valid request (answers are used in order).

        body: a dict or list is sent as JSON, str as UTF-8 text, bytes as they are,
        None as an empty body. Headers are sent as given.
        """
        answer = Answer.of(status, body, headers)
        with self._lock:
            self._answers.append(answer)

    @property
    def accepted(self) -> list[R]:
        """The requests that were valid and answered 2xx."""
        with self._lock:
            return [r for r in self.requests if r.accepted]

    # request handling (called from the server's threads)

    @abstractmethod
    def _answer(self, record: R) -> Answer:
        """Check the request (filling in the record) and decide its answer."""

    def _scripted(self) -> Answer | None:
        """The next answer queued with respond_with(), None when there is none."""
        with self._lock:
            return self._answers.popleft() if self._answers else None

    def _record(self, record: R) -> None:
        with self._lock:
            self.requests.append(record)
            self.errors.extend(record.errors)

    def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        record = self._record_type(method=method, path=path, headers=headers, raw=raw)
        try:
            answer = self._answer(record)
        except Refused as refused:
            record.errors.append(refused.reason)
            answer = refused.answer
        record.status = answer.status
        record.response_headers = dict(answer.headers)
        record.response_body = answer.body
        self._record(record)
        if self.before_reply is not None:
            self.before_reply(record)
        return answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of new connections (a consumer
    # starting many deliveries at once, as a real API takes them) would see SYNs dropped
    request_queue_size = 256
    fake: FakeHTTP[Any]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 30  # an idle keep-alive connection's thread ends after this

    def version_string(self) -> str:
        return f"{self.server.fake.server_version} {self.sys_version}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: requests are recorded instead

    def do_POST(self) -> None:
        answer = self.server.fake._handle(
            self.command,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            self._read_body(),
        )
        self.send_response(answer.status)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            # the client gave up first (the timeout tests make it): nothing to answer
            self.close_connection = True

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST  # noqa: N815

    def _read_body(self) -> bytes:
        """The whole body, chunked or with a Content-Length, so the client can read the
        answer whatever the fake makes of it."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while length := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(length))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
