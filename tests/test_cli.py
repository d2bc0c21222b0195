"""The `smtpproxy` command line against real PostgreSQL.

Each test writes a config file, runs `smtpproxy --config FILE ...` (in this process, see
tests/support/cli.py; a few as a real process) and checks exit codes, what reaches stdout
and stderr (errors are one `error:` line, never a traceback, never a secret) and what the
command left in the database.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.config.crypto import SecretBox
from smtpproxy.config.passwords import hash_password, verify_password
from smtpproxy.db import migrate
from tests.conftest import CliConfigFactory
from tests.support.cli import Cli, as_json, config_settings, fails, ok, run_cli, run_cli_process
from tests.support.process import write_config

TABLES = ("tenants", "accounts", "providers", "routing_rules")
SG_SECRET = "SG.secret-value"
MASK = "********"


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    out = {}
    for table in TABLES:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        out[table] = int(row[0])
    return out


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def config_path(cli_config_file: CliConfigFactory, secret_key: str) -> Path:
    return cli_config_file(secret_key)


@pytest.fixture
def cli(config_path: Path) -> Cli:
    """`cli(*args, input=None)`: the command with the test's config file."""
    return functools.partial(run_cli, config_path)


# Setup that is not under test goes straight through smtpproxy.admin (what the commands
# call), which is much faster than a process per step.


@pytest.fixture
def tenant(conn: psycopg.Connection[Any]) -> Callable[[str], int]:
    """`tenant(name)` creates a tenant and returns its id."""
    return lambda name: admin.add_tenant(conn, name)


@pytest.fixture
def acme(conn: psycopg.Connection[Any], secret_key: str) -> None:
    """Tenant acme with account app1, a SendGrid provider sg and a file provider out."""
    admin.add_tenant(conn, "acme")
    admin.add_account(conn, "app1", "acme", hash_password("app1-password"), [])
    box = SecretBox(secret_key.encode())
    for name, ptype, endpoint, values, secret in [
        ("sg", "sendgrid", "http://127.0.0.1:9", {}, SG_SECRET),
        ("out", "file", None, {"path": "/tmp/x"}, None),
    ]:
        admin.add_provider(
            conn,
            "acme",
            name,
            ptype,
            endpoint=endpoint,
            settings=values,
            secret=secret,
            encrypt=box.encrypt,
        )


def add_route(conn: psycopg.Connection[Any], provider: str, priority: int | None = None) -> None:
    admin.add_route(
        conn,
        "acme",
        provider,
        priority=priority,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )


# -- tenants -------------------------------------------------------------------------------


def test_tenant_add_creates_tenants(cli: Cli, conn: psycopg.Connection[Any]) -> None:
    """`tenant add` stores the tenant, with or without a monthly limit, and reports its id."""
    assert "tenant acme created" in ok(cli("tenant", "add", "acme"))
    created = as_json(cli("tenant", "add", "big", "--monthly-limit", "5", "--json"))

    rows = conn.execute(
        "SELECT id, name, status, monthly_limit FROM tenants ORDER BY id"
    ).fetchall()
    assert rows == [(1, "acme", "active", None), (created["id"], "big", "active", 5)]
    assert created["name"] == "big"


def test_tenant_add_duplicate_is_one_error_line(cli: Cli, conn: psycopg.Connection[Any]) -> None:
    """Adding an existing tenant exits 1 with a single `error:` line and changes nothing."""
    ok(cli("tenant", "add", "acme"))
    before = counts(conn)

    result = cli("tenant", "add", "acme")

    fails(result, "tenant 'acme' already exists")
    assert counts(conn) == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["a b"], "invalid name"),
        (["_acme"], "invalid name"),
        (["x" * 64], "invalid name"),
        (["acme", "--monthly-limit", "-1"], "--monthly-limit must not be negative"),
    ],
    ids=["space", "leading-underscore", "too-long", "negative-limit"],
)
def test_tenant_add_rejects_bad_input(
    cli: Cli, conn: psycopg.Connection[Any], args: list[str], fragment: str
) -> None:
    """A bad tenant name or limit exits 1 with an error naming the problem; no row is written."""
    fails(cli("tenant", "add", *args), fragment)
    assert counts(conn)["tenants"] == 0


