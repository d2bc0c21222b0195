"""Storage checker benchmark: `smtpproxy fsck-storage` on a million rows, in flat memory.

Builds a scratch installation and runs smtpproxy.ops.fsck.Checker on it: a dry run, a
repair, and a last dry run that shows the repair left everything consistent.

* a new database on the PostgreSQL server named by SMTPPROXY_TEST_DATABASE_URL (migrated
  with smtpproxy.db.migrate), one tenant and one account;
* --rows message rows inserted with generate_series: 1% queued, 1% retrying (one in ten
  of them overdue), 0.1% enqueue_failed, the rest delivered (1% of all rows finished 40
  days ago, past the 30-day body retention), each with its storage key;
* --bodies files in a local message store: the live messages' bodies first (except one
  queued message in 100, whose body is lost), then delivered ones, and --orphans of them
  no row refers to; every file is backdated two hours, past the orphan grace, so each
  one is really looked up;
* the tenant's Redis stream and consumer group, with 9 of every 10 queued ids (the rest
  lost, like overdue retries: the stream check re-enqueues them).

Setup runs in a forked child process, so the peak RSS (getrusage ru_maxrss) printed
before and after each run is the checker's own: it pages through rows, objects and
stream entries, so the peak stays flat whatever --rows and --bodies are. The database,
the files and the Redis keys are removed at the end. Exit status 0 when the last dry
run is consistent.

    uv run python -m tests.bench.fsck                           # 1,000,000 rows, 100,000 bodies
    uv run python -m tests.bench.fsck --rows 200000 --bodies 20000
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis
from cryptography.fernet import Fernet
from loguru import logger

from smtpproxy import admin
from smtpproxy.config import structure
from smtpproxy.db import migrate
from smtpproxy.ops.fsck import Checker, CheckResult, options_from_config
from smtpproxy.runtime.resources import Resources, open_resources
from smtpproxy.store import key_for
from smtpproxy.store.local import LocalStore

BODY = (
    b"From: Bench <bench@example.com>\r\nTo: sink@example.org\r\nSubject: fsck benchmark\r\n\r\n"
    + b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n" * 12
)
CHUNK = 200_000  # rows per INSERT ... SELECT FROM generate_series
BATCH = 1_000  # bodies per put_many, ids per Redis pipeline
TWO_HOURS = 2 * 3600
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # smtpproxy.ids' Crockford base32


# -- which row is what: the same rules in SQL (_INSERT) and in Python ---------------------


def message_id(i: int, mark: str = "BENCH") -> str:
    """The i-th benchmark id: 26 characters like smtpproxy's, unique by i, ending in two
    base32 characters that spread the bodies over key_for's 1,024 directories."""
    return f"01{mark}{i:017d}{ALPHABET[(i // 32) % 32]}{ALPHABET[i % 32]}"


def is_live(i: int) -> bool:
    return i % 100 in (0, 1)  # 0: queued, 1: retrying


def lost_body(i: int) -> bool:
    return i % 10_000 == 0  # one queued message in 100


def lost_entry(i: int) -> bool:
    return i % 1_000 == 0  # one queued message in 10


_INSERT = """
INSERT INTO messages (
    id, tenant_id, account_id, mail_from, rcpt_to, size, sha256, storage_key, status,
    attempts, next_attempt_at, created_at, updated_at, finished_at)
SELECT s.id, %(tenant)s, %(account)s, 'bench@example.com', ARRAY['sink@example.org'],
       %(size)s, %(sha256)s,
       lower(substr(s.id, 26, 1)) || '/' || lower(substr(s.id, 25, 1)) || '/' || s.id || '.eml',
       s.status,
       CASE WHEN s.status = 'retrying' THEN 1 ELSE 0 END,
       CASE WHEN s.status <> 'retrying' THEN NULL
            WHEN s.i %% 1000 = 1 THEN now() - interval '2 hours'  -- overdue
            ELSE now() + interval '1 hour' END,
       s.at, s.at, CASE WHEN s.status IN ('queued', 'retrying') THEN NULL ELSE s.at END
FROM (
    SELECT i,
           '01BENCH' || lpad(i::text, 17, '0')
               || substr(%(alphabet)s, (i / 32 %% 32)::int + 1, 1)
               || substr(%(alphabet)s, (i %% 32)::int + 1, 1) AS id,
           CASE WHEN i %% 100 = 0 THEN 'queued'
                WHEN i %% 100 = 1 THEN 'retrying'
                WHEN i %% 1000 = 2 THEN 'enqueue_failed'
                ELSE 'delivered' END AS status,
           CASE WHEN i %% 100 = 3 THEN now() - interval '40 days'
                WHEN i %% 100 IN (0, 1) OR i %% 1000 = 2 THEN now() - interval '2 hours'
                ELSE now() - interval '1 day' END AS at
    FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) AS i
) s
"""


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def say(text: str) -> None:
    print(text, flush=True)


