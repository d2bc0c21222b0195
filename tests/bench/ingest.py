"""Ingest benchmark: N concurrent SMTP sessions sending M messages of S bytes.

By default it starts a fresh `smtpproxy run` (its own database on the PostgreSQL named by
SMTPPROXY_TEST_DATABASE_URL, its own Redis key prefix, delivery disabled so only ingest
is measured), loads it with an asyncio SMTP client (AUTH once per session, then
MAIL/RCPT/DATA per message, or a new connection per message with --new-connection),
and prints accepted msgs/s, DATA-to-250 latency percentiles, server CPU per message and
resident memory. Every 250 is durable: body synced, row committed, id on the stream.
The run checks that PostgreSQL holds exactly the messages that got a 250.

    just bench                                   # 50 sessions, 20,000 x 10 KB
    just bench --sessions 200 --messages 50000
    just bench --rate 800                        # latency at a fixed offered load
    just bench --host 10.0.0.5 --port 2525 --user bench --password-stdin   # an instance you run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis


def body(size: int) -> tuple[bytes, bytes]:
    """Headers (with a %s for a unique Message-ID) and a body of whole CRLF lines, about
    size bytes in all."""
    head = (
        b"From: Bench <bench@example.com>\r\nTo: sink@example.org\r\n"
        b"Subject: benchmark\r\nMessage-ID: <%s@bench>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head, line * lines


class Session:
    def __init__(self, host: str, port: int, user: str, password: str, tls: bool) -> None:
        self.host, self.port, self.user, self.password, self.tls = host, port, user, password, tls
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode(errors="replace").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), lines[-1]

    async def cmd(self, text: str, expect: int) -> str:
        self.writer.write(text.encode() + b"\r\n")
        code, msg = await self.reply()
        if code != expect:
            raise RuntimeError(f"{text.split(maxsplit=1)[0]}: {msg}")
        return msg

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        await self.reply()
        await self.cmd("EHLO bench.example", 250)
        if self.tls:
            await self.cmd("STARTTLS", 220)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            await self.writer.start_tls(ctx)
            await self.cmd("EHLO bench.example", 250)
        token = base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
        await self.cmd(f"AUTH PLAIN {token}", 235)

    async def send(self, data: bytes) -> tuple[bool, float]:
        """One transaction, pipelined; returns (accepted, DATA-to-250 seconds)."""
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


async def load(args: argparse.Namespace, password: str) -> dict[str, Any]:
    head, text = body(args.size)
    remaining = args.messages
    latencies: list[float] = []
    accepted = rejected = 0
    interval = args.sessions / args.rate if args.rate else 0.0

    async def worker() -> None:
        nonlocal remaining, accepted, rejected
        session = Session(args.host, args.port, args.user, password, args.tls)
        if not args.new_connection:
            await session.open()
        next_at = time.perf_counter()
        while remaining > 0:
            remaining -= 1
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if args.new_connection:
                await session.open()
            data = head % secrets.token_hex(8).encode() + text
            ok, latency = await session.send(data)
            latencies.append(latency)
            if ok:
                accepted += 1
            else:
                rejected += 1
            if args.new_connection:
                await session.close()
        if not args.new_connection:
            await session.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.sessions)))
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
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Instance:
    """A throwaway smtpproxy with its own database, key prefix and data directory."""

    def __init__(self, admin_url: str, redis_url: str, args: argparse.Namespace) -> None:
        from smtpproxy import admin
        from smtpproxy.db import migrate
        from smtpproxy.passwords import hash_password
        from tests.support.process import SmtpProxyProcess, write_config

        tag = secrets.token_hex(4)
        self.admin_url = admin_url
        self.dbname = f"smtpproxy_bench_{tag}"
        self.redis_url = redis_url
        self.prefix = f"smtpproxy-bench-{tag}"
        self.tmp = tempfile.TemporaryDirectory(prefix="smtpproxy-bench-", dir="/var/tmp")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        info = psycopg.conninfo.conninfo_to_dict(admin_url)
        info["dbname"] = self.dbname
        self.url = psycopg.conninfo.make_conninfo(**info)
        migrate.migrate(self.url)
        self.password = secrets.token_urlsafe(12)
        with psycopg.connect(self.url, autocommit=True) as conn:
            admin.add_tenant(conn, "bench")
            admin.add_account(conn, "bench", "bench", hash_password(self.password), [])
        config = write_config(
            Path(self.tmp.name) / "smtpproxy.toml",
            {
                "data_dir": str(Path(self.tmp.name) / "data"),
                "smtp": {
                    "listen": ["127.0.0.1:0"],
                    "allow_plaintext_auth": not args.tls,
                    "max_connections": max(1000, args.sessions * 2),
                },
                "database": {"url": self.url, "pool_max": 10},
                "redis": {"url": redis_url, "key_prefix": self.prefix},
                "delivery": {"enabled": args.deliver},
                "health": {"listen": ""},
                "log": {"level": "WARNING"},
            },
        )
        env = {"SMTPPROXY_LOG_LEVEL": "INFO"}  # the bench reads the listening port from the log
        self.proc = SmtpProxyProcess(config, env)
        self.proc.wait_ready(60)

    def rows(self) -> int:
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.proc.stop(signal.SIGTERM)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(f"{self.prefix}*"):
            client.delete(key)
        client.close()
        self.tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="offered msgs/s in total (default: as fast as possible)",
    )
    p.add_argument("--new-connection", action="store_true", help="one connection per message")
    p.add_argument("--tls", action="store_true", help="STARTTLS before AUTH")
    p.add_argument("--deliver", action="store_true", help="keep delivery consumers running")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="target a running instance instead")
    p.add_argument("--user", default="bench")
    p.add_argument("--password-stdin", action="store_true")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.port:
        password = sys.stdin.readline().strip() if args.password_stdin else ""
        result = asyncio.run(load(args, password))
        report(args, result, None, None)
        return
    admin_url = os.environ.get(
        "SMTPPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("SMTPPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    inst = Instance(admin_url, redis_url, args)
    try:
        args.port = inst.proc.smtp_port
        args.user = "bench"
        pid = inst.proc.proc.pid
        cpu0 = cpu_seconds(pid)
        result = asyncio.run(load(args, inst.password))
        cpu = cpu_seconds(pid) - cpu0
        rows = inst.rows()
        report(args, result, cpu, rss_mb(pid))
        print(
            f"integrity: {rows} rows in PostgreSQL for {result['accepted']} accepted"
            + (" OK" if rows == result["accepted"] else " MISMATCH")
        )
    finally:
        inst.close()


def report(
    args: argparse.Namespace, r: dict[str, Any], cpu: float | None, rss: float | None
) -> None:
    mode = "new connection per message" if args.new_connection else "connections reused"
    print(
        f"sessions={args.sessions} messages={args.messages} size={args.size} B ({mode}"
        f"{', STARTTLS' if args.tls else ''})"
    )
    print(
        f"accepted={r['accepted']} rejected={r['rejected']} elapsed={r['elapsed']:.2f}s "
        f"throughput={r['rate']:.0f} msgs/s"
    )
    print(f"DATA-to-250 latency: p50={r['p50_ms']:.1f} ms p99={r['p99_ms']:.1f} ms")
    if cpu is not None and r["accepted"]:
        print(f"server CPU: {1000 * cpu / r['accepted']:.2f} ms/msg; resident memory {rss:.0f} MB")


if __name__ == "__main__":
    main()