def test_tenant_list_counts_accounts_providers_routes(
    cli: Cli, conn: psycopg.Connection[Any], acme: None
) -> None:
    """`tenant list` shows every tenant with the right numbers of accounts, providers, routes."""
    admin.add_account(conn, "app2", "acme", hash_password("pw"), [])
    add_route(conn, "sg")
    admin.add_tenant(conn, "globex", 1000)

    listed = as_json(cli("tenant", "list", "--json"))
    human = ok(cli("tenant", "list"))

    summary = [
        {k: t[k] for k in ("name", "status", "monthly_limit", "accounts", "providers", "routes")}
        for t in listed
    ]
    assert summary == [
        {"name": "acme", "status": "active", "monthly_limit": None}
        | {"accounts": 2, "providers": 2, "routes": 1},
        {"name": "globex", "status": "active", "monthly_limit": 1000}
        | {"accounts": 0, "providers": 0, "routes": 0},
    ]
    assert all(isinstance(t["id"], int) and t["created_at"] for t in listed)
    assert "acme" in human
    assert "globex" in human


def test_tenant_list_when_empty(cli: Cli) -> None:
    """With no tenants, `tenant list` says so and `--json` prints an empty list."""
    assert "no tenants" in ok(cli("tenant", "list"))
    assert as_json(cli("tenant", "list", "--json")) == []


def test_tenant_show(cli: Cli, conn: psycopg.Connection[Any], acme: None) -> None:
    """`tenant show --json` describes the tenant with its accounts, providers and routes."""
    add_route(conn, "sg", priority=7)

    shown = as_json(cli("tenant", "show", "acme", "--json"))
    human = ok(cli("tenant", "show", "acme"))

    assert shown["name"] == "acme"
    assert shown["status"] == "active"
    assert shown["monthly_limit"] is None
    assert shown["accounts"] == ["app1"]
    assert shown["providers"] == ["out", "sg"]
    assert shown["routes"] == ["#1 prio 7 -> sg"]
    assert "app1" in human


def test_tenant_show_unknown_fails(cli: Cli) -> None:
    """`tenant show` of a tenant that does not exist exits 1 with one error line."""
    result = cli("tenant", "show", "nope")
    fails(result, "no tenant named 'nope'")


# -- accounts ------------------------------------------------------------------------------


def stored_account(conn: psycopg.Connection[Any], username: str) -> tuple[str, list[str]]:
    row = conn.execute(
        "SELECT password_hash, allowed_domains FROM accounts WHERE username = %s", (username,)
    ).fetchone()
    assert row is not None, f"no account {username}"
    return row[0], row[1]


def test_account_add_generates_a_password_shown_once(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int]
) -> None:
    """Without --password-stdin a password is generated, printed once, stored only hashed,
    and never shown again by `account show` or `account list`."""
    tenant("acme")

    out = ok(
        cli(
            *("account", "add", "app1", "--tenant", "acme"),
            *("--allow-domain", "example.com", "--allow-domain", "*.Example.ORG"),
        )
    )
    match = re.search(r"password: (\S+)", out)
    assert match is not None, out
    password = match.group(1)
    created = as_json(cli("account", "add", "app2", "--tenant", "acme", "--json"))

    assert "account app1 created" in out
    assert out.count(password) == 1
    hash1, domains = stored_account(conn, "app1")
    assert verify_password(password, hash1)
    assert domains == ["*.example.org", "example.com"]
    assert created["username"] == "app2"
    assert created["tenant"] == "acme"
    hash2, _ = stored_account(conn, "app2")
    assert verify_password(created["password"], hash2)
    assert not verify_password(password, hash2)

    shown = as_json(cli("account", "show", "app1", "--json"))
    listed = as_json(cli("account", "list", "--json"))
    outputs = [
        json.dumps(shown),
        json.dumps(listed),
        ok(cli("account", "show", "app1")),
        ok(cli("account", "list")),
        ok(cli("account", "list", "--tenant", "acme")),
    ]
    assert shown["allowed_domains"] == ["*.example.org", "example.com"]
    assert shown["tenant"] == "acme"
    assert [a["username"] for a in listed] == ["app1", "app2"]
    for text in outputs:
        assert password not in text
        assert created["password"] not in text
        assert "scrypt$" not in text


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["human", "json"])
def test_account_add_password_from_stdin(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int], json_flag: list[str]
) -> None:
    """--password-stdin stores the first line of stdin (hashed) and never prints it."""
    tenant("acme")

    result = cli(
        "account",
        "add",
        "app1",
        "--tenant",
        "acme",
        "--password-stdin",
        *json_flag,
        input="s3cret\n",
    )

    ok(result)
    assert "s3cret" not in result.stdout + result.stderr
    if json_flag:
        assert "password" not in json.loads(result.stdout)
    else:
        assert "password:" not in result.stdout
    password_hash, _ = stored_account(conn, "app1")
    assert verify_password("s3cret", password_hash)
    assert not verify_password("s3cret\n", password_hash)


