"""Schema migrations: numbered .sql files applied once each, in order.

The files live in the repository's top-level sql/ directory and ship inside the wheel
as smtpproxy/_sql. A session advisory lock makes concurrent `smtpproxy run` and
`smtpproxy db migrate` invocations apply each file exactly once.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import attrs
import psycopg

from smtpproxy.db.pool import connect, mapped_errors

# an arbitrary constant shared by every smtpproxy process: "smtpprox" in ASCII
_LOCK_KEY = 0x736D7470_70726F78
_FILE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def _sql_dir() -> Path:
    packaged = resources.files("smtpproxy").joinpath("_sql")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"  # a source checkout


def available(directory: Path | None = None) -> list[Migration]:
    """Every migration file, sorted by version; a gap or a duplicate is an error."""
    found = []
    for path in (directory or _sql_dir()).iterdir():
        m = _FILE.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise RuntimeError(f"migration {expected:03d} is missing or duplicated")
    return found


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> set[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return set()
    return {int(str(r[0])) for r in conn.execute("SELECT version FROM schema_migrations")}


def migrate(
    url: str, directory: Path | None = None, *, connect_timeout: float = 5.0
) -> list[Migration]:
    """Apply pending migrations; returns the ones applied by this call."""
    done: list[Migration] = []
    with mapped_errors(), connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute("SELECT pg_advisory_lock(%s::bigint)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            have = applied_versions(conn)
            for mig in available(directory):
                if mig.version in have:
                    continue
                with conn.transaction():
                    conn.execute(mig.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (mig.version, mig.name),
                    )
                done.append(mig)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (_LOCK_KEY,))
    return done


def pending(
    url: str, directory: Path | None = None, *, connect_timeout: float = 5.0
) -> list[Migration]:
    with mapped_errors(), connect(url, connect_timeout=connect_timeout) as conn:
        have = applied_versions(conn)
    return [m for m in available(directory) if m.version not in have]
