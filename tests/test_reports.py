"""The operator reports `logs`, `stats`, `message show` and `queue status`, each run
through the `smtpproxy` command's entry point against real PostgreSQL (and Redis), over
the installation of tests/support/reportworld.py: messages in every status and the
attempts that led there.

JSON output is checked value for value, the human output for its key cells, and every
mistake for a clean exit 1 with one `error:` line. A million-row table checks that the
aggregates stay exact at scale (timings are in tests/bench/stats.py, not here).
"""

from __future__ import annotations

import functools
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from smtpproxy.db import migrate
from smtpproxy.errors import UsageError
from smtpproxy.ops import reports
from smtpproxy.queue.streams import Streams
from tests.support import cli as support_cli
from tests.support import reportdata
from tests.support.cli import Cli, as_json, fails, ok
from tests.support.process import write_config
from tests.support.reportworld import LONG_ERROR, NEWEST_FIRST, World, add_log, at, build

DAY = ("--since", "2024-05-01", "--until", "2024-05-02")  # the whole world
run_cli = functools.partial(support_cli.run_cli, timeout=120)  # the reports may take a while


def settings(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": pg_url},
        "redis": {"url": redis_url, "key_prefix": key_prefix, "socket_timeout": "2s"},
    }


@pytest.fixture
def cli(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None) -> Cli:
    config = write_config(
        tmp_path / "smtpproxy.toml", settings(tmp_path, pg_url, redis_url, key_prefix)
    )
    return lambda *args: run_cli(config, *args)


@pytest.fixture
def world(conn: psycopg.Connection[Any]) -> World:
    return build(conn)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def db_time(conn: psycopg.Connection[Any], query: str, *params: Any) -> str:
    row = conn.execute(query, params).fetchone()  # type: ignore[call-overload]
    assert row is not None
    return iso(row[0])


# -- logs ----------------------------------------------------------------------------------


def test_logs_lists_every_attempt_newest_first(cli: Cli, world: World) -> None:
    """`logs --json` gives every column of every attempt, newest first, errors in full."""
    out = as_json(cli("logs", "--json"))

    assert [r["id"] for r in out["logs"]] == [world.logs[n] for n in NEWEST_FIRST]
    assert out["next_before"] is None
    assert (out["limit"], out["page"]) == (50, 1)
    by_id = {r["id"]: r for r in out["logs"]}
    assert by_id[world.logs["failover-1"]] == {
        "id": world.logs["failover-1"],
        "time": "2024-05-01T10:05:01+00:00",
        "message_id": world.messages["failover"],
        "tenant": "acme",
        "account": "app1",
        "provider": "sendgrid",
        "status": "failover",
        "attempt": 1,
        "duration_ms": 1200,
        "error": "503 Service Unavailable",
        "recipients": ["bob@example.org", "carol@example.org"],
        "provider_message_id": None,
    }
    assert by_id[world.logs["failed"]]["error"] == LONG_ERROR
    assert by_id[world.logs["lost"]]["provider"] == ""
    assert by_id[world.logs["ok"]]["provider_message_id"] == "sg-1"


def test_logs_table_shows_key_cells(cli: Cli, world: World) -> None:
    """The human table has one full row per attempt: time, id, names, outcome, shortened error."""
    out = ok(cli("logs"))

    lines = out.splitlines()
    failover = next(line for line in lines if "10:05:01" in line)
    for cell in (world.messages["failover"], "acme", "app1", "sendgrid", "failover", "1.20 s",
                 "503 Service Unavailable", "bob@example.org (+1)"):  # fmt: skip
        assert cell in failover, (cell, failover)
    failed = next(line for line in lines if "10:20:01" in line)
    assert "550 5.1.1 <nobody@example.org>: Recipient address rejected" in failed
    assert "…" in failed
    assert LONG_ERROR not in out
    assert all(world.messages[m] in out for m in ("ok", "dlq", "lost", "dup-2"))
    assert "13 shown, newest first; no more" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tenant", "globex"], ["dup-2", "dup-1", "dlq-3", "lost", "dlq-2", "dlq-1"]),
        (["--account", "app2"], ["retry"]),
        (["--tenant", "acme", "--account", "app1"],
         ["split.2", "split.1", "failed", "failover-2", "failover-1", "ok"]),
        (["--provider", "ses"], ["split.2", "retry", "failover-2"]),
        (["--status", "retrying"], ["split.2", "dlq-2", "dlq-1", "retry"]),
        (["--provider", "mailgun", "--status", "delivered"], ["dup-2", "dup-1"]),
        (["--recipient", "dave@example.ORG"], ["retry"]),
        (["--recipient", "carol@example.org"], ["failover-2", "failover-1"]),
        (["--since", "2024-05-01T10:20", "--until", "2024-05-01T10:41:01"],
         ["split.1", "lost", "dlq-2", "failed"]),
        (["--since", "2024-05-01 10:41:05Z"], ["dup-2", "dup-1", "dlq-3", "split.2"]),
        (["--until", "2024-05-01T12:05:03+02:00"], ["failover-1", "ok"]),
        (["--status", "failover", "--since", "2024-05-02"], []),
    ],
    ids=["tenant", "account", "tenant-and-account", "provider", "status", "provider-status",
         "recipient-any-case", "recipient-of-two", "since-until", "since-z", "until-offset",
         "nothing"],
)  # fmt: skip
def test_logs_filters(cli: Cli, world: World, args: list[str], expected: list[str]) -> None:
    """Each filter, alone or combined, keeps exactly the attempts it names."""
    out = as_json(cli("logs", *args, "--json"))
    assert [r["id"] for r in out["logs"]] == [world.logs[n] for n in expected]


