"""Schema migrations: applied once, in order, safely from several processes at once."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from smtpproxy.db import migrate


def test_migrate_is_idempotent(fresh_database: str) -> None:
    """The first run applies every migration, the second none; the tables exist."""
    first = migrate.migrate(fresh_database)
    assert [m.version for m in first] == [m.version for m in migrate.available()]
    assert migrate.migrate(fresh_database) == []
    assert migrate.pending(fresh_database) == []
    with psycopg.connect(fresh_database) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {
        "tenants",
        "accounts",
        "providers",
        "routing_rules",
        "messages",
        "delivery_logs",
        "schema_migrations",
    } <= tables


def test_concurrent_migrations_apply_each_file_once(fresh_database: str) -> None:
    """Eight migrators started together apply each migration exactly once between them."""
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        try:
            results.append([m.version for m in migrate.migrate(fresh_database)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    applied = sorted(v for r in results for v in r)
    assert applied == [m.version for m in migrate.available()]
    with psycopg.connect(fresh_database) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == applied


def test_a_gap_in_migration_numbers_is_refused(tmp_path: Path) -> None:
    """Migration files must be numbered without gaps."""
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "003_c.sql").write_text("SELECT 1;")
    with pytest.raises(RuntimeError, match="002"):
        migrate.available(tmp_path)


def test_a_failing_migration_leaves_nothing_behind(fresh_database: str, tmp_path: Path) -> None:
    """A migration that fails halfway is rolled back and not recorded."""
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE ok_table (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_column;")
    with pytest.raises(psycopg.Error):
        migrate.migrate(fresh_database, tmp_path)
    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