def test_account_add_password_stdin_empty_fails(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int]
) -> None:
    """--password-stdin with nothing on stdin exits 1 and creates no account."""
    tenant("acme")
    result = cli("account", "add", "app1", "--tenant", "acme", "--password-stdin", input="")
    fails(result, "no password on standard input")
    assert counts(conn)["accounts"] == 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["app2", "--tenant", "nope"], ["no tenant named 'nope'"]),
        (["app1", "--tenant", "acme"], ["account 'app1' already exists"]),
        (["app1", "--tenant", "globex"], ["account 'app1' already exists"]),
        (["has space", "--tenant", "acme"], ["username must be"]),
        (["app2", "--tenant", "acme", "--allow-domain", "exa mple.com"], ["'exa mple.com'"]),
        (
            ["app2", "--tenant", "acme", "--allow-domain", "ok.com", "--allow-domain", "a..b"],
            ["'a..b'"],
        ),
    ],
    ids=[
        "unknown-tenant",
        "duplicate",
        "duplicate-other-tenant",
        "bad-username",
        "space-in-domain",
        "double-dot",
    ],
)
def test_account_add_failures_write_nothing(
    cli: Cli, conn: psycopg.Connection[Any], acme: None, args: list[str], fragments: list[str]
) -> None:
    """A failed `account add` exits 1 naming the problem, prints no password, writes no row."""
    admin.add_tenant(conn, "globex")
    before = counts(conn)

    fails(cli("account", "add", *args), *fragments)

    assert counts(conn) == before


def test_account_show_unknown_fails(cli: Cli) -> None:
    """`account show` of an unknown account exits 1 with one error line."""
    result = cli("account", "show", "ghost")
    fails(result, "no account named 'ghost'")


# -- providers -----------------------------------------------------------------------------


