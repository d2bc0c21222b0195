"""HTTP servers that stand in for a provider's API in the relay benchmarks.

* NginxSink: nginx (Debian's nginx-light) with a private config on 127.0.0.1, answering
  every request with a fixed status and body at once: a provider that costs nothing,
  written in C, so the benchmark measures smtpproxy and not the fake.
* DelayedSink: a small uvloop server in its own process that answers every request
  after a fixed delay (a real API's round trip, 200 ms by default), on keep-alive
  connections, however many are open: `python -m tests.bench.httpsink --delay 0.2`.

Both count nothing: the benchmark counts deliveries in PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from tests.bench.targets import free_port

# what each provider type's client needs to read in a success answer
ANSWERS = {
    "sendgrid": (202, "", "X-Message-Id"),
    "postmark": (200, '{"ErrorCode":0,"Message":"OK","MessageID":"bench"}', ""),
    "mailgun": (200, '{"id":"<bench@mailgun>","message":"Queued. Thank you."}', ""),
    "ses": (200, '{"MessageId":"bench"}', ""),
}

_NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            {header}
            return {status} '{body}';
        }}
    }}
}}
"""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening")


class NginxSink:
    """nginx answering `status` with `body` at once; `url` is its base URL."""

    def __init__(self, provider: str = "sendgrid") -> None:
        if shutil.which("nginx") is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        status, body, id_header = ANSWERS[provider]
        self.tmp = tempfile.TemporaryDirectory(prefix="smtpproxy-bench-nginx-")
        root = Path(self.tmp.name)
        (root / "body").mkdir()
        self.port = free_port()
        header = f"add_header {id_header} $request_id always;" if id_header else ""
        conf = root / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(root=root, port=self.port, status=status, body=body, header=header)
        )
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.proc, "nginx")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.tmp.cleanup()


class DelayedSink:
    """`python -m tests.bench.httpsink` in a process of its own, answering after `delay`
    seconds."""

    def __init__(self, delay: float, provider: str = "sendgrid") -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.bench.httpsink", "--port", str(self.port)),
                *("--delay", str(delay), "--provider", provider),
            ],
            stdout=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.proc, "the delayed HTTP sink")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Answer(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: each request (headers and a Content-Length body) is
    answered `delay` seconds after it arrived, in order."""

    def __init__(self, response: bytes, delay: float) -> None:
        self.response = response
        self.delay = delay
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        loop = asyncio.get_running_loop()
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            loop.call_later(self.delay, self._respond)

    def _respond(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--provider", choices=sorted(ANSWERS), default="sendgrid")
    args = p.parse_args()
    status, body, id_header = ANSWERS[args.provider]
    reason = {200: "OK", 202: "Accepted"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
    if id_header:
        head += f"{id_header}: bench\r\n"
    response = f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Answer(response, args.delay), "127.0.0.1", args.port, backlog=4096
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