def test_logs_by_message_id_or_header(cli: Cli, world: World) -> None:
    """--message-id takes our id or the Message-ID header, with a split message's children."""
    ours = as_json(cli("logs", "--message-id", world.messages["dlq"], "--json"))
    header = as_json(cli("logs", "--message-id", "<split@acme.test>", "--json"))
    child = ok(cli("logs", "--message-id", world.messages["split.2"]))

    assert [r["id"] for r in ours["logs"]] == [world.logs[n] for n in ("dlq-3", "dlq-2", "dlq-1")]
    assert [r["message_id"] for r in header["logs"]] == [
        world.messages["split.2"],
        world.messages["split.1"],
    ]
    assert world.messages["split.2"] in child
    assert world.messages["split.1"] not in child


def test_logs_relative_times(cli: Cli, world: World, conn: psycopg.Connection[Any]) -> None:
    """--since/--until accept durations back from now: 30m, 2h, 7d."""
    recent = add_log(conn, world, "recent", "ok", datetime.now(UTC) - timedelta(hours=1),
                     "sendgrid", "delivered", 1, 100)  # fmt: skip
    older = add_log(conn, world, "older", "ok", datetime.now(UTC) - timedelta(days=3),
                    "sendgrid", "delivered", 1, 100)  # fmt: skip

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in as_json(cli("logs", *args, "--json"))["logs"]]

    assert ids("--since", "2h") == [recent]
    assert ids("--since", "7d", "--until", "2d") == [older]
    assert ids("--since", "30m") == []
    assert ids("--since", "1w")[:2] == [recent, older]


def test_logs_pages_and_cursor(cli: Cli, world: World) -> None:
    """--limit pages through everything once with the printed cursor, or by --page."""
    pages = []
    before: list[str] = []
    while True:
        out = as_json(cli("logs", "--limit", "5", *before, "--json"))
        pages.append([r["id"] for r in out["logs"]])
        if out["next_before"] is None:
            break
        assert out["next_before"] == pages[-1][-1]
        before = ["--before", str(out["next_before"])]
    third = as_json(cli("logs", "--limit", "5", "--page", "3", "--json"))
    human = ok(cli("logs", "--limit", "5", "--page", "2"))

    everything = [world.logs[n] for n in NEWEST_FIRST]
    assert pages == [everything[:5], everything[5:10], everything[10:]]
    assert [r["id"] for r in third["logs"]] == everything[10:]
    assert third["next_before"] is None
    assert f"more with --before {everything[9]}" in human


def test_logs_cursor_with_equal_times(
    cli: Cli, world: World, conn: psycopg.Connection[Any]
) -> None:
    """Attempts logged in the same instant are neither skipped nor repeated between pages."""
    when = at(200)
    same = [add_log(conn, world, f"same-{i}", "ok", when, "ses", "delivered", 2, 10)
            for i in range(5)]  # fmt: skip
    seen: list[int] = []
    before: list[str] = []
    while True:
        out = as_json(cli("logs", "--provider", "ses", "--status", "delivered", "--limit", "2",
                          "--since", "2024-05-01T13:00", *before, "--json"))  # fmt: skip
        seen += [r["id"] for r in out["logs"]]
        if out["next_before"] is None:
            break
        before = ["--before", str(out["next_before"])]
    assert seen == sorted(same, reverse=True)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tenant", "nope"], "no tenant named 'nope'"),
        (["--account", "nope"], "no account named 'nope'"),
        (["--tenant", "globex", "--account", "app1"],
         "account 'app1' belongs to tenant 'acme', not 'globex'"),
        (["--since", "yesterdayish"], "--since 'yesterdayish': expected a duration"),
        (["--until", "2024-13-01"], "--until '2024-13-01'"),
        (["--since", "2024-05-02", "--until", "2024-05-01"], "--since must be before --until"),
        (["--status", "deliverd"], "--status 'deliverd': expected one of"),
        (["--limit", "0"], "--limit must be between 1 and 10000"),
        (["--page", "0"], "--page must be 1 or more"),
        (["--before", "999999"], "--before 999999: no delivery log with that id"),
        (["--message-id", "<nobody@nowhere>"], "no message with the id or Message-ID"),
    ],
    ids=["tenant", "account", "account-of-other-tenant", "since", "until", "since-after-until",
         "status", "limit", "page", "cursor", "message-id"],
)  # fmt: skip
def test_logs_bad_input_is_one_error_line(
    cli: Cli, world: World, args: list[str], fragment: str
) -> None:
    """A mistake in the filters exits 1 with one `error:` line naming it."""
    fails(cli("logs", *args), fragment)
    fails(cli("logs", *args, "--json"), fragment)


def test_logs_with_nothing_to_show(cli: Cli, conn: psycopg.Connection[Any]) -> None:
    """An empty installation lists nothing, without failing."""
    assert as_json(cli("logs", "--json"))["logs"] == []
    assert "no delivery attempts match" in ok(cli("logs"))


# -- stats ---------------------------------------------------------------------------------


def percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: interpolated between the neighbouring order statistics."""
    ordered = sorted(values)
    pos = fraction * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def counts(attempts: int, delivered: int, retried: int, failed: int) -> dict[str, Any]:
    rate = round(delivered / attempts, 4) if attempts else None
    return {
        "attempts": attempts,
        "delivered": delivered,
        "retried": retried,
        "failed": failed,
        "success_rate": rate,
    }


def provider(name: str, durations: list[int], delivered: int, retried: int, failed: int) -> Any:
    return {
        "provider": name,
        **counts(len(durations), delivered, retried, failed),
        "avg_ms": round(sum(durations) / len(durations), 1),
        "p95_ms": round(percentile_cont([float(d) for d in durations], 0.95), 1),
    }


def test_stats_sums_up_the_range(cli: Cli, world: World) -> None:
    """`stats --json`: totals by status, provider (rates, avg and p95), tenant and account."""
    out = as_json(cli("stats", *DAY, "--json"))

    assert out["since"] == "2024-05-01T00:00:00+00:00"
    assert out["until"] == "2024-05-02T00:00:00+00:00"
    assert out["filters"] == {"tenant": None, "account": None, "provider": None}
    assert out["total"] == counts(13, 5, 5, 3)
    assert out["by_status"] == {
        "delivered": 5,
        "retrying": 4,
        "dlq": 1,
        "failed": 1,
        "failover": 1,
        "storage_error": 1,
    }
    assert out["by_provider"] == [
        provider("mailgun", [2000, 3000, 4000, 600, 800], 2, 2, 1),
        provider("sendgrid", [850, 1200, 300, 500], 2, 1, 1),
        provider("ses", [400, 30000, 700], 1, 2, 0),
        provider("", [0], 0, 0, 1),
    ]
    # the figures above, worked out by hand once
    assert [(p["avg_ms"], p["p95_ms"]) for p in out["by_provider"]] == [
        (2080.0, 3800.0),
        (712.5, 1147.5),
        (10366.7, 27070.0),
        (0.0, 0.0),
    ]
    assert out["by_tenant"] == [
        {"tenant": "acme", **counts(7, 3, 3, 1)},
        {"tenant": "globex", **counts(6, 2, 2, 2)},
    ]
    assert out["by_account"] == [
        {"account": "app1", "tenant": "acme", **counts(6, 3, 2, 1)},
        {"account": "gx", "tenant": "globex", **counts(6, 2, 2, 2)},
        {"account": "app2", "tenant": "acme", **counts(1, 0, 1, 0)},
    ]
    assert "series" not in out


@pytest.mark.parametrize(
    ("args", "total", "providers"),
    [
        (["--tenant", "globex"], counts(6, 2, 2, 2), ["mailgun", ""]),
        (["--account", "app1"], counts(6, 3, 2, 1), ["sendgrid", "ses"]),
        (["--provider", "ses"], counts(3, 1, 2, 0), ["ses"]),
        (["--tenant", "acme", "--provider", "sendgrid"], counts(4, 2, 1, 1), ["sendgrid"]),
        (["--since", "2024-05-01T10:30", "--until", "2024-05-01T11:00"], counts(4, 1, 1, 2),
         ["", "mailgun", "sendgrid", "ses"]),
    ],
    ids=["tenant", "account", "provider", "tenant-provider", "half-hour"],
)  # fmt: skip
def test_stats_filters(
    cli: Cli, world: World, args: list[str], total: dict[str, Any], providers: list[str]
) -> None:
    """--tenant, --account, --provider and the range narrow every table the same way."""
    range_args = list(DAY) if "--since" not in args else []
    out = as_json(cli("stats", *range_args, *args, "--json"))

    assert out["total"] == total
    assert [p["provider"] for p in out["by_provider"]] == providers
    assert sum(out["by_status"].values()) == total["attempts"]
    assert sum(t["attempts"] for t in out["by_tenant"]) == total["attempts"]
    assert sum(a["attempts"] for a in out["by_account"]) == total["attempts"]


def test_stats_default_range_is_the_last_day(
    cli: Cli, world: World, conn: psycopg.Connection[Any]
) -> None:
    """Without --since, stats covers the last 24 hours only."""
    add_log(conn, world, "today", "ok", datetime.now(UTC) - timedelta(hours=3), "ses",
            "delivered", 1, 250)  # fmt: skip
    add_log(conn, world, "last week", "ok", datetime.now(UTC) - timedelta(days=6), "ses",
            "failed", 1, 250)  # fmt: skip

    day = as_json(cli("stats", "--json"))
    week = as_json(cli("stats", "--since", "7d", "--json"))

    assert day["total"] == counts(1, 1, 0, 0)
    assert week["total"] == counts(2, 1, 0, 1)
    since = datetime.fromisoformat(day["since"])
    until = datetime.fromisoformat(day["until"])
    assert until - since == timedelta(hours=24)
    assert abs((until - datetime.now(UTC)).total_seconds()) < 60


def test_stats_tables(cli: Cli, world: World) -> None:
    """The human report shows the totals line and a row per status, provider, tenant, account."""
    out = ok(cli("stats", *DAY))

    assert "delivery attempts from 2024-05-01 00:00:00 to 2024-05-02 00:00:00 UTC" in out
    assert "13 attempts: 5 delivered, 5 retried, 3 failed; success rate 38.5%" in out
    lines = out.splitlines()

    def row(first: str) -> str:
        return next(line for line in lines if line.startswith(f"│ {first} "))

    assert all(c in row("mailgun") for c in ("5", "2", "1", "40.0%", "2.08 s", "3.80 s"))
    assert all(c in row("sendgrid") for c in ("4", "50.0%", "712 ms", "1.15 s"))
    assert all(c in row("ses") for c in ("3", "33.3%", "10.37 s", "27.07 s"))
    assert all(c in row("(none)") for c in ("1", "0.0%", "0 ms"))
    assert all(c in row("acme") for c in ("7", "3", "1", "42.9%"))
    assert all(c in row("gx") for c in ("globex", "6", "33.3%"))
    assert all(c in row("storage_error") for c in ("1", "7.7%"))
    assert "per hour" not in out


def test_stats_time_series(cli: Cli, world: World) -> None:
    """--by hour gives one bucket per hour of the range, empty ones too, and draws bars."""
    args = ("--since", "2024-05-01T09:00", "--until", "2024-05-01T12:00", "--by", "hour")
    out = as_json(cli("stats", *args, "--json"))
    human = ok(cli("stats", *args))
    days = as_json(cli("stats", "--since", "2024-04-30", "--until", "2024-05-02T12:00",
                       "--by", "day", "--json"))  # fmt: skip

    assert out["series"] == {
        "by": "hour",
        "buckets": [
            {"start": "2024-05-01T09:00:00+00:00", "attempts": 0, "delivered": 0, "retried": 0,
             "failed": 0},
            {"start": "2024-05-01T10:00:00+00:00", "attempts": 11, "delivered": 3, "retried": 5,
             "failed": 3},
            {"start": "2024-05-01T11:00:00+00:00", "attempts": 2, "delivered": 2, "retried": 0,
             "failed": 0},
        ],
    }  # fmt: skip
    assert [(b["start"], b["attempts"]) for b in days["series"]["buckets"]] == [
        ("2024-04-30T00:00:00+00:00", 0),
        ("2024-05-01T00:00:00+00:00", 13),
        ("2024-05-02T00:00:00+00:00", 0),
    ]
    assert "per hour:" in human
    bars = {line[:16]: line for line in human.splitlines() if line.startswith("2024-05-01 ")}
    assert set(bars) == {"2024-05-01 09:00", "2024-05-01 10:00", "2024-05-01 11:00"}
    ten = bars["2024-05-01 10:00"]
    assert "█" in ten and "▒" in ten and "░" in ten
    assert "11 (3 ok, 5 retried, 3 failed)" in ten
    assert ten.count("█") > bars["2024-05-01 11:00"].count("█") > 0
    assert "█" not in bars["2024-05-01 09:00"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tenant", "nope"], "no tenant named 'nope'"),
        (["--account", "nope"], "no account named 'nope'"),
        (["--by", "week"], "--by 'week': expected hour or day"),
        (["--since", "soon"], "--since 'soon'"),
        (["--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["--since", "400d", "--by", "hour"], "more than 2000 bars"),
    ],
    ids=["tenant", "account", "by", "since", "backwards", "too-many-bars"],
)
def test_stats_bad_input_is_one_error_line(
    cli: Cli, world: World, args: list[str], fragment: str
) -> None:
    """A mistake exits 1 with one `error:` line naming it."""
    fails(cli("stats", *args, "--json"), fragment)


def test_stats_with_no_attempts(cli: Cli, world: World) -> None:
    """A range without attempts reports zeros (and no rates) instead of failing."""
    out = as_json(cli("stats", "--since", "2020-01-01", "--until", "2020-01-02", "--json"))
    human = ok(cli("stats", "--since", "2020-01-01", "--until", "2020-01-02"))

    assert out["total"] == counts(0, 0, 0, 0)
    assert (out["by_status"], out["by_provider"], out["by_tenant"]) == ({}, [], [])
    assert "no delivery attempts in this range" in human


@pytest.fixture
def million(tmp_path: Path, pg_admin_url: str, redis_url: str, key_prefix: str) -> Iterator[Any]:
    """A database of its own holding 1,000,000 generated attempts, one a second."""
    name = f"smtpproxy_reports_{secrets.token_hex(5)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**info)
    try:
        migrate.migrate(url)
        base = datetime(2024, 6, 1, tzinfo=UTC)
        reportdata.load(url, 1_000_000, base, 1.0)
        config = write_config(tmp_path / "big.toml", settings(tmp_path, url, redis_url, key_prefix))
        yield config, url, base
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def expected_stats(rows: range) -> dict[str, Any]:
    """What stats must say about generated attempts g in rows, worked out in Python."""
    status: Counter[str] = Counter()
    tally: dict[tuple[str, str], Counter[str]] = {}
    durations: dict[str, list[float]] = {}
    for g in rows:
        a = reportdata.attempt(g)
        cls = reports.outcome_class(a.status)
        status[a.status] += 1
        for key in (("provider", a.provider), ("tenant", a.tenant), ("account", a.account)):
            tally.setdefault(key, Counter()).update(["attempts", cls])
        durations.setdefault(a.provider, []).append(a.duration_ms)

    def c(key: tuple[str, str]) -> dict[str, Any]:
        t = tally[key]
        return counts(t["attempts"], t["delivered"], t["retried"], t["failed"])

    by_provider = {
        name: {
            "provider": name,
            **c(("provider", name)),
            "avg_ms": round(sum(d) / len(d), 1),
            "p95_ms": round(percentile_cont(d, 0.95), 1),
        }
        for name, d in durations.items()
    }
    total = Counter(reports.outcome_class(s) for s in status.elements())
    return {
        "total": counts(len(rows), total["delivered"], total["retried"], total["failed"]),
        "by_status": dict(status),
        "by_provider": by_provider,
        "by_tenant": {k[1]: c(k) for k in tally if k[0] == "tenant"},
        "by_account": {k[1]: c(k) for k in tally if k[0] == "account"},
    }


def test_stats_on_a_million_attempts(million: Any) -> None:
    """On 1,000,000 rows stats stays exact: every count, rate, average and p95, any range."""
    config, url, base = million
    # attempt g happened at base - g seconds: the last day holds g = 1..86400
    day = as_json(run_cli(config, "stats", "--since", iso(base - timedelta(days=1)),
                          "--until", iso(base), "--json"))  # fmt: skip
    everything = as_json(run_cli(config, "stats", "--since", "2024-01-01", "--until",
                                 iso(base), "--by", "day", "--json"))  # fmt: skip

    for out, rows in ((day, range(1, 86401)), (everything, range(1, 1_000_001))):
        want = expected_stats(rows)
        assert out["total"] == want["total"]
        assert out["by_status"] == want["by_status"]
        assert {p["provider"]: p for p in out["by_provider"]} == want["by_provider"]
        assert {t["tenant"]: {k: v for k, v in t.items() if k != "tenant"}
                for t in out["by_tenant"]} == want["by_tenant"]  # fmt: skip
        assert {a["account"]: {k: v for k, v in a.items() if k not in ("account", "tenant")}
                for a in out["by_account"]} == want["by_account"]  # fmt: skip
    buckets = everything["series"]["buckets"]
    assert sum(b["attempts"] for b in buckets) == 1_000_000
    assert buckets[-1]["attempts"] == 86400  # the last whole day before base
    # the histogram percentile is PostgreSQL's own percentile_cont
    with psycopg.connect(url) as conn:
        own = dict(
            conn.execute(
                "SELECT provider_name, round(percentile_cont(0.95) WITHIN GROUP"
                " (ORDER BY duration_ms)::numeric, 1)::float8 FROM delivery_logs GROUP BY 1"
            ).fetchall()
        )
    assert {p["provider"]: p["p95_ms"] for p in everything["by_provider"]} == own


# -- message show --------------------------------------------------------------------------


def test_message_show_json_is_the_whole_story(
    cli: Cli, world: World, conn: psycopg.Connection[Any]
) -> None:
    """`message show ID --json`: acceptance, status, every attempt and the timeline."""
    out = as_json(cli("message", "show", world.messages["failover"], "--json"))

    mid = world.messages["failover"]
    accepted = {
        k: out[k]
        for k in ("id", "parent_id", "status", "tenant", "account", "created_at", "client_ip",
                  "size", "mail_from", "rcpt_to", "subject", "header_message_id", "attempts",
                  "next_attempt_at", "provider_name", "provider_message_id", "last_error",
                  "finished_at")
    }  # fmt: skip
    assert accepted == {
        "id": mid,
        "parent_id": None,
        "status": "delivered",
        "tenant": "acme",
        "account": "app1",
        "created_at": "2024-05-01T10:05:00+00:00",
        "client_ip": "203.0.113.7",
        "size": 2048,
        "mail_from": "app1@acme.test",
        "rcpt_to": ["bob@example.org", "carol@example.org"],
        "subject": "failover subject",
        "header_message_id": "",
        "attempts": 1,
        "next_attempt_at": None,
        "provider_name": "ses",
        "provider_message_id": "ses-1",
        "last_error": None,
        "finished_at": "2024-05-01T10:05:03+00:00",
    }
    assert out["body"] == {
        "stored": True,
        "state": "stored",
        "storage_key": f"ab/{mid}",
        "deleted_at": None,
    }
    assert (out["parent"], out["children"]) == (None, [])
    assert [(a["id"], a["provider"], a["status"], a["duration_ms"], a["error"])
            for a in out["delivery_attempts"]] == [
        (world.logs["failover-1"], "sendgrid", "failover", 1200, "503 Service Unavailable"),
        (world.logs["failover-2"], "ses", "delivered", 400, ""),
    ]  # fmt: skip
    assert [(e["at"], e["event"]) for e in out["timeline"]] == [
        ("2024-05-01T10:05:00+00:00", "accepted"),
        ("2024-05-01T10:05:01+00:00", "attempt"),
        ("2024-05-01T10:05:03+00:00", "attempt"),
        ("2024-05-01T10:05:03+00:00", "finished"),
    ]
    assert out["timeline"][1]["detail"] == (
        "attempt 1 via sendgrid: failover in 1.20 s: 503 Service Unavailable"
    )


def test_message_show_panel_and_timeline(cli: Cli, world: World) -> None:
    """The human view: a panel of facts (user data verbatim, never markup), then the timeline."""
    out = ok(cli("message", "show", world.messages["dlq"]))

    assert f"message {world.messages['dlq']}" in out
    for cell in ("dlq  after 3 attempts", "globex  (account gx)",
                 "2024-05-01 10:15:00 UTC from 203.0.113.7", "gx@globex.test",
                 "erin@example.net", "[red]Overdue[/red] invoice: 50% off [link=x]",
                 "2,048 bytes", "mailgun",
                 "gave up after 3 attempts: 421 try again later", "stored (ab/"):  # fmt: skip
        assert cell in out, cell
    timeline = [line for line in out.splitlines() if line.startswith("│ 2024-05-01")]
    assert [line.split("│")[2].strip() for line in timeline] == [
        "accepted", "attempt", "attempt", "attempt", "finished",
    ]  # fmt: skip
    assert "attempt 2 via mailgun: retrying in 3.00 s: 421 try again later" in timeline[2]


def test_message_show_by_header_with_split_children(
    cli: Cli, world: World, conn: psycopg.Connection[Any]
) -> None:
    """A Message-ID header finds the split parent (not its children) and shows both children."""
    out = as_json(cli("message", "show", "<split@acme.test>", "--json"))
    bare = as_json(cli("message", "show", "split@acme.test", "--json"))
    human = ok(cli("message", "show", "split@acme.test"))
    next_at = db_time(conn, "SELECT next_attempt_at FROM messages WHERE id = %s",
                      world.messages["split.2"])  # fmt: skip

    one, two = world.messages["split.1"], world.messages["split.2"]
    assert out["id"] == bare["id"] == world.messages["split"]
    assert out["status"] == "split"
    assert [(c["id"], c["status"], c["rcpt_to"]) for c in out["children"]] == [
        (one, "delivered", ["a@one.test"]),
        (two, "retrying", ["b@two.test"]),
    ]
    assert out["children"][1]["next_attempt_at"] == next_at
    assert [a["message_id"] for a in out["delivery_attempts"]] == [one, two]
    events = [(e["event"], e["message_id"]) for e in out["timeline"]]
    assert events == [
        ("accepted", world.messages["split"]),
        ("split", world.messages["split"]),
        ("attempt", one),
        ("finished", one),
        ("attempt", two),
        ("next attempt", two),
    ]
    assert f"split by route into 2 messages: {one}, {two}" in out["timeline"][1]["detail"]
    assert f"{one}  delivered  a@one.test" in human
    assert f"{two}  retrying  b@two.test" in human


def test_message_show_child_and_live_states(
    cli: Cli, world: World, conn: psycopg.Connection[Any]
) -> None:
    """A child names its parent; retrying and sending messages say what happens next."""
    child = as_json(cli("message", "show", world.messages["split.2"], "--json"))
    retry = ok(cli("message", "show", world.messages["retry"]))
    sending = ok(cli("message", "show", world.messages["sending"]))
    queued = as_json(cli("message", "show", world.messages["queued"], "--json"))

    assert child["parent"] == {
        "id": world.messages["split"],
        "status": "split",
        "rcpt_to": ["a@one.test", "b@two.test"],
        "finished_at": "2024-05-01T10:40:01+00:00",
    }
    next_at = db_time(conn, "SELECT next_attempt_at FROM messages WHERE id = %s",
                      world.messages["retry"])  # fmt: skip
    shown = datetime.fromisoformat(next_at).strftime("%Y-%m-%d %H:%M:%S")
    assert f"retrying  after 1 attempt, next attempt at {shown} UTC" in retry
    assert "timed out after 30 s" in retry
    assert "claimed by relay-1:4242 at 2024-05-01 10:55:01 UTC" in sending
    assert queued["delivery_attempts"] == []
    assert [e["event"] for e in queued["timeline"]] == ["accepted"]


def test_message_show_body_state(cli: Cli, world: World) -> None:
    """Whether the body is still stored: deleted by retention, or lost (storage_error)."""
    deleted = as_json(cli("message", "show", world.messages["dup-1"], "--json"))
    lost = ok(cli("message", "show", world.messages["lost"]))

    assert deleted["body"] == {
        "stored": False,
        "state": "deleted",
        "storage_key": f"ab/{world.messages['dup-1']}",
        "deleted_at": "2024-05-01T11:30:00+00:00",
    }
    assert deleted["timeline"][-1]["event"] == "body deleted"
    assert "missing from the store" in lost
    assert "storage_error  after 1 attempt" in lost


def test_message_show_ambiguous_header_lists_the_messages(cli: Cli, world: World) -> None:
    """A Message-ID of several messages lists them on stdout and exits 1 asking for an id."""
    result = cli("message", "show", "<dup@globex.test>")
    as_list = cli("message", "show", "dup@globex.test", "--json")

    fails(result, "2 messages have the Message-ID <dup@globex.test>", "by its id", stdout=True)
    assert world.messages["dup-1"] in result.stdout
    assert world.messages["dup-2"] in result.stdout
    fails(as_list, "2 messages", stdout=True)
    assert [m["id"] for m in json.loads(as_list.stdout)["matches"]] == [
        world.messages["dup-1"],
        world.messages["dup-2"],
    ]


def test_message_show_unknown_is_one_error_line(cli: Cli, world: World) -> None:
    """An id or Message-ID that matches nothing exits 1 with one `error:` line."""
    fails(cli("message", "show", "01HZZZZZZZZZZZZZZZZZZZZZZZ"), "no message with the id")
    fails(cli("message", "show", "<missing@acme.test>", "--json"), "'<missing@acme.test>'")


# -- queue status --------------------------------------------------------------------------


@pytest.fixture
def streams(redis_url: str, key_prefix: str, clean: None) -> Iterator[Streams]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield Streams(client, key_prefix)
    client.close()


def enqueue(streams: Streams, world: World, *names: str) -> None:
    streams.add_many([
        {"id": world.messages[n], "tenant_id": str(world.tenants[t]),
         "account_id": str(world.accounts[a])}
        for n, t, a in (("queued", "acme", "app2"), ("sending", "acme", "app1"),
                        ("lost", "globex", "gx"))
        if n in names
    ])  # fmt: skip


def test_queue_status_per_tenant(
    cli: Cli, world: World, streams: Streams, conn: psycopg.Connection[Any]
) -> None:
    """`queue status --json`: PostgreSQL counts per tenant, stream lengths, pending, DLQ."""
    enqueue(streams, world, "queued", "sending")
    acme = streams.stream_for(world.tenants["acme"])
    streams.ensure_groups([acme])
    assert len(streams.read("relay-1:4242", [acme], count=1, block_ms=1)) == 1
    streams.add_dead_letter({"id": world.messages["dlq"], "reason": "gave up"})

    out = as_json(cli("queue", "status", "--json"))

    next_retry = db_time(
        conn,
        "SELECT min(next_attempt_at) FROM messages WHERE status = 'retrying' AND tenant_id = %s",
        world.tenants["acme"],
    )
    acme_row, globex_row = out["tenants"]
    age = acme_row.pop("oldest_live_age_s")
    expected_age = (datetime.now(UTC) - at(10)).total_seconds()
    assert abs(age - expected_age) < 60
    assert acme_row == {
        "tenant": "acme",
        "tenant_id": world.tenants["acme"],
        "queued": 1,
        "retrying": 2,
        "sending": 1,
        "next_retry_at": next_retry,
        "oldest_live_at": "2024-05-01T10:10:00+00:00",
        "dlq": 0,
        "failed": 1,
        "storage_error": 0,
        "dead": 1,
        "stream_length": 2,
        "stream_pending": 1,
    }
    assert globex_row == {
        "tenant": "globex",
        "tenant_id": world.tenants["globex"],
        "queued": 0,
        "retrying": 0,
        "sending": 0,
        "next_retry_at": None,
        "oldest_live_at": None,
        "oldest_live_age_s": None,
        "dlq": 1,
        "failed": 0,
        "storage_error": 1,
        "dead": 2,
        "stream_length": 0,
        "stream_pending": 0,
    }
    totals = out["totals"]
    assert {k: totals[k] for k in ("queued", "retrying", "sending", "dlq", "failed",
                                   "storage_error", "dead")} == {
        "queued": 1, "retrying": 2, "sending": 1, "dlq": 1, "failed": 1, "storage_error": 1,
        "dead": 3,
    }  # fmt: skip
    assert totals["next_retry_at"] == next_retry
    assert out["redis"] == {
        "available": True,
        "stream_length": 2,
        "pending": 1,
        "consumers": {"relay-1:4242": 1},
        "streams": [
            {"stream": streams.legacy, "tenant_id": None, "length": 0, "pending": 0},
            {"stream": acme, "tenant_id": world.tenants["acme"], "length": 2, "pending": 1},
        ],
        "dlq_stream": streams.dead_letters,
        "dlq_stream_length": 1,
    }


def test_queue_status_tables(cli: Cli, world: World, streams: Streams) -> None:
    """The human view: summary lines, a row per tenant, pending per consumer."""
    enqueue(streams, world, "queued", "lost")
    globex = streams.stream_for(world.tenants["globex"])
    streams.ensure_groups([globex])
    streams.read("relay-2:77", [globex], count=5, block_ms=1)

    out = ok(cli("queue", "status"))

    assert "PostgreSQL: 1 queued, 2 retrying, 1 sending; oldest waiting " in out
    assert "3 dead letters (1 dlq, 1 failed, 1 storage_error)" in out
    assert "Redis: 2 entries on 3 streams, 1 read by a consumer and not finished" in out
    assert f"dead-letter stream {streams.dead_letters}: 0 entries" in out
    lines = out.splitlines()
    acme = next(line for line in lines if line.startswith("│ acme "))
    globex_line = next(line for line in lines if line.startswith("│ globex "))
    assert "(in 4m" in acme or "(in 5m" in acme  # split.2 is due in 5 minutes
    assert [c.strip() for c in globex_line.split("│")[1:-1]] == [
        "globex", "0", "0", "-", "0", "-", "1", "1", "1", "0", "1",
    ]  # fmt: skip
    assert (
        next(line for line in lines if line.startswith("│ relay-2:77 ")).split("│")[2].strip()
        == "1"
    )


def test_queue_status_without_redis(
    tmp_path: Path, pg_url: str, key_prefix: str, world: World
) -> None:
    """Redis down: the PostgreSQL numbers are still shown, the command says so and exits 1."""
    raw = settings(tmp_path, pg_url, "redis://127.0.0.1:1/0", key_prefix)
    config = write_config(tmp_path / "noredis.toml", raw)

    human = run_cli(config, "queue", "status")
    machine = run_cli(config, "queue", "status", "--json")

    fails(human, "redis unavailable", stdout=True)
    assert "PostgreSQL: 1 queued, 2 retrying, 1 sending" in human.stdout
    assert "Redis unavailable (redis unavailable:" in human.stdout
    assert "on stream" not in human.stdout
    fails(machine, "redis unavailable", stdout=True)
    out = json.loads(machine.stdout)
    assert out["redis"]["available"] is False
    assert "redis unavailable" in out["redis"]["error"]
    assert out["totals"]["dead"] == 3
    assert all(t["stream_length"] is None for t in out["tenants"])


def test_queue_status_when_idle(cli: Cli, conn: psycopg.Connection[Any]) -> None:
    """Nothing queued and no dead letters: zeros, and exit 0."""
    out = as_json(cli("queue", "status", "--json"))
    human = ok(cli("queue", "status"))

    assert out["tenants"] == []
    assert out["totals"]["queued"] == 0
    assert out["redis"]["stream_length"] == 0
    assert "no messages waiting and no dead letters" in human


# -- read only -----------------------------------------------------------------------------


@pytest.fixture
def reader_url(pg_url: str) -> Iterator[str]:
    """A login that may only SELECT, and not accounts.password_hash or providers.secret."""
    role = f"smtpproxy_reports_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        for table in ("tenants", "routing_rules", "messages", "delivery_logs",
                      "schema_migrations"):  # fmt: skip
            conn.execute(f'GRANT SELECT ON {table} TO "{role}"')
        for table, hidden in (("accounts", "password_hash"), ("providers", "secret")):
            columns = [
                r[0]
                for r in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
                    " AND attnum > 0 AND NOT attisdropped AND attname <> %s",
                    (table, hidden),
                )
            ]
            conn.execute(f'GRANT SELECT ({", ".join(columns)}) ON {table} TO "{role}"')
    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    info["user"] = role
    info.pop("password", None)
    yield psycopg.conninfo.make_conninfo(**info)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_reports_need_only_select(
    tmp_path: Path, reader_url: str, redis_url: str, key_prefix: str, world: World
) -> None:
    """Every report runs as a role that can only read, and never reads secrets."""
    config = write_config(
        tmp_path / "reader.toml", settings(tmp_path, reader_url, redis_url, key_prefix)
    )
    assert as_json(run_cli(config, "logs", "--tenant", "acme", "--json"))["logs"]
    assert as_json(run_cli(config, "stats", *DAY, "--account", "gx", "--json"))["total"]
    assert as_json(run_cli(config, "message", "show", "<inv-1@acme.test>", "--json"))["id"]
    assert as_json(run_cli(config, "queue", "status", "--json"))["tenants"]


REPORTS = [["logs"], ["stats"], ["message", "show", "X"], ["queue", "status"]]


@pytest.mark.parametrize("command", REPORTS, ids=lambda c: " ".join(c[:2]))
def test_help_has_an_example(tmp_path: Path, command: list[str]) -> None:
    """Every report's --help works without a database and shows an example of itself."""
    name = " ".join(c for c in command if c != "X")
    out = ok(run_cli(tmp_path / "absent.toml", *command[:2], "--help"))
    assert "Example" in out
    assert f"smtpproxy {name}" in out.replace("\n", " ")


