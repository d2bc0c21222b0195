"""The health endpoint: GET /healthz (alive), GET /readyz (dependencies answer) and
GET /metrics (Prometheus text format, see scrape.py; /metrics/process: this process's
own, which the first of several processes adds up, see workers.py).

A tiny HTTP/1.1 server (h11 on trio streams). /readyz checks PostgreSQL, Redis, the
message store and the SMTP listeners, each bounded by a short timeout, and answers 503
with a JSON body naming what failed, or "draining" during shutdown. Results are cached
for a second so probes cannot load the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import attrs
import h11
import trio
from loguru import logger

from smtpproxy.config import HostPort
from smtpproxy.observe.metrics import CONTENT_TYPE

Check = Callable[[], Awaitable[None]]
Render = Callable[[], Awaitable[bytes]]
CHECK_TIMEOUT = 2.0
MAX_REQUEST = 8192


@attrs.define
class HealthState:
    checks: dict[str, Check]
    draining: bool = False
    listening: bool = False
    metrics: Render | None = None
    process_metrics: Render | None = None  # this process alone (run.processes > 1)
    _cache: tuple[float, int, dict[str, object]] | None = attrs.field(default=None, init=False)

    async def readiness(self) -> tuple[int, dict[str, object]]:
        if self.draining:
            return 503, {"status": "draining"}
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < 1.0:
            return self._cache[1], self._cache[2]
        results: dict[str, str] = {"listeners": "ok" if self.listening else "not bound"}

        async def run(name: str, check: Check) -> None:
            with trio.move_on_after(CHECK_TIMEOUT) as scope:
                try:
                    await check()
                    results[name] = "ok"
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                    results[name] = f"error: {exc}"
            if scope.cancelled_caught:
                results[name] = f"error: no answer within {CHECK_TIMEOUT:.0f} s"

        async with trio.open_nursery() as nursery:
            for name, check in self.checks.items():
                nursery.start_soon(run, name, check)
        failing = sorted(k for k, v in results.items() if v != "ok")
        status = 503 if failing else 200
        body: dict[str, object] = {
            "status": "ready" if not failing else "not ready",
            "checks": results,
        }
        if failing:
            body["failing"] = failing
        self._cache = (now, status, body)
        return status, body


@attrs.define
class _Reply:
    stream: trio.abc.Stream
    conn: h11.Connection
    head: bool  # a HEAD request gets the headers only

    async def json(self, status: int, body: dict[str, object]) -> None:
        await self.send(status, json.dumps(body).encode() + b"\n", "application/json")

    async def send(self, status: int, data: bytes, content_type: str) -> None:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
        out = self.conn.send(h11.Response(status_code=status, headers=headers))
        if not self.head:
            out += self.conn.send(h11.Data(data=data))
        await self.stream.send_all(out + self.conn.send(h11.EndOfMessage()))


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_REQUEST)
            conn.receive_data(bytes(data))
            if not data:
                return None
            continue
        return event if isinstance(event, h11.Request) else None


async def _serve_one(stream: trio.abc.Stream, state: HealthState) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        with trio.move_on_after(10):
            request = await _read_request(stream, conn)
            if request is None:
                return
            path = request.target.decode("ascii", "replace").split("?", 1)[0]
            reply = _Reply(stream, conn, head=request.method == b"HEAD")
            if request.method not in (b"GET", b"HEAD"):
                await reply.json(405, {"error": "method not allowed"})
            elif path == "/healthz":
                await reply.json(200, {"status": "alive"})
            elif path == "/readyz":
                await reply.json(*(await state.readiness()))
            elif path == "/metrics" and state.metrics is not None:
                await reply.send(200, await state.metrics(), CONTENT_TYPE)
            elif path == "/metrics/process" and state.process_metrics is not None:
                await reply.send(200, await state.process_metrics(), CONTENT_TYPE)
            else:
                await reply.json(404, {"error": "not found"})
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def run_health(
    address: HostPort,
    state: HealthState,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    sock = listeners[0].socket
    bound = sock.getsockname()[:2]
    logger.info("health endpoint on http://{}:{}/readyz", bound[0], bound[1])
    task_status.started((bound[0], bound[1]))

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, state)

    await trio.serve_listeners(handler, listeners)