def test_provider_secret_is_encrypted_and_never_shown(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int], secret_key: str
) -> None:
    """A provider secret read from stdin is stored as a Fernet token of the configured key
    and appears in no output of provider add, list or show; settings are typed."""
    tenant("acme")
    sg_args = ["--tenant", "acme", "--type", "sendgrid", "--endpoint", "http://127.0.0.1:9"]
    setting_args = ["--set", "region=eu", "--set", "timeout=5"]

    runs = {
        "add": cli(
            "provider",
            "add",
            "sg",
            *sg_args,
            *setting_args,
            "--secret-stdin",
            input=SG_SECRET + "\n",
        ),
        "add --json": cli(
            "provider", "add", "sg2", *sg_args, "--secret-stdin", "--json", input=SG_SECRET
        ),
        "list": cli("provider", "list"),
        "list --json": cli("provider", "list", "--json"),
        "list --tenant --json": cli("provider", "list", "--tenant", "acme", "--json"),
        "show": cli("provider", "show", "sg", "--tenant", "acme"),
        "show --json": cli("provider", "show", "sg", "--tenant", "acme", "--json"),
    }

    row = conn.execute(
        "SELECT type, endpoint, settings, secret FROM providers WHERE name = 'sg'"
    ).fetchone()
    assert row is not None
    ptype, endpoint, stored_settings, token = row
    assert (ptype, endpoint) == ("sendgrid", "http://127.0.0.1:9")
    assert stored_settings == {"region": "eu", "timeout": 5}
    assert SG_SECRET.encode() not in bytes(token)
    assert Fernet(secret_key.encode()).decrypt(bytes(token)) == SG_SECRET.encode()
    for what, result in runs.items():
        output = ok(result) + result.stderr
        assert "secret-value" not in output, what
        assert bytes(token).decode() not in output, what

    assert "provider sg (sendgrid) added to tenant acme" in runs["add"].stdout
    assert json.loads(runs["add --json"].stdout)["name"] == "sg2"
    shown = json.loads(runs["show --json"].stdout)
    assert shown["has_secret"] is True
    assert shown["settings"] == {"region": "eu", "timeout": 5}
    assert shown["endpoint"] == "http://127.0.0.1:9"
    for listing in ("list --json", "list --tenant --json"):
        listed = json.loads(runs[listing].stdout)
        assert [(p["name"], p["has_secret"]) for p in listed] == [("sg", True), ("sg2", True)]
        assert all("secret" not in p for p in listed)


def test_provider_file_needs_no_secret(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int]
) -> None:
    """A file provider is added without a secret; it stores its path and no secret."""
    tenant("acme")

    ok(cli("provider", "add", "out", "--tenant", "acme", "--type", "file", "--set", "path=/tmp/x"))

    shown = as_json(cli("provider", "show", "out", "--tenant", "acme", "--json"))
    assert shown["type"] == "file"
    assert shown["settings"] == {"path": "/tmp/x"}
    assert shown["has_secret"] is False
    row = conn.execute("SELECT secret FROM providers WHERE name = 'out'").fetchone()
    assert row == (None,)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["sg", "--type", "sendgrid"], ["no API key stored", "--secret-stdin"]),
        (["mc", "--type", "mailchimp", "--secret-stdin"], ["'mailchimp'", "known: ", "sendgrid"]),
        (["sg", "--type", "sendgrid", "--secret-stdin", "--set", "colour=red"], ["'colour'"]),
        (["out", "--type", "file", "--set", "novalue"], ["'novalue'", "key=value"]),
        (["out", "--type", "file"], ["'path' is required"]),
        (
            ["sg", "--type", "sendgrid", "--secret-stdin", "--endpoint", "127.0.0.1:9"],
            ["expected a URL"],
        ),
        (["sg", "--type", "sendgrid", "--secret-stdin", "--tenant", "nope"], ["'nope'"]),
    ],
    ids=[
        "secret-required",
        "unknown-type",
        "unknown-setting",
        "setting-without-value",
        "missing-setting",
        "endpoint-not-a-url",
        "unknown-tenant",
    ],
)
def test_provider_add_failures_write_nothing(
    cli: Cli,
    conn: psycopg.Connection[Any],
    tenant: Callable[[str], int],
    args: list[str],
    fragments: list[str],
) -> None:
    """A rejected `provider add` exits 1 naming the problem, leaks no secret, writes no row."""
    tenant("acme")
    where = [] if "--tenant" in args else ["--tenant", "acme"]

    result = cli("provider", "add", *args, *where, input=SG_SECRET + "\n")

    fails(result, *fragments)
    assert SG_SECRET not in result.stderr
    assert counts(conn)["providers"] == 0


def test_provider_add_duplicate_fails(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int]
) -> None:
    """A provider name is unique within its tenant: a second one exits 1, writes nothing."""
    tenant("acme")
    add = ("provider", "add", "out", "--tenant", "acme", "--type", "file", "--set", "path=/x")
    ok(cli(*add))

    result = cli(*add)

    fails(result, "provider 'out' of tenant 'acme' already exists")
    assert counts(conn)["providers"] == 1


