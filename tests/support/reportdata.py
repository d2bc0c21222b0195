"""A large, deterministic delivery_logs table for the report tests and the benchmark.

`load()` fills a migrated database with TENANTS tenants of ACCOUNTS_PER_TENANT accounts,
MESSAGES messages and n delivery attempts made by one generate_series statement. Row g
(1..n) is described by `attempt(g)`, the same formula in Python, so a test can work out
exactly what any aggregate over any range must be. The delivery_logs indexes and foreign
key are dropped for the insert and created again afterwards (as the migration wrote
them), which is several times faster than maintaining them row by row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg

TENANTS = 10
ACCOUNTS_PER_TENANT = 2
ACCOUNTS = TENANTS * ACCOUNTS_PER_TENANT
MESSAGES = 60_000  # a multiple of ACCOUNTS: attempt g is for message g % MESSAGES
PROVIDERS = ("sendgrid", "ses", "mailgun")


class Attempt(NamedTuple):
    tenant: str
    account: str
    provider: str
    status: str
    duration_ms: int


def status_of(g: int) -> str:
    h = (g * 7919) % 100
    if h < 80:
        return "delivered"
    if h < 88:
        return "retrying"
    if h < 93:
        return "failover"
    if h < 97:
        return "failed"
    if h < 99:
        return "dlq"
    return "storage_error"


def attempt(g: int) -> Attempt:
    """What row g of the generated table holds (its time is base - g * step seconds)."""
    status = status_of(g)
    a = g % ACCOUNTS
    lost = status == "storage_error"  # the body was gone: no provider was called
    return Attempt(
        tenant=f"bench-{a // ACCOUNTS_PER_TENANT}",
        account=f"bench-app-{a}",
        provider="" if lost else PROVIDERS[(g // 3) % 3],
        status=status,
        duration_ms=0 if lost else (g * 37) % 5000,
    )


_INSERT_LOGS = """
INSERT INTO delivery_logs (message_id, account_id, tenant_id, provider_name, status,
                           error_message, attempt_number, duration_ms, recipients, created_at)
SELECT 'B' || lpad((g %% %(messages)s)::text, 9, '0'),
       (%(account_ids)s::bigint[])[1 + g %% %(accounts)s],
       (%(tenant_of)s::bigint[])[1 + g %% %(accounts)s],
       CASE WHEN s = 'storage_error' THEN ''
            ELSE (%(providers)s::text[])[1 + (g / 3) %% 3] END,
       s,
       CASE WHEN s = 'delivered' THEN '' ELSE 'provider said: ' || s END,
       1 + g %% 4,
       CASE WHEN s = 'storage_error' THEN 0 ELSE (g * 37) %% 5000 END,
       ARRAY['rcpt' || g %% 7 || '@example.org'],
       %(base)s::timestamptz - make_interval(secs => g * %(step)s::float8)
FROM generate_series(1::bigint, %(n)s::bigint) AS g,
     LATERAL (SELECT CASE WHEN h < 80 THEN 'delivered' WHEN h < 88 THEN 'retrying'
                          WHEN h < 93 THEN 'failover' WHEN h < 97 THEN 'failed'
                          WHEN h < 99 THEN 'dlq' ELSE 'storage_error' END AS s
              FROM (SELECT (g * 7919) %% 100 AS h) AS x) AS st
""".replace("%(messages)s", str(MESSAGES)).replace("%(accounts)s", str(ACCOUNTS))


def load(url: str, n: int, base: datetime, step_seconds: float) -> None:
    """Fill the (migrated, empty) database at url; attempt g happened at
    base - g * step_seconds."""
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            tenant_ids = [
                _id(conn, "INSERT INTO tenants (name) VALUES (%s) RETURNING id", (f"bench-{t}",))
                for t in range(TENANTS)
            ]
            account_ids = [
                _id(
                    conn,
                    "INSERT INTO accounts (tenant_id, username, password_hash)"
                    " VALUES (%s, %s, 'x') RETURNING id",
                    (tenant_ids[a // ACCOUNTS_PER_TENANT], f"bench-app-{a}"),
                )
                for a in range(ACCOUNTS)
            ]
            tenant_of = [tenant_ids[a // ACCOUNTS_PER_TENANT] for a in range(ACCOUNTS)]
            conn.execute(
                f"""
                INSERT INTO messages (id, tenant_id, account_id, mail_from, rcpt_to, size,
                                      sha256, storage_key, status, created_at, finished_at)
                SELECT 'B' || lpad(m::text, 9, '0'), (%(tenant_of)s::bigint[])[1 + m %% {ACCOUNTS}],
                       (%(account_ids)s::bigint[])[1 + m %% {ACCOUNTS}], 'bench@example.com',
                       ARRAY['rcpt@example.org'], 1000, 'x', 'bench/' || m, 'delivered',
                       %(base)s::timestamptz - make_interval(secs => %(n)s * %(step)s::float8),
                       %(base)s::timestamptz
                FROM generate_series(0, {MESSAGES - 1}) AS m
                """,
                {
                    "tenant_of": tenant_of,
                    "account_ids": account_ids,
                    "base": base,
                    "n": n,
                    "step": step_seconds,
                },
            )
            indexes = [
                str(r[0])
                for r in conn.execute(
                    "SELECT indexname FROM pg_indexes"
                    " WHERE tablename = 'delivery_logs' AND indexname <> 'delivery_logs_pkey'"
                )
            ]
            definitions = [
                _one(conn, "SELECT pg_get_indexdef(%s::regclass)", (i,)) for i in indexes
            ]
            fks = conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'delivery_logs'::regclass AND contype = 'f'"
            ).fetchall()
            for name, _ in fks:
                conn.execute(f'ALTER TABLE delivery_logs DROP CONSTRAINT "{name}"')
            for name in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute(
                _INSERT_LOGS,
                {
                    "account_ids": account_ids,
                    "tenant_of": tenant_of,
                    "providers": list(PROVIDERS),
                    "base": base,
                    "step": step_seconds,
                    "n": n,
                },
            )
            for definition in definitions:
                conn.execute(definition)
            for name, definition in fks:
                conn.execute(f'ALTER TABLE delivery_logs ADD CONSTRAINT "{name}" {definition}')
        conn.execute("VACUUM ANALYZE delivery_logs")
        conn.execute("ANALYZE messages")


def _id(conn: psycopg.Connection[Any], query: Any, params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _one(conn: psycopg.Connection[Any], query: Any, params: Any) -> str:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return str(row[0])


def time_of(g: int, base: datetime, step_seconds: float) -> datetime:
    return base - timedelta(seconds=g * step_seconds)
