"""The benchmarks' SMTP load generator (asyncio + uvloop), and idle-connection holding.

One generator for every target, so smtpproxy and Postfix are measured the same way:
N sessions send their share of M messages, pipelining MAIL/RCPT/DATA (PIPELINING),
each timing DATA-to-reply. Sessions reuse their connection, or open a new one per
message (`new_connection`), with STARTTLS and AUTH PLAIN when asked.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import resource
import secrets
import ssl
import statistics
import time
from typing import Any

import attrs


@attrs.frozen
class Target:
    host: str
    port: int
    user: str = ""  # "": no AUTH (Postfix, trusting 127.0.0.0/8)
    password: str = ""
    tls: bool = False


def message(size: int) -> tuple[bytes, bytes]:
    """Headers (with a %s for a unique Message-ID) and a body of whole CRLF lines, about
    size bytes in all. Each message sent gets its own Message-ID and a first body line
    of its own: identical messages would be collapsed by duplicate detection."""
    head = (
        b"From: Bench <bench@example.com>\r\nTo: sink@example.org\r\n"
        b"Subject: benchmark\r\nMessage-ID: <%s@bench>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head, line * lines


@functools.cache
def _client_tls() -> ssl.SSLContext:
    """One context for every connection: building one loads the CA store (tens of ms),
    which made the generator, not the server, the limit of the --new-connection --tls
    run. Real clients are many processes, each with its own."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench instance's certificate is self-signed
    return ctx


class Session:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def reply(self) -> tuple[int, str]:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3]), line.decode(errors="replace").rstrip()

    async def cmd(self, text: str, expect: int) -> str:
        self.writer.write(text.encode() + b"\r\n")
        code, msg = await self.reply()
        if code != expect:
            raise RuntimeError(f"{text.split(maxsplit=1)[0]}: {msg}")
        return msg

    async def open(self) -> None:
        t = self.target
        self.reader, self.writer = await asyncio.open_connection(t.host, t.port)
        await self.reply()
        await self.cmd("EHLO bench.example", 250)
        if t.tls:
            await self.cmd("STARTTLS", 220)
            await self.writer.start_tls(_client_tls())
            await self.cmd("EHLO bench.example", 250)
        if t.user:
            token = base64.b64encode(f"\0{t.user}\0{t.password}".encode()).decode()
            await self.cmd(f"AUTH PLAIN {token}", 235)

    async def send(self, data: bytes) -> tuple[bool, float]:
        """One transaction, pipelined; returns (accepted, DATA-to-reply seconds)."""
        self.writer.write(
            b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n"
        )
        for expect in (250, 250, 354):
            code, msg = await self.reply()
            if code != expect:
                raise RuntimeError(msg)
        start = time.perf_counter()
        self.writer.write(data + b".\r\n")
        code, _ = await self.reply()
        return code == 250, time.perf_counter() - start

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            self.writer.close()
        except (ConnectionError, OSError):
            pass


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(
    target: Target,
    *,
    sessions: int,
    messages: int,
    size: int,
    rate: float = 0.0,
    new_connection: bool = False,
) -> dict[str, Any]:
    """Send `messages` over `sessions` concurrent sessions (at `rate` msgs/s in total if
    given); returns counts, elapsed time, rates, latency percentiles and the generator's
    own CPU seconds."""
    head, text = message(size)
    remaining = messages
    latencies: list[float] = []
    accepted = rejected = 0
    interval = sessions / rate if rate else 0.0

    async def worker() -> None:
        nonlocal remaining, accepted, rejected
        session = Session(target)
        if not new_connection:
            await session.open()
        next_at = time.perf_counter()
        while remaining > 0:
            remaining -= 1
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if new_connection:
                await session.open()
            token = secrets.token_hex(8).encode()
            ok, latency = await session.send(head % token + b"Unique: " + token + b"\r\n" + text)
            latencies.append(latency)
            if ok:
                accepted += 1
            else:
                rejected += 1
            if new_connection:
                await session.close()
        if not new_connection:
            await session.close()

    cpu0 = own_cpu()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "accepted": accepted,
        "rejected": rejected,
        "elapsed": elapsed,
        "rate": accepted / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "generator_cpu": own_cpu() - cpu0,
    }


async def hold_idle(target: Target, count: int, settle: float = 2.0) -> list[Session]:
    """Open `count` sessions (greeting, EHLO, STARTTLS/AUTH as the target says) and leave
    them idle; the caller measures, then closes them with close_all()."""
    sessions = [Session(target) for _ in range(count)]
    for batch in range(0, count, 100):  # not all at once: stay under the listen backlog
        await asyncio.gather(*(s.open() for s in sessions[batch : batch + 100]))
    await asyncio.sleep(settle)
    return sessions


async def close_all(sessions: list[Session]) -> None:
    await asyncio.gather(*(s.close() for s in sessions))