# -- setup (in a child process) -------------------------------------------------------------


def database_url(admin_url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def insert_rows(url: str, rows: int) -> tuple[int, int]:
    """The tenant, the account and every message row; returns (tenant id, account id)."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = admin.add_tenant(conn, "bench")
        # no usable password: nobody logs in
        account = admin.add_account(conn, "bench", "bench", "!bench", ["example.com"])
        for start in range(0, rows, CHUNK):
            stop = min(start + CHUNK, rows)
            params = {
                "tenant": tenant,
                "account": account,
                "size": len(BODY),
                "sha256": hashlib.sha256(BODY).hexdigest(),
                "alphabet": ALPHABET,
                "start": start,
                "stop": stop,
            }
            conn.execute(_INSERT, params)
            say(f"  rows   {stop:>12,} / {rows:,}")
        conn.execute("ANALYZE messages")
        sample = conn.execute(
            "SELECT id, storage_key FROM messages WHERE id = %s", (message_id(12345),)
        )
        assert sample.fetchone() == (message_id(12345), key_for(message_id(12345)))
    say(f"  {rows:,} rows in {time.perf_counter() - started:.1f} s")
    return tenant, account


def body_keys(rows: int, referenced: int, orphans: int) -> Iterator[str]:
    """The key of every body to write, lazily: live messages first, then delivered ones,
    then the orphans."""
    live = (i for i in range(rows) if is_live(i) and not lost_body(i))
    finished = (i for i in range(rows) if not is_live(i))
    left = referenced
    for source in (live, finished):
        for i in source:
            if left == 0:
                break
            left -= 1
            yield key_for(message_id(i))
    for n in range(orphans):
        yield key_for(message_id(n, mark="ORPHN"))


def write_bodies(base: Path, keys: Iterator[str], total: int) -> None:
    started = time.perf_counter()
    store = LocalStore(base)
    batch: list[tuple[str, bytes]] = []
    written = 0
    for key in keys:
        batch.append((key, BODY))
        if len(batch) == BATCH:
            store.put_many(batch)
            written += len(batch)
            batch.clear()
            if written % 20_000 == 0:
                say(f"  bodies {written:>12,} / {total:,}")
    store.put_many(batch)
    then = time.time() - TWO_HOURS
    for obj in store.iter_objects():
        os.utime(base / obj.key, (then, then))
    say(f"  {total:,} bodies in {time.perf_counter() - started:.1f} s")


def fill_stream(redis_url: str, prefix: str, tenant: int, account: int, rows: int) -> None:
    """XADD the queued ids that did not lose their entry to the tenant's stream, as
    ingress does (the stream registered in `<prefix>:streams`), and create the group."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"{prefix}:deliver:{tenant}"
    client.sadd(f"{prefix}:streams", str(tenant))
    client.xgroup_create(stream, "delivery", id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    added = 0
    for i in range(0, rows, 100):  # the queued ones
        if lost_entry(i):
            continue
        fields = {"id": message_id(i), "tenant_id": str(tenant), "account_id": str(account)}
        pipe.xadd(stream, fields)
        added += 1
        if added % BATCH == 0:
            pipe.execute()
    pipe.execute()
    client.close()
    say(f"  {added:,} stream entries")


def build(admin_url: str, dbname: str, redis_url: str, prefix: str, base: str, args: Any) -> None:
    """Everything the checker will look at; run in a child so its memory is not counted."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    url = database_url(admin_url, dbname)
    migrate.migrate(url)
    tenant, account = insert_rows(url, args.rows)
    orphans = round(args.bodies * args.orphans)
    write_bodies(Path(base), body_keys(args.rows, args.bodies - orphans, orphans), args.bodies)
    say(f"  ({orphans:,} of them orphans)")
    fill_stream(redis_url, prefix, tenant, account, args.rows)


def drop(admin_url: str, dbname: str, redis_url: str, prefix: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


# -- the runs -------------------------------------------------------------------------------


def run_checker(res: Resources, title: str, **overrides: Any) -> list[CheckResult]:
    opts = options_from_config(res, **overrides)
    before = peak_rss_mb()
    started = time.perf_counter()
    results = Checker(res, opts).run()
    elapsed = time.perf_counter() - started
    after = peak_rss_mb()
    say(f"\n{title}: {elapsed:.1f} s wall, peak RSS {before:.1f} MiB before, {after:.1f} MiB after")
    say(f"  {'check':<16}{'checked':>12}{'problems':>12}{'repaired':>12}")
    for r in results:
        say(f"  {r.name:<16}{r.checked:>12,}{r.problems:>12,}{r.repaired:>12,}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.fsck", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="message rows (1,000,000)")
    parser.add_argument("--bodies", type=int, default=100_000, help="body files (100,000)")
    parser.add_argument(
        "--orphans", type=float, default=0.05, help="fraction of the bodies that are orphans"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("SMTPPROXY_TEST_DATABASE_URL", ""),
        help="a PostgreSQL server to create the scratch database on "
        "(default: $SMTPPROXY_TEST_DATABASE_URL)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SMTPPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis (default: $SMTPPROXY_TEST_REDIS_URL, else redis://127.0.0.1:6379/0)",
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("set SMTPPROXY_TEST_DATABASE_URL or pass --database-url")
    if args.rows < 1 or args.bodies < 0 or not 0 <= args.orphans <= 1:
        parser.error("--rows must be positive, --bodies not negative, --orphans in [0, 1]")
    logger.disable("smtpproxy")  # a warning per repaired item would drown the figures

    run_id = secrets.token_hex(4)
    dbname = f"smtpproxy_bench_fsck_{run_id}"
    prefix = f"smtpproxy-bench-fsck-{run_id}"
    say(f"scratch database {dbname}, Redis prefix {prefix}")
    with tempfile.TemporaryDirectory(prefix="smtpproxy-bench-fsck-") as tmp:
        base = str(Path(tmp) / "messages")
        res: Resources | None = None
        try:
            child = multiprocessing.get_context("fork").Process(
                target=build, args=(args.database_url, dbname, args.redis_url, prefix, base, args)
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                say(f"setup failed (exit {child.exitcode})")
                return 2
            cfg = structure(
                {
                    "data_dir": tmp,
                    "database": {"url": database_url(args.database_url, dbname)},
                    "redis": {"url": args.redis_url, "key_prefix": prefix},
                    "storage": {"path": base, "retention_days": 30, "orphan_action": "delete"},
                    "security": {"secret_key": Fernet.generate_key().decode()},
                },
                "bench",
            )
            res = open_resources(cfg)
            say(f"\npeak RSS of this process before any check: {peak_rss_mb():.1f} MiB")
            run_checker(res, "dry run")
            run_checker(res, "repair", repair=True)
            final = run_checker(res, "dry run after the repair")
            left = sum(r.problems for r in final)
            verdict = "consistent" if not left else f"{left} problems left"
            say(f"\n{verdict}; peak RSS {peak_rss_mb():.1f} MiB")
            return 0 if not left else 1
        finally:
            if res is not None:
                res.close()
            drop(args.database_url, dbname, args.redis_url, prefix)


if __name__ == "__main__":
    sys.exit(main())
