"""Report benchmark: `smtpproxy stats` and `smtpproxy logs` on large delivery_logs tables.

For each size (1,000,000 and 5,000,000 attempts by default) it makes a database of its
own on the PostgreSQL named by SMTPPROXY_TEST_DATABASE_URL (or --database-url), migrates
it, fills it with tests/support/reportdata.py (10 tenants, 20 accounts, 3 providers,
attempts spread evenly over the last 30 days) and times each command, run in this process
the way the CLI runs it (argument parsing, connection, schema check, queries, output),
best of --repeat runs. The time to start a `smtpproxy` process (about 1-3 s, mostly
imports) comes on top and is printed once. With --explain it prints the plan of every
statement too, to check which index each one uses. The databases are dropped afterwards
unless --keep.

    uv run python -m tests.bench.stats
    uv run python -m tests.bench.stats --rows 5000000 --explain
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from smtpproxy.db import migrate
from tests.support import reportdata
from tests.support.process import write_config

SPAN_SECONDS = 30 * 86400

# each is run with --json, so the time is the query's and not the terminal's
COMMANDS = [
    "stats",
    "stats --since 30d",
    "stats --tenant bench-3",
    "stats --tenant small --since 30d",
    "stats --account bench-app-7 --since 7d",
    "stats --provider ses --since 7d",
    "stats --since 7d --by hour",
    "stats --since 30d --by day",
    "logs",
    "logs --tenant bench-3 --status failed",
    "logs --account small-app",
    "logs --provider ses --page 200",
    "logs --recipient rcpt3@example.org",
    "logs --message-id B000000042",
]


def add_small_tenant(url: str, base: datetime, attempts: int = 2000) -> None:
    """Tenant `small` (account `small-app`): a few attempts among millions, where the
    (tenant_id, created_at) and (account_id, created_at) indexes should be chosen."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            WITH t AS (INSERT INTO tenants (name) VALUES ('small') RETURNING id),
            a AS (INSERT INTO accounts (tenant_id, username, password_hash)
                  SELECT id, 'small-app', 'x' FROM t RETURNING id, tenant_id)
            INSERT INTO delivery_logs (message_id, account_id, tenant_id, provider_name, status,
                                       attempt_number, duration_ms, created_at)
            SELECT 'B000000000', a.id, a.tenant_id, 'ses',
                   CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'delivered' END, 1, g %% 900,
                   %(base)s::timestamptz - make_interval(secs => g * %(step)s::float8)
            FROM a, generate_series(1, %(n)s) AS g
            """,
            {"base": base, "step": SPAN_SECONDS / attempts, "n": attempts},
        )
        conn.execute("ANALYZE delivery_logs")


def with_dbname(url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


def run_in_process(config: Path, args: list[str]) -> tuple[float, str]:
    """One command through the CLI's own Typer app; returns (seconds, stdout)."""
    from smtpproxy.cli.main import app

    out = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(out):
        try:
            app(["--config", str(config), *args], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    return time.perf_counter() - start, out.getvalue()


def explain(url: str) -> None:
    """The plan of every report statement for the benchmark's typical filters."""
    from smtpproxy.db.queries import Q

    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        now = row[0]
        tenant_id = _one(conn, "SELECT id FROM tenants WHERE name = 'bench-3'")
        account_id = _one(conn, "SELECT id FROM accounts WHERE username = 'bench-app-7'")
        small_tenant = _one(conn, "SELECT id FROM tenants WHERE name = 'small'")
        small_account = _one(conn, "SELECT id FROM accounts WHERE username = 'small-app'")
        day, week = now - timedelta(days=1), now - timedelta(days=7)
        base = {"tenant_id": None, "account_id": None, "provider": None, "bucket": None}
        stats_cases = {
            "24 h": {**base, "since": day, "until": now},
            "30 d": {**base, "since": now - timedelta(days=31), "until": now},
            "24 h, tenant": {**base, "since": day, "until": now, "tenant_id": tenant_id},
            "7 d, account": {**base, "since": week, "until": now, "account_id": account_id},
            "7 d, provider": {**base, "since": week, "until": now, "provider": "ses"},
            "30 d, small tenant": {
                **base,
                "since": now - timedelta(days=31),
                "until": now,
                "tenant_id": small_tenant,
            },
            "24 h, small account": {
                **base,
                "since": day,
                "until": now,
                "account_id": small_account,
            },
        }
        for statement in ("report_stats_groups", "report_stats_p95"):
            for label, params in stats_cases.items():
                _plan(conn, f"{statement}, {label}", getattr(Q, statement), params)
        _plan(
            conn,
            "report_stats_groups, 7 d by hour",
            Q.report_stats_groups,
            {**stats_cases["24 h"], "since": week, "bucket": "hour"},
        )
        logs = {
            "since": None,
            "until": None,
            "before_at": None,
            "before_id": None,
            "tenant_id": None,
            "account_id": None,
            "provider": None,
            "status": None,
            "recipient": None,
            "message_ids": None,
            "limit": 51,
            "offset": 0,
        }
        cursor = conn.execute(
            "SELECT id, created_at FROM delivery_logs ORDER BY created_at DESC LIMIT 1 OFFSET 5000"
        ).fetchone()
        assert cursor is not None
        log_cases = {
            "newest": logs,
            "tenant + failed": {**logs, "tenant_id": tenant_id, "status": "failed"},
            "account, 7 d": {**logs, "account_id": account_id, "since": week},
            "small account": {**logs, "account_id": small_account},
            "small tenant + failed": {**logs, "tenant_id": small_tenant, "status": "failed"},
            "cursor": {**logs, "before_id": cursor[0], "before_at": cursor[1]},
            "provider ses, page 200": {**logs, "provider": "ses", "offset": 199 * 50},
            "message id": {**logs, "message_ids": ["B000000042"]},
        }
        for label, params in log_cases.items():
            _plan(conn, f"report_logs, {label}", Q.report_logs, params)


def _one(conn: psycopg.Connection[Any], query: Any) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _plan(conn: psycopg.Connection[Any], label: str, query: Any, params: Any) -> None:
    lines = [
        str(r[0]) for r in conn.execute(b"EXPLAIN (ANALYZE, COSTS OFF) " + query.encode(), params)
    ]
    print(f"\n-- {label}")
    for line in lines:
        if any(w in line for w in ("Scan", "Aggregate", "Sort", "Limit", "Execution Time")):
            print("   " + line.strip())


def bench(admin_url: str, redis_url: str, n: int, args: argparse.Namespace) -> None:
    name = f"smtpproxy_bench_stats_{n}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(admin_url, name)
    try:
        migrate.migrate(url)
        start = time.perf_counter()
        base = datetime.now(UTC)
        reportdata.load(url, n, base, SPAN_SECONDS / n)
        add_small_tenant(url, base)
        loaded = time.perf_counter() - start
        print(f"\n== {n:,} delivery attempts over 30 days (loaded in {loaded:.1f} s)")
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(
                Path(tmp) / "smtpproxy.toml",
                {
                    "data_dir": str(Path(tmp) / "data"),
                    "database": {"url": url},
                    "redis": {
                        "url": redis_url,
                        "key_prefix": f"bench-stats-{secrets.token_hex(3)}",
                    },
                },
            )
            for command in COMMANDS:
                argv = [*shlex.split(command), "--json"]
                times = [run_in_process(config, argv)[0] for _ in range(args.repeat)]
                print(f"{command:<42} {min(times) * 1000:8.0f} ms")
            env = {k: v for k, v in os.environ.items() if k != "SMTPPROXY_CONFIG"}
            for argv in (["--help"], ["stats"]):
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "smtpproxy", "--config", str(config), *argv],
                    check=True,
                    capture_output=True,
                    env=env,
                )
                wall = time.perf_counter() - t
                print(f"{'process: smtpproxy ' + ' '.join(argv):<42} {wall * 1000:8.0f} ms (wall)")
        if args.explain:
            explain(url)
    finally:
        if args.keep:
            print(f"kept database {name}")
        else:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "SMTPPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="A PostgreSQL where databases may be created (default: $SMTPPROXY_TEST_DATABASE_URL).",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SMTPPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Only written to the config: the reports do not use Redis.",
    )
    parser.add_argument("--repeat", type=int, default=3, help="Runs per command (best is shown).")
    parser.add_argument("--explain", action="store_true", help="Print each statement's plan.")
    parser.add_argument("--keep", action="store_true", help="Keep the databases afterwards.")
    args = parser.parse_args()
    for n in args.rows:
        bench(args.database_url, args.redis_url, n, args)


if __name__ == "__main__":
    main()