# -- routes --------------------------------------------------------------------------------


def test_route_add_and_list_in_evaluation_order(
    cli: Cli, conn: psycopg.Connection[Any], acme: None
) -> None:
    """Routes get an explicit or next-after-last priority and list in evaluation order
    with provider, account and fallback names."""
    first = as_json(
        cli(
            *("route", "add", "--tenant", "acme", "--provider", "sg"),
            *("--recipient-domain", "*.Example.com", "--priority", "5", "--json"),
        )
    )
    second = as_json(
        cli("route", "add", "-t", "acme", "-p", "sg", "--sender-domain", "example.org", "--json")
    )
    third_out = ok(
        cli(
            *("route", "add", "--tenant", "acme", "--provider", "sg", "--priority", "1"),
            *("--account", "app1", "--fallback", "out"),
        )
    )

    routes = as_json(cli("route", "list", "--json"))
    human = ok(cli("route", "list", "--tenant", "acme"))

    assert "-> sg" in third_out
    by_id = {r["id"]: r for r in routes}
    assert by_id[first["id"]]["priority"] == 5
    assert by_id[second["id"]]["priority"] > 5
    assert [r["priority"] for r in routes] == [1, 5, by_id[second["id"]]["priority"]]
    assert [r["id"] for r in routes][1:] == [first["id"], second["id"]]
    view = [
        {k: r[k] for k in ("sender_domain", "recipient_domain", "account", "provider", "fallbacks")}
        for r in routes
    ]
    assert view == [
        {"sender_domain": None, "recipient_domain": None, "account": "app1"}
        | {"provider": "sg", "fallbacks": ["out"]},
        {"sender_domain": None, "recipient_domain": "*.example.com", "account": None}
        | {"provider": "sg", "fallbacks": []},
        {"sender_domain": "example.org", "recipient_domain": None, "account": None}
        | {"provider": "sg", "fallbacks": []},
    ]
    assert all(r["tenant"] == "acme" and r["enabled"] is True for r in routes)
    assert "sg" in human
    assert counts(conn)["routing_rules"] == 3


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--provider", "nope"], ["no provider named 'nope'"]),
        (["--provider", "sg", "--fallback", "gone"], ["no provider named 'gone'"]),
        (["--provider", "sg", "--recipient-domain", "exa mple.com"], ["'exa mple.com'"]),
        (["--provider", "sg", "--sender-domain", "a..b"], ["'a..b'"]),
        (["--provider", "sg", "--account", "other1"], ["'other1'", "belongs to tenant 'globex'"]),
        (["--provider", "sg", "--account", "ghost"], ["no account named 'ghost'"]),
    ],
    ids=[
        "unknown-provider",
        "unknown-fallback",
        "bad-recipient-glob",
        "bad-sender-glob",
        "account-of-other-tenant",
        "unknown-account",
    ],
)
def test_route_add_failures_write_nothing(
    cli: Cli, conn: psycopg.Connection[Any], acme: None, args: list[str], fragments: list[str]
) -> None:
    """A rejected `route add` exits 1 naming what is wrong and writes no rule."""
    admin.add_tenant(conn, "globex")
    admin.add_account(conn, "other1", "globex", hash_password("pw"), [])
    before = counts(conn)

    fails(cli("route", "add", "--tenant", "acme", *args), *fragments)

    assert counts(conn) == before


def test_route_list_of_unknown_tenant_fails(cli: Cli) -> None:
    """`route list --tenant` of an unknown tenant exits 1 rather than printing nothing."""
    result = cli("route", "list", "--tenant", "nope")
    fails(result, "no tenant named 'nope'")


# -- configuration -------------------------------------------------------------------------


def test_check_config_ok(cli: Cli, config_path: Path) -> None:
    """`check-config` accepts a valid file, says so and names it."""
    out = ok(cli("check-config"))
    shown = as_json(cli("check-config", "--json"))

    assert out.startswith("config OK")
    assert shown["source"] == str(config_path)
    assert shown["config"]["redis"]["key_prefix"].startswith("smtpproxy-test-")


