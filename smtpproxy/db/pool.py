"""The PostgreSQL adapter: a psycopg-pool of sync connections used from worker threads.

docs/architecture.md measured psycopg's async API under trio as unusable without asyncio;
sync connections in threads, one hop per unit of work (a whole batch at ingress), are
what we use. Every psycopg/pool connection failure leaves this module as
DatabaseUnavailable; programming errors (bad SQL) are left to crash loudly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from smtpproxy.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from smtpproxy.runtime.threads import Offload

T = TypeVar("T")


def _unavailable() -> tuple[type[Exception], ...]:
    """The errors that mean "the server is not reachable or the connection broke": retry
    later. psycopg_pool's PoolTimeout only once a pool exists (a CLI command's single
    connection does not import psycopg_pool)."""
    pool = sys.modules.get("psycopg_pool")
    timeout: tuple[type[Exception], ...] = (pool.PoolTimeout,) if pool is not None else ()
    return (psycopg.OperationalError, psycopg.InterfaceError, *timeout)


# a connection as the adapters hand it out (rows as tuples unless a cursor says dict_row)
Conn = psycopg.Connection[Any]


def one(conn: Conn, query: Any, params: Any) -> dict[str, Any] | None:
    """The first row of a query as a dict (None: no row)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchone()


def rows(conn: Conn, query: Any, params: Any) -> list[dict[str, Any]]:
    """Every row of a query as a dict."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def describe_unavailable(exc: BaseException) -> str:
    """One line for logs; libpq messages name host and user, never the password."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"database unavailable: {first}"


@contextmanager
def mapped_errors() -> Iterator[None]:
    try:
        yield
    except _unavailable() as exc:
        raise DatabaseUnavailable(describe_unavailable(exc)) from exc


class Database:
    """A pool of connections and the thread slots that use them."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        name: str = "smtpproxy",
    ) -> None:
        import psycopg_pool

        self.url = url
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name=name,
            timeout=connect_timeout,
            # a connection broken by a server restart is found here, not by a caller
            check=psycopg_pool.ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(connect_timeout)), "application_name": name},
            reconnect_timeout=0,  # keep trying forever; callers see DatabaseUnavailable
        )
        # the service's thread slots; a CLI command's single connect() never loads trio
        from smtpproxy.runtime.threads import Offload

        self.offload: Offload = Offload("postgresql", max_size)

    def open(self) -> None:
        # do not wait: a database that is down at start must not stop the service
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close(timeout=5)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        """A pooled connection inside a transaction (committed when the block ends)."""
        with mapped_errors(), self._pool.connection() as conn:
            yield conn

    def call(self, fn: Callable[[psycopg.Connection[tuple[object, ...]]], T]) -> T:
        """Run fn(conn) in one transaction, in this thread."""
        with self.connection() as conn:
            return fn(conn)

    async def run(self, fn: Callable[[psycopg.Connection[tuple[object, ...]]], T]) -> T:
        """Run fn(conn) in one transaction, in a worker thread."""
        return await self.offload(self.call, fn)

    def ping(self) -> None:
        self.call(lambda conn: conn.execute("SELECT 1"))


def connect(
    url: str, *, autocommit: bool = False, connect_timeout: float = 5.0
) -> psycopg.Connection[tuple[object, ...]]:
    """A single connection for the CLI, with errors mapped."""
    with mapped_errors():
        return psycopg.connect(
            url, autocommit=autocommit, connect_timeout=max(1, round(connect_timeout))
        )
