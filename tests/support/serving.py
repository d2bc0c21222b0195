"""smtpproxy's service running inside a test: starting it, asking its health endpoint, and
waiting for what it does to a message (as the messages table shows it)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.rows
import trio
from loguru import logger

from smtpproxy import admin
from smtpproxy.config import Config
from smtpproxy.runtime.service import Running, serve


async def start(nursery: trio.Nursery, cfg: Config) -> tuple[Running, trio.Event]:
    """serve(cfg) in the test's nursery, ready within a minute; set the event to stop it."""
    stop = trio.Event()
    with trio.fail_after(60):
        running: Running = await nursery.start(serve, cfg, stop)
    return running, stop


def get_json(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    """(status, parsed JSON body) of a request to the health listener on 127.0.0.1:port,
    error statuses included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def get_text(port: int, path: str = "/metrics") -> str:
    """The body of GET path on the health listener at 127.0.0.1:port (by default
    /metrics, every process's metrics added up)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def readiness(port: int) -> tuple[int, dict[str, Any]]:
    """(status, body) of GET /readyz."""
    return get_json(port, "/readyz")


def message_row(pg_url: str, mid: str) -> dict[str, Any] | None:
    """The message's row in the messages table, None when there is none."""
    with psycopg.connect(pg_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM messages WHERE id = %s", (mid,)).fetchone()


async def wait_status(
    pg_url: str, mid: str, *statuses: str, timeout: float = 20, interval: float = 0.05
) -> dict[str, Any]:
    """Poll until the message reaches one of statuses; returns its row."""
    with trio.fail_after(timeout):
        while True:
            row = message_row(pg_url, mid)
            if row is not None and row["status"] in statuses:
                return row
            await trio.sleep(interval)


@contextmanager
def log_records() -> Iterator[list[dict[str, Any]]]:
    """The log lines of services running in this process while the block runs, each
    as its extra fields plus "msg" (the message) and "level" (its name)."""
    records: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: records.append(
            m.record["extra"] | {"msg": m.record["message"], "level": m.record["level"].name}
        )
    )
    try:
        yield records
    finally:
        logger.remove(sink)


RELOADED = "configuration reloaded ("


async def changed_and_reloaded(
    records: list[dict[str, Any]], change: Callable[[], object], kind: str, timeout: float = 10
) -> None:
    """Make the change, then wait until a service has reloaded for a notification of
    that kind sent after it (the reload comes within about a second, later under load).
    records: log_records()'s list."""
    seen = len(records)
    change()
    with trio.fail_after(timeout):
        while not any(r["msg"].startswith(RELOADED) and kind in r["msg"] for r in records[seen:]):
            await trio.sleep(0.05)


def add_file_provider(
    conn: psycopg.Connection[Any], name: str, path: Path, **settings: Any
) -> None:
    """A file provider of tenant acme that writes into path."""
    admin.add_provider(
        conn,
        "acme",
        name,
        "file",
        endpoint=None,
        settings={"path": str(path), **settings},
        secret=None,
        encrypt=None,
    )