def test_check_config_masks_secrets(tmp_path: Path, secret_key: str) -> None:
    """`check-config` masks database and Redis passwords and the secret key, in both forms."""
    path = write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "database": {"url": "postgresql://u:hunter2@127.0.0.1:1/x"},
            "redis": {"url": "redis://:redispass@127.0.0.1:1/0"},
            "security": {"secret_key": secret_key},
        },
    )

    human = run_cli(path, "check-config")
    machine = run_cli(path, "check-config", "--json")

    shown = as_json(machine)["config"]
    assert ok(human).startswith("config OK")
    for result in (human, machine):
        for secret in ("hunter2", "redispass", secret_key):
            assert secret not in result.stdout + result.stderr
    assert shown["database"]["url"] == f"postgresql://u:{MASK}@127.0.0.1:1/x"
    assert shown["redis"]["url"] == f"redis://:{MASK}@127.0.0.1:1/0"
    assert shown["security"]["secret_key"] == MASK
    assert f"u:{MASK}@127.0.0.1" in human.stdout


@pytest.mark.parametrize(
    ("smtp", "expected"),
    [
        ({"bogus": 1}, ["config error: smtp.bogus: unknown key"]),
        ({"max_recipients": "many"}, ["config error: smtp.max_recipients: expected an integer"]),
        (
            {"max_recipients": "many", "bogus": 1},
            [
                "config error: smtp.max_recipients: expected an integer",
                "config error: smtp.bogus: unknown key",
            ],
        ),
    ],
    ids=["unknown-key", "wrong-type", "both"],
)
@pytest.mark.parametrize("command", [["check-config"], ["tenant", "list"]])
def test_bad_config_exits_2(
    tmp_path: Path, smtp: dict[str, Any], expected: list[str], command: list[str]
) -> None:
    """A config file with an unknown key or a wrong type exits 2, one line per problem."""
    path = write_config(tmp_path / "smtpproxy.toml", {"data_dir": str(tmp_path), "smtp": smtp})

    result = run_cli(path, *command)

    fails(result, code=2)
    assert sorted(result.stderr.splitlines()) == sorted(expected)


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """`--config` naming a file that does not exist exits 2 with a config error (the status
    a real process ends with)."""
    missing = tmp_path / "absent.toml"
    result = run_cli_process(missing, "check-config")
    fails(result, f"--config: no such file: {missing}", code=2)


def test_gen_secret_key_prints_a_fernet_key(tmp_path: Path) -> None:
    """`gen-secret-key` prints a new, valid Fernet key each time (no config file needed)."""
    keys = [ok(run_cli(tmp_path / "absent.toml", "gen-secret-key")).strip() for _ in range(2)]

    for key in keys:
        token = Fernet(key.encode()).encrypt(b"x")
        assert Fernet(key.encode()).decrypt(token) == b"x"
    assert keys[0] != keys[1]


# -- the database --------------------------------------------------------------------------


def test_db_migrate_and_status(
    tmp_path: Path, fresh_database: str, redis_url: str, key_prefix: str, secret_key: str
) -> None:
    """On an empty database, commands ask for `db migrate`; migrate applies every migration
    once, a second run says the schema is up to date, and `db status` lists them applied."""
    raw = config_settings(tmp_path, fresh_database, redis_url, key_prefix, secret_key)
    path = write_config(tmp_path / "smtpproxy.toml", raw)

    behind = run_cli(path, "tenant", "list")
    before = as_json(run_cli(path, "db", "status", "--json"))
    first = ok(run_cli(path, "db", "migrate"))
    second = run_cli(path, "db", "migrate")
    third = as_json(run_cli(path, "db", "migrate", "--json"))
    after = as_json(run_cli(path, "db", "status", "--json"))

    fails(behind, "run `smtpproxy db migrate` first")
    assert before[0] == {"version": "001", "name": "initial", "applied": False}
    names = [f"{m.version:03d}_{m.name}" for m in migrate.available()]
    assert f"applied {len(names)} migration(s): {', '.join(names)}" in first
    assert "schema is up to date" in ok(second)
    assert third == {"applied": []}
    assert after[0] == {"version": "001", "name": "initial", "applied": True}
    assert all(m["applied"] for m in after)
    assert as_json(run_cli(path, "tenant", "list", "--json")) == []