@pytest.mark.parametrize("command", REPORTS, ids=lambda c: " ".join(c[:2]))
def test_reports_without_the_database(
    tmp_path: Path, redis_url: str, key_prefix: str, command: list[str]
) -> None:
    """PostgreSQL unreachable: one `error:` line and exit 1, never a traceback."""
    raw = settings(tmp_path, "postgresql://nobody@127.0.0.1:1/none", redis_url, key_prefix)
    config = write_config(tmp_path / "nodb.toml", raw)
    fails(run_cli(config, *command), "127.0.0.1")


# -- helpers -------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(days=7)),
        ("90s", NOW - timedelta(seconds=90)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2h ago", NOW - timedelta(hours=2)),
        ("now", NOW),
        ("today", datetime(2024, 5, 1, tzinfo=UTC)),
        ("yesterday", datetime(2024, 4, 30, tzinfo=UTC)),
        ("2024-04-01", datetime(2024, 4, 1, tzinfo=UTC)),
        ("2024-04-01T08:15", datetime(2024, 4, 1, 8, 15, tzinfo=UTC)),
        ("2024-04-01 08:15:30Z", datetime(2024, 4, 1, 8, 15, 30, tzinfo=UTC)),
        ("2024-04-01T10:15:30+02:00", datetime(2024, 4, 1, 8, 15, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    """WHEN is a duration back from now, a keyword, or an ISO date or time (UTC by default)."""
    assert reports.parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "soon", "-2h", "2 hours", "2024-02-30", "12:00"])
def test_parse_when_rejects_nonsense(text: str) -> None:
    """Anything else is a UsageError that names the option and shows the accepted forms."""
    with pytest.raises(UsageError, match=r"--until .*expected a duration"):
        reports.parse_when(text, NOW, "--until")


@pytest.mark.parametrize(
    ("parts", "peak", "width", "cells"),
    [
        ([3, 5, 3], 11, 22, [6, 10, 6]),
        ([2, 0, 0], 11, 22, [4, 0, 0]),
        ([0, 0, 0], 11, 22, [0, 0, 0]),
        ([1, 0, 0], 1000, 20, [1, 0, 0]),
        ([1, 1, 1], 3, 10, [3, 4, 3]),
    ],
)
def test_bar_cells(parts: list[int], peak: int, width: int, cells: list[int]) -> None:
    """Stacked bars keep their total to scale, and a non-empty bucket shows at least a cell."""
    assert reports.bar_cells(parts, peak, width) == cells


def test_shorten_and_cells() -> None:
    """Errors are cut to one line with an ellipsis; recipients show the first and a count."""
    assert reports.shorten("a\n  b", 10) == "a b"
    assert reports.shorten("x" * 20, 10) == "x" * 9 + "…"
    assert reports.recipients_cell(["a@x", "b@x", "c@x"]) == "a@x (+2)"
    assert reports.recipients_cell([]) == "-"
    assert reports.format_ms(999) == "999 ms"
    assert reports.format_ms(1234) == "1.23 s"
    assert reports.format_age(3 * 86400 + 4 * 3600 + 5) == "3d 4h"
    assert reports.header_id(" <abc@x> ") == "abc@x"


@pytest.mark.parametrize(
    ("since", "until", "by", "starts"),
    [
        ("2024-05-01T10:30", "2024-05-01T12:00", "hour", ["10:00", "11:00"]),
        ("2024-05-01T10:00", "2024-05-01T12:00:01", "hour", ["10:00", "11:00", "12:00"]),
        ("2024-05-01T23:59", "2024-05-03T00:00", "day", ["05-01", "05-02"]),
    ],
)
def test_bucket_starts(since: str, until: str, by: str, starts: list[str]) -> None:
    """Buckets cover every hour or day the range touches, the partial first one too."""
    got = reports.bucket_starts(reports.parse_when(since, NOW), reports.parse_when(until, NOW), by)
    fmt = "%H:%M" if by == "hour" else "%m-%d"
    assert [b.strftime(fmt) for b in got] == starts
