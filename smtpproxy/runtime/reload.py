"""Hot reload: administrative changes reach running instances within about a second.

Every CLI command that changes tenants, accounts, providers or routes sends
`NOTIFY smtpproxy_config` in its transaction. Each instance LISTENs on a connection of
its own (a blocking psycopg connection polled from a worker thread, one second at a
time) and, when notified, reloads the routing snapshot and tells its subscribers (the
AUTH cache) to forget what they know. A full reload also happens every `interval`
seconds, so a missed notification (a dropped connection) heals on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import trio
from loguru import logger

from smtpproxy.db.pool import mapped_errors
from smtpproxy.delivery import directory
from smtpproxy.errors import DatabaseUnavailable
from smtpproxy.runtime.resources import Resources

CHANNEL = "smtpproxy_config"


class Listener:
    """A LISTEN connection; wait() returns the payloads that arrived within timeout."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self._url = url
        self._timeout = connect_timeout
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def wait(self, timeout: float) -> list[str]:
        """Blocking. Raises DatabaseUnavailable (and drops the connection) on failure."""
        try:
            with mapped_errors():
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self._url, autocommit=True, connect_timeout=max(1, round(self._timeout))
                    )
                    self._conn.execute(f"LISTEN {CHANNEL}")
                    return ["(re)connected"]  # anything may have changed meanwhile
                return [n.payload for n in self._conn.notifies(timeout=timeout, stop_after=100)]
        except DatabaseUnavailable:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def run_reload(
    res: Resources,
    holder: object,  # DirectoryHolder: has a `snapshot` attribute we replace
    pool: directory.ProviderPool,
    *,
    subscribers: list[Callable[[], None]] | None = None,
    interval: float = 30.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = Listener(res.db.url, res.cfg.database.connect_timeout)
    task_status.started()
    last_full = trio.current_time()
    try:
        while True:
            try:
                payloads = await trio.to_thread.run_sync(listener.wait, 1.0)
            except DatabaseUnavailable as exc:
                logger.warning("config listener: {}; retrying in 2 s", exc)
                await trio.sleep(2)
                continue
            due = trio.current_time() - last_full >= interval
            if not payloads and not due:
                continue
            try:
                snapshot = await res.db.run(lambda conn: directory.load(conn, res.cfg, res.box))
            except DatabaseUnavailable as exc:
                logger.warning("routing reload: {}", exc)
                continue
            holder.snapshot = snapshot  # type: ignore[attr-defined]
            last_full = trio.current_time()
            if payloads:  # a change was announced (or the listener reconnected)
                # caches (e.g. verified credentials) go only then: the periodic reload is
                # a safety net, and emptying them every time would cap their lifetime
                for forget in subscribers or ():
                    forget()
                logger.info("configuration reloaded ({})", ", ".join(sorted(set(payloads))))
            await pool.aclose_retired()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(listener.close)