def unreachable_config(tmp_path: Path, secret_key: str, port: int = 1) -> Path:
    """A config whose database is 127.0.0.1:port, with a 1 s connect timeout."""
    database = {"url": f"postgresql://postgres@127.0.0.1:{port}/x", "connect_timeout": "1s"}
    raw = {"data_dir": str(tmp_path / "data"), "database": database}
    return write_config(tmp_path / "smtpproxy.toml", raw | {"security": {"secret_key": secret_key}})


def test_unreachable_database_is_a_clean_error(tmp_path: Path, secret_key: str) -> None:
    """With the database down, a command exits 1 with an error about the database (a real
    process: its exit status, and no traceback on its stderr)."""
    result = run_cli_process(unreachable_config(tmp_path, secret_key), "tenant", "list")
    text = fails(result, "database")
    assert "unavailable" in text


def test_silent_database_honours_connect_timeout(tmp_path: Path, secret_key: str) -> None:
    """A database that accepts TCP but never answers fails within database.connect_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        path = unreachable_config(tmp_path, secret_key, silent.getsockname()[1])
        start = time.monotonic()
        ok(run_cli(path, "gen-secret-key"))
        startup = time.monotonic() - start

        start = time.monotonic()
        result = run_cli(path, "tenant", "list")
        elapsed = time.monotonic() - start - startup

    fails(result, "database")
    # what this guards against is hanging (libpq waits forever without a timeout); a loaded
    # machine may take a few seconds more than the 1 s, so the bound is generous
    assert elapsed < 10.0, f"took {elapsed:.1f}s beyond start-up with connect_timeout = 1s"


# -- user data in human output -------------------------------------------------------------


def test_account_add_prints_bracketed_username_literally(
    cli: Cli, conn: psycopg.Connection[Any], tenant: Callable[[str], int]
) -> None:
    """An account name with square brackets is created, named literally and its password shown."""
    tenant("acme")

    out = ok(cli("account", "add", "x[/b]", "--tenant", "acme"))

    assert "account x[/b] created" in out
    match = re.search(r"password: (\S+)", out)
    assert match is not None, out
    assert verify_password(match.group(1), stored_account(conn, "x[/b]")[0])


@pytest.mark.parametrize(
    ("setup", "listing", "literal"),
    [
        (["account", "add", "x[/b]", "-t", "acme", "--json"], ["account", "list"], "x[/b]"),
        (["account", "add", "y[bold]", "-t", "acme", "--json"], ["account", "list"], "y[bold]"),
        (
            ["provider", "add", "f", "-t", "acme", "--type", "file", "--set", "path=/m/[/x]"],
            ["provider", "list"],
            "/m/[/x]",
        ),
        (
            ["provider", "add", "g", "-t", "acme", "--type", "file", "--set", "path=/m/[/x]"],
            ["provider", "show", "g", "-t", "acme"],
            "/m/[/x]",
        ),
    ],
    ids=["account-list-closing-tag", "account-list-style-tag", "provider-list", "provider-show"],
)
def test_human_output_shows_brackets_literally(
    cli: Cli, tenant: Callable[[str], int], setup: list[str], listing: list[str], literal: str
) -> None:
    """Human tables print names and settings containing square brackets as they are."""
    tenant("acme")
    ok(cli(*setup))

    assert literal in ok(cli(*listing))


def test_check_config_prints_bracketed_path_literally(tmp_path: Path, config_path: Path) -> None:
    """`check-config` names a config file whose path contains square brackets literally."""
    odd = tmp_path / "[" / "etc]"  # the path contains "[/etc]", a Rich closing tag
    odd.mkdir(parents=True)
    path = odd / "smtpproxy.toml"
    path.write_text(config_path.read_text())

    assert f"config OK ({path})" in ok(run_cli(path, "check-config"))
