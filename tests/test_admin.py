"""The administrative CLI against real PostgreSQL: tenants,
accounts, providers and routes beyond add/list, the reload notifications and audit rows
every change leaves, refusals that protect invariants, confirmation prompts, database
roles (viewer, operator, admin) and shell completion.

Setup that is not under test goes through smtpproxy.admin directly (what the commands
call); everything asserted on is done through the `smtpproxy` command (its entry point
in this process, tests/support/cli.py; a real process where a terminal is needed).
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import pty
import secrets
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.admin import devices as admin_devices
from smtpproxy.config.crypto import SecretBox
from smtpproxy.config.passwords import hash_password, verify_password
from smtpproxy.ids import new_message_id
from smtpproxy.models import LIVE
from smtpproxy.store.base import key_for
from tests.conftest import CliConfigFactory, Service
from tests.support import smtp
from tests.support.cli import (
    Cli,
    Result,
    as_json,
    cli_env,
    command,
    config_settings,
    fails,
    ok,
    run_cli,
)
from tests.support.fake_sendgrid import FakeSendGrid
from tests.support.process import write_config

SG_KEY = "SG.admin-test-key"
APP1_PASSWORD = "app1 old password"
MASK = "********"
CHANNEL = "smtpproxy_config"


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def audit_clean(pg_url: str, conn: psycopg.Connection[Any]) -> Iterator[None]:
    """`clean` does not empty the audit trail: each test starts without one and leaves
    none behind for other test files."""
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")
    yield
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("TRUNCATE audit_log RESTART IDENTITY")


@pytest.fixture
def config_path(cli_config_file: CliConfigFactory, secret_key: str, audit_clean: None) -> Path:
    return cli_config_file(secret_key)


@pytest.fixture
def cli(config_path: Path) -> Cli:
    """`cli(*args, input=None)`: the command with the test's config file."""
    return functools.partial(run_cli, config_path)


@pytest.fixture
def acme(conn: psycopg.Connection[Any], secret_key: str, tmp_path: Path) -> dict[str, Any]:
    """Tenant acme: accounts app1 (acme.com) and billing, a SendGrid provider sg with an
    API key, a file provider out, and the rules #1 (app1's mail -> out) and #2 (the rest
    -> sg, falling back to out). The setup's audit rows are removed."""
    box = SecretBox(secret_key.encode())
    admin.add_tenant(conn, "acme", 100_000)
    admin.add_account(conn, "app1", "acme", hash_password(APP1_PASSWORD), ["acme.com"])
    admin.add_account(conn, "billing", "acme", hash_password("billing pw"), ["acme.com"])
    outbox = tmp_path / "outbox"
    admin.add_provider(
        conn,
        "acme",
        "sg",
        "sendgrid",
        endpoint="http://127.0.0.1:9",
        settings={"timeout": 5},
        secret=SG_KEY,
        encrypt=box.encrypt,
    )
    admin.add_provider(
        conn,
        "acme",
        "out",
        "file",
        endpoint=None,
        settings={"path": str(outbox)},
        secret=None,
        encrypt=box.encrypt,
    )
    r1 = admin.add_route(
        conn,
        "acme",
        "out",
        priority=10,
        sender_domain=None,
        recipient_domain=None,
        account_name="app1",
    )
    r2 = admin.add_route(
        conn,
        "acme",
        "sg",
        priority=20,
        sender_domain=None,
        recipient_domain="*.example.org",
        account_name=None,
        fallbacks=["out"],
    )
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")
    return {"outbox": outbox, "routes": [r1, r2], "box": box}


class Listener:
    """A connection that LISTENs on smtpproxy_config, as a running instance does."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def flush(self) -> None:
        """Forget what arrived so far (the setup's own changes notify too)."""
        self.received(timeout=0.3)

    def received(self, expect: int | None = None, timeout: float = 5.0) -> list[str]:
        """Payloads that arrive: stop after `expect` of them, or when timeout passes."""
        if expect is None:
            gen = self.conn.notifies(timeout=timeout)
        else:
            gen = self.conn.notifies(timeout=timeout, stop_after=expect)
        return [n.payload for n in gen if n.channel == CHANNEL]


@pytest.fixture
def listener(pg_url: str) -> Iterator[Listener]:
    lst = Listener(pg_url)
    yield lst
    lst.conn.close()


def audit_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT db_role, os_user, action, target, before, after FROM audit_log ORDER BY id"
        ).fetchall()


def one(conn: psycopg.Connection[Any], query: str, *params: object) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def add_message(
    conn: psycopg.Connection[Any], username: str, status: str, *, attempts: int = 1
) -> str:
    """A message row as ingress and delivery leave it, with one delivery log per attempt."""
    a = admin.account(conn, username)
    mid = new_message_id()
    final = status not in LIVE
    conn.execute(
        "INSERT INTO messages (id, tenant_id, account_id, mail_from, rcpt_to, subject, size,"
        " sha256, storage_key, client_ip, status, attempts, provider_name, finished_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
        " CASE WHEN %s THEN now() END)",
        (
            mid,
            a["tenant_id"],
            a["id"],
            f"{username}@acme.com",
            ["bob@shop.example.org"],
            "Your invoice",
            2048,
            "0" * 64,
            key_for(mid),
            "192.0.2.10",
            status,
            attempts,
            "sg",
            final,
        ),
    )
    for n in range(1, attempts + 1):
        conn.execute(
            "INSERT INTO delivery_logs (message_id, account_id, tenant_id, provider_name,"
            " status, attempt_number, recipients) VALUES (%s, %s, %s, 'sg', %s, %s, %s)",
            (mid, a["id"], a["tenant_id"], status, n, ["bob@shop.example.org"]),
        )
    return mid


def run_on_terminal(config: Path, *args: str, answer: str) -> Result:
    """The command with a terminal as standard input, answering its prompt with `answer`."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            command(config, *args),
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=config.parent,
        )
        os.close(slave)
        slave = -1
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# -- tenants -------------------------------------------------------------------------------


def test_tenant_suspend_and_resume(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """Suspend and resume change the status, say when nothing changed, notify `tenant`
    and leave one audit row per real change."""
    listener.flush()

    suspended = ok(cli("tenant", "suspend", "acme"))
    notified = listener.received(expect=1)
    again = as_json(cli("tenant", "suspend", "acme", "--json"))
    shown = as_json(cli("tenant", "show", "acme", "--json"))
    resumed = as_json(cli("tenant", "resume", "acme", "--json"))

    assert "tenant acme is now suspended" in suspended
    assert notified == ["tenant"]
    assert again == {"name": "acme", "status": "suspended", "changed": False}
    assert shown["status"] == "suspended"
    assert resumed == {"name": "acme", "status": "active", "changed": True}
    assert one(conn, "SELECT status FROM tenants WHERE name = 'acme'") == "active"
    rows = audit_rows(conn)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("tenant.suspend", "acme"),
        ("tenant.resume", "acme"),
    ]
    assert rows[0]["before"] == {
        "name": "acme",
        "status": "active",
        "monthly_limit": 100_000,
        "allowed_networks": [],
    }
    assert rows[0]["after"]["status"] == "suspended"
    assert rows[0]["db_role"] == one(conn, "SELECT current_user")
    assert rows[0]["os_user"] == getpass.getuser()


def test_tenant_show_counts_messages(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """`tenant show` lists accounts, providers and routes and counts the tenant's messages."""
    add_message(conn, "app1", "delivered")
    add_message(conn, "billing", "queued")

    shown = as_json(cli("tenant", "show", "acme", "--json"))
    human = ok(cli("tenant", "show", "acme"))

    assert shown["accounts"] == ["app1", "billing"]
    assert shown["providers"] == ["out", "sg"]
    assert shown["routes"] == [f"#{acme['routes'][0]} prio 10 -> out", "#2 prio 20 -> sg"]
    assert shown["messages"] == 2
    assert "billing" in human


def test_tenant_delete_refuses_while_it_has_things(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """Deleting a tenant that still has accounts, providers, routes and messages is refused
    with their numbers; nothing changes, nothing is notified or audited."""
    add_message(conn, "app1", "delivered")
    listener.flush()

    result = cli("tenant", "delete", "acme", "--yes")

    fails(
        result,
        "tenant 'acme' still has 2 accounts, 2 providers, 2 routes, 1 message",
        "delete those first",
    )
    assert one(conn, "SELECT count(*) FROM tenants") == 1
    assert listener.received(timeout=0.5) == []
    assert audit_rows(conn) == []


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["human", "json"])
def test_tenant_delete_of_an_empty_tenant(
    cli: Cli, conn: psycopg.Connection[Any], listener: Listener, json_flag: list[str]
) -> None:
    """An empty tenant is deleted with --yes; `tenant` is notified and the deletion audited."""
    admin.add_tenant(conn, "globex", 500)
    listener.flush()

    result = cli("tenant", "delete", "globex", "--yes", *json_flag)

    if json_flag:
        assert json.loads(ok(result)) == {"id": 1, "name": "globex", "deleted": True}
    else:
        assert "tenant globex deleted" in ok(result)
    assert listener.received(expect=1) == ["tenant"]
    assert one(conn, "SELECT count(*) FROM tenants") == 0
    last = audit_rows(conn)[-1]
    assert (last["action"], last["target"], last["after"]) == ("tenant.delete", "globex", None)
    assert last["before"] == {
        "name": "globex",
        "status": "active",
        "monthly_limit": 500,
        "allowed_networks": [],
    }


def test_unknown_names_are_one_error_line(cli: Cli, acme: dict[str, Any]) -> None:
    """Commands on a tenant, account, provider or route that does not exist exit 1 with one
    line naming it."""
    fails(cli("tenant", "suspend", "nope"), "no tenant named 'nope'")
    fails(cli("account", "disable", "ghost"), "no account named 'ghost'")
    fails(cli("account", "passwd", "ghost"), "no account named 'ghost'")
    fails(cli("provider", "disable", "nope", "-t", "acme"), "no provider named 'nope'")
    fails(cli("provider", "test", "sg", "-t", "nope", "--to", "a@b.example"), "'nope'")
    fails(cli("route", "show", "999"), "no route with id 999")
    fails(cli("route", "delete", "999", "--yes"), "no route with id 999")


# -- confirmation --------------------------------------------------------------------------

DELETES = {
    "tenant": (
        ["tenant", "delete", "globex"],
        "SELECT count(*) FROM tenants WHERE name = 'globex'",
    ),
    "account": (["account", "delete", "billing"], "SELECT count(*) FROM accounts WHERE id = 2"),
    "provider": (
        ["provider", "delete", "spare", "-t", "acme"],
        "SELECT count(*) FROM providers WHERE name = 'spare'",
    ),
    "route": (["route", "delete", "2"], "SELECT count(*) FROM routing_rules WHERE id = 2"),
}


@pytest.fixture
def deletable(conn: psycopg.Connection[Any], acme: dict[str, Any]) -> None:
    """Things that may be deleted: tenant globex (empty) and provider spare (unused)."""
    admin.add_tenant(conn, "globex")
    admin.add_provider(
        conn,
        "acme",
        "spare",
        "file",
        endpoint=None,
        settings={"path": "/var/mail/spare"},
        secret=None,
        encrypt=None,
    )
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")


@pytest.mark.parametrize("what", list(DELETES))
def test_delete_without_yes_is_refused_when_stdin_is_not_a_terminal(
    cli: Cli, conn: psycopg.Connection[Any], deletable: None, what: str
) -> None:
    """Without --yes and without a terminal to ask on, a delete is refused saying to add
    --yes, and nothing is deleted."""
    args, count = DELETES[what]

    result = cli(*args)

    fails(result, "refusing to delete", "without confirmation", "add --yes")
    assert one(conn, count) == 1
    assert audit_rows(conn) == []


@pytest.mark.parametrize(("answer", "deleted"), [("y", True), ("n", False), ("", False)])
@pytest.mark.parametrize("what", list(DELETES))
def test_delete_asks_on_a_terminal(
    config_path: Path,
    conn: psycopg.Connection[Any],
    deletable: None,
    what: str,
    answer: str,
    deleted: bool,
) -> None:
    """On a terminal a delete asks first: `y` deletes, `n` or just Enter keeps everything
    and exits 1."""
    args, count = DELETES[what]

    result = run_on_terminal(config_path, *args, answer=answer)

    assert "Delete " in result.stdout
    assert "[y/N]" in result.stdout
    assert "Traceback" not in result.stderr
    assert one(conn, count) == (0 if deleted else 1)
    if deleted:
        assert result.returncode == 0, result.stderr
        assert "deleted" in result.stdout
        assert len(audit_rows(conn)) == 1
    else:
        assert result.returncode == 1
        assert result.stderr == "error: not confirmed: nothing was changed\n"
        assert audit_rows(conn) == []


# -- accounts ------------------------------------------------------------------------------


def stored_hash(conn: psycopg.Connection[Any], username: str) -> str:
    return str(one(conn, "SELECT password_hash FROM accounts WHERE username = %s", username))


def test_account_passwd_from_stdin(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """`account passwd --password-stdin` stores the new password hashed, prints neither it
    nor its hash, notifies `account`, and audits only that the password changed."""
    listener.flush()

    result = cli("account", "passwd", "app1", "--password-stdin", input="n3w-Secret\n")

    out = ok(result)
    assert "password of account app1 changed" in out
    assert "n3w-Secret" not in out + result.stderr
    assert verify_password("n3w-Secret", stored_hash(conn, "app1"))
    assert not verify_password(APP1_PASSWORD, stored_hash(conn, "app1"))
    assert listener.received(expect=1) == ["account"]
    [row] = audit_rows(conn)
    assert (row["action"], row["target"]) == ("account.passwd", "app1")
    assert row["after"] == {"password": MASK}
    assert row["before"] is None


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["human", "json"])
def test_account_passwd_generates_a_password_shown_once(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], json_flag: list[str]
) -> None:
    """Without --password-stdin a new password is generated, printed once, and works."""
    result = cli("account", "passwd", "billing", *json_flag)

    out = ok(result)
    if json_flag:
        shown = json.loads(out)
        password = shown["password"]
        assert shown["username"] == "billing"
    else:
        password = out.split("password: ")[1].split()[0]
        assert "shown once" in out
    assert out.count(password) == 1
    assert len(password) >= 20
    assert verify_password(password, stored_hash(conn, "billing"))
    assert password not in json.dumps(audit_rows(conn), default=str)


def test_account_passwd_with_empty_stdin_changes_nothing(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """--password-stdin with nothing on stdin exits 1 and keeps the old password."""
    before = stored_hash(conn, "app1")
    fails(cli("account", "passwd", "app1", "--password-stdin"), "no password on standard input")
    assert stored_hash(conn, "app1") == before
    assert audit_rows(conn) == []


def test_account_disable_and_enable(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """Disable and enable flip the status (idempotently), notify `account` and are audited."""
    listener.flush()

    disabled = ok(cli("account", "disable", "app1"))
    notified = listener.received(expect=1)
    again = as_json(cli("account", "disable", "app1", "--json"))
    shown = as_json(cli("account", "show", "app1", "--json"))
    listed = ok(cli("account", "list", "--tenant", "acme"))
    enabled = as_json(cli("account", "enable", "app1", "--json"))

    assert "account app1 is now disabled" in disabled
    assert notified == ["account"]
    assert again == {"username": "app1", "status": "disabled", "changed": False}
    assert shown["status"] == "disabled"
    assert "disabled" in listed
    assert enabled == {"username": "app1", "status": "active", "changed": True}
    rows = audit_rows(conn)
    assert [r["action"] for r in rows] == ["account.disable", "account.enable"]
    assert rows[0]["before"] == {
        "username": "app1",
        "tenant": "acme",
        "status": "active",
        "allowed_domains": ["acme.com"],
        "rate_limit": None,
    }
    assert rows[0]["after"]["status"] == "disabled"
    assert "scrypt$" not in json.dumps(rows)


def test_account_show_counts_live_and_finished_messages(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """`account show` counts the account's live and finished messages, never its password."""
    for status in ("queued", "retrying", "delivered", "failed", "dlq"):
        add_message(conn, "app1", status)

    shown = as_json(cli("account", "show", "app1", "--json"))
    human = ok(cli("account", "show", "app1"))

    assert shown["live_messages"] == 2
    assert shown["finished_messages"] == 3
    assert "scrypt$" not in json.dumps(shown) + human


@pytest.mark.parametrize("status", ["queued", "retrying", "sending"])
def test_account_delete_refused_while_messages_are_live(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], status: str
) -> None:
    """An account with a message still being delivered is not deleted, even with
    --with-history; the refusal names the count and suggests disabling it."""
    add_message(conn, "app1", status)
    add_message(conn, "app1", "delivered")

    result = cli("account", "delete", "app1", "--with-history", "--yes")

    fails(result, "account 'app1' has 1 message still being delivered", "account disable")
    assert one(conn, "SELECT count(*) FROM accounts WHERE username = 'app1'") == 1
    assert one(conn, "SELECT count(*) FROM messages") == 2
    assert audit_rows(conn) == []


def test_account_delete_with_history(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """Finished messages block a plain delete; --with-history deletes the account, its
    finished messages and their logs, and the rule limited to it, and nothing of other
    accounts; `account` and `route` are notified and the deletion audited."""
    for status in ("delivered", "failed", "dlq"):
        add_message(conn, "app1", status, attempts=2)
    kept = add_message(conn, "billing", "delivered")
    listener.flush()

    refused = cli("account", "delete", "app1", "--yes")
    nothing = listener.received(timeout=0.5)
    deleted = as_json(cli("account", "delete", "app1", "--with-history", "--yes", "--json"))
    notified = listener.received(expect=2)

    fails(refused, "account 'app1' has 3 finished messages", "--with-history")
    assert nothing == []
    assert deleted == {
        "username": "app1",
        "deleted": True,
        "routes": [acme["routes"][0]],
        "messages": 3,
    }
    assert sorted(notified) == ["account", "route"]
    assert one(conn, "SELECT count(*) FROM accounts WHERE username = 'app1'") == 0
    assert conn.execute("SELECT id FROM messages").fetchall() == [(kept,)]
    assert one(conn, "SELECT count(*) FROM delivery_logs") == 1
    assert conn.execute("SELECT id FROM routing_rules").fetchall() == [(acme["routes"][1],)]
    [row] = audit_rows(conn)
    assert (row["action"], row["target"]) == ("account.delete", "app1")
    assert row["before"]["routes"] == [acme["routes"][0]]
    assert row["before"]["messages"] == 3


def test_account_delete_without_history(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """An account without messages is deleted with its rule; the human line says so."""
    out = ok(cli("account", "delete", "app1", "--yes"))

    assert "account app1 deleted with 1 routing rule(s)" in out
    assert one(conn, "SELECT count(*) FROM accounts") == 1


async def test_suspended_tenant_and_disabled_account_cannot_log_in(
    service: Service, config_path: Path, conn: psycopg.Connection[Any]
) -> None:
    """After `tenant suspend` or `account disable` the account gets 535 at AUTH; after
    `tenant resume` and `account enable` it logs in and sends again."""
    admin.add_tenant(conn, "acme")
    admin.add_account(conn, "app", "acme", hash_password(APP1_PASSWORD), ["example.com"])

    def send() -> int:
        try:
            code, _ = smtp.send(service.smtp_port, "app", APP1_PASSWORD, smtp.message())
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return code

    async def command(*args: str) -> None:
        ok(await trio.to_thread.run_sync(lambda: run_cli(config_path, *args)))

    async def attempt(expected: int) -> int:
        """The AUTH result, retried for up to 3 s: a running instance may cache logins
        until the change's notification reaches it."""
        deadline = trio.current_time() + 3
        while True:
            code = await trio.to_thread.run_sync(send)
            if code == expected or trio.current_time() > deadline:
                return code
            await trio.sleep(0.2)

    with trio.fail_after(60):
        assert await attempt(250) == 250
        await command("tenant", "suspend", "acme")
        assert await attempt(535) == 535
        await command("tenant", "resume", "acme")
        await command("account", "disable", "app")
        assert await attempt(535) == 535
        await command("account", "enable", "app")
        assert await attempt(250) == 250


# -- providers -----------------------------------------------------------------------------


def test_provider_update_settings_endpoint_and_secret(
    cli: Cli,
    conn: psycopg.Connection[Any],
    acme: dict[str, Any],
    listener: Listener,
    secret_key: str,
) -> None:
    """`provider update` sets and unsets settings, restores the default endpoint with '',
    replaces the secret from stdin (encrypted), notifies `provider`, and audits every
    change with the secret masked."""
    listener.flush()

    first = cli(
        *("provider", "update", "sg", "-t", "acme"),
        *("--set", "region=eu", "--unset", "timeout", "--endpoint", ""),
    )
    notified = listener.received(expect=1)
    second = cli(
        "provider", "update", "sg", "-t", "acme", "--secret-stdin", input="SG.rotated-key\n"
    )
    shown = as_json(cli("provider", "show", "sg", "-t", "acme", "--json"))

    assert "provider sg of tenant acme updated (endpoint, settings)" in ok(first)
    assert "updated (secret)" in ok(second)
    assert notified == ["provider"]
    assert shown["settings"] == {"region": "eu"}
    assert shown["endpoint"] is None
    assert shown["has_secret"] is True
    token = bytes(one(conn, "SELECT secret FROM providers WHERE name = 'sg'"))
    assert Fernet(secret_key.encode()).decrypt(token) == b"SG.rotated-key"
    rows = audit_rows(conn)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("provider.update", "acme/sg"),
        ("provider.update", "acme/sg"),
    ]
    assert rows[0]["before"]["settings"] == {"timeout": 5}
    assert rows[0]["before"]["endpoint"] == "http://127.0.0.1:9"
    assert rows[0]["after"]["settings"] == {"region": "eu"}
    assert rows[0]["after"]["endpoint"] is None
    assert rows[1]["before"]["secret"] == rows[1]["after"]["secret"] == MASK
    assert rows[1]["after"]["secret_changed"] is True
    trail = json.dumps(rows) + ok(cli("audit")) + ok(cli("audit", "--json"))
    for leak in ("SG.rotated-key", SG_KEY, token.decode()):
        assert leak not in trail
    assert "rotated" not in ok(second) + second.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["sg"], ["nothing to change"]),
        (["sg", "--unset", "colour"], ["no setting 'colour' to unset"]),
        (["sg", "--set", "colour=red"], ["'colour'", "known: "]),
        (["sg", "--set", "region=mars"], ["region must be 'global' or 'eu'"]),
        (["sg", "--set", "timeout=soon"], ["'timeout' must be a number"]),
        (["sg", "--set", "timeout=3", "--unset", "timeout"], ["both set and unset"]),
        (["sg", "--endpoint", "127.0.0.1:9"], ["expected a URL"]),
        (["out", "--unset", "path"], ["'path' is required"]),
        (["nope", "--set", "timeout=1"], ["no provider named 'nope'"]),
    ],
    ids=[
        "nothing",
        "unset-missing",
        "unknown-setting",
        "bad-region",
        "bad-timeout",
        "set-and-unset",
        "endpoint-not-url",
        "required-setting",
        "unknown-provider",
    ],
)
def test_provider_update_refusals_change_nothing(
    cli: Cli,
    conn: psycopg.Connection[Any],
    acme: dict[str, Any],
    args: list[str],
    fragments: list[str],
) -> None:
    """An update that would leave a provider unusable, or asks nothing, is refused with
    one line and changes nothing."""
    before = conn.execute("SELECT * FROM providers ORDER BY id").fetchall()

    fails(cli("provider", "update", *args, "--tenant", "acme"), *fragments)

    assert conn.execute("SELECT * FROM providers ORDER BY id").fetchall() == before
    assert audit_rows(conn) == []


def test_provider_disable_and_enable(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """Disable and enable flip `enabled` (idempotently), notify `provider`, are audited."""
    listener.flush()

    out = ok(cli("provider", "disable", "sg", "--tenant", "acme"))
    notified = listener.received(expect=1)
    again = as_json(cli("provider", "disable", "sg", "--tenant", "acme", "--json"))
    listed = as_json(cli("provider", "list", "--json"))
    back = as_json(cli("provider", "enable", "sg", "--tenant", "acme", "--json"))

    assert "provider sg of tenant acme is now disabled" in out
    assert notified == ["provider"]
    assert again["changed"] is False
    assert {p["name"]: p["enabled"] for p in listed} == {"out": True, "sg": False}
    assert back == {"name": "sg", "tenant": "acme", "enabled": True, "changed": True}
    rows = audit_rows(conn)
    assert [r["action"] for r in rows] == ["provider.disable", "provider.enable"]
    assert rows[0]["before"]["secret"] == MASK
    assert (rows[0]["before"]["enabled"], rows[0]["after"]["enabled"]) == (True, False)


def test_provider_show_lists_the_routes_using_it(cli: Cli, acme: dict[str, Any]) -> None:
    """`provider show` names the rules that use the provider, directly or as a fallback."""
    r1, r2 = acme["routes"]

    out_json = as_json(cli("provider", "show", "out", "-t", "acme", "--json"))
    human = ok(cli("provider", "show", "out", "-t", "acme"))

    assert out_json["routes"] == [f"#{r1} prio 10", f"#{r2} prio 20 (fallback)"]
    assert "(fallback)" in human


def test_provider_delete_refused_while_routes_use_it(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """A provider used by rules (as provider or fallback) is not deleted; the refusal lists
    the rules. Once they are gone it is deleted, notified and audited."""
    r1, r2 = acme["routes"]
    listener.flush()

    refused = cli("provider", "delete", "out", "-t", "acme", "--yes")
    ok(cli("route", "delete", str(r1), "--yes"))
    still = cli("provider", "delete", "out", "-t", "acme", "--yes")
    ok(cli("route", "delete", str(r2), "--yes"))
    listener.flush()
    deleted = as_json(cli("provider", "delete", "out", "-t", "acme", "--yes", "--json"))

    fails(
        refused,
        "provider 'out' of tenant 'acme' is used by routing rules",
        f"#{r1} (priority 10, provider)",
        f"#{r2} (priority 20, fallback)",
    )
    fails(still, f"routing rule #{r2} (priority 20, fallback)")
    assert deleted == {"id": 2, "name": "out", "tenant": "acme", "deleted": True}
    assert listener.received(expect=1) == ["provider"]
    assert one(conn, "SELECT count(*) FROM providers") == 1
    last = audit_rows(conn)[-1]
    assert (last["action"], last["target"], last["after"]) == ("provider.delete", "acme/out", None)


def test_provider_delete_refused_while_live_mail_was_redirected_to_it(
    cli: Cli, conn: psycopg.Connection[Any], deletable: None
) -> None:
    """A provider that live messages were sent to with `dlq retry --to-provider` stays."""
    mid = add_message(conn, "app1", "queued")
    conn.execute("UPDATE messages SET route_override = 'spare' WHERE id = %s", (mid,))

    fails(cli("provider", "delete", "spare", "-t", "acme", "--yes"), "1 live message")

    assert one(conn, "SELECT count(*) FROM providers WHERE name = 'spare'") == 1


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["human", "json"])
def test_provider_test_through_a_file_provider(
    cli: Cli, acme: dict[str, Any], json_flag: list[str]
) -> None:
    """`provider test` sends a real message through a file provider: it lands in the
    directory, the outcome is printed and the exit code is 0."""
    result = cli(
        *("provider", "test", "out", "--tenant", "acme"),
        *("--to", "ops@shop.example.org", "--from", "noreply@acme.com", *json_flag),
    )

    out = ok(result)
    [eml] = list(acme["outbox"].glob("*.eml"))
    body = eml.read_bytes()
    envelope = json.loads(eml.with_suffix(".json").read_text())
    assert envelope["mail_from"] == "noreply@acme.com"
    assert envelope["rcpt_to"] == ["ops@shop.example.org"]
    assert b"Subject: smtpproxy test through provider out" in body
    assert b"To: ops@shop.example.org" in body
    if json_flag:
        shown = json.loads(out)
        assert shown["delivered"] is True
        assert shown["outcome"] == "delivered"
        assert shown["provider_message_id"] == eml.name
        assert shown["message_id"] == eml.stem
    else:
        assert "delivered: noreply@acme.com -> ops@shop.example.org through provider out" in out
        assert eml.name in out


def test_provider_test_through_sendgrid(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """`provider test` decrypts the stored API key, sends through SendGrid (a local fake
    of its API), prints the provider's message id, and never prints the key; a refused key
    is a permanent failure with exit code 1."""
    with FakeSendGrid(api_key=SG_KEY) as fake:
        ok(cli("provider", "update", "sg", "-t", "acme", "--endpoint", fake.url))
        good = cli("provider", "test", "sg", "-t", "acme", "--to", "ops@shop.example.org", "--json")
        ok(cli("provider", "update", "sg", "-t", "acme", "--secret-stdin", input="SG.wrong\n"))
        bad = cli("provider", "test", "sg", "-t", "acme", "--to", "ops@shop.example.org")
        bad_json = cli(
            *("provider", "test", "sg", "-t", "acme", "--to", "ops@shop.example.org", "--json")
        )

    shown = json.loads(ok(good))
    [accepted] = fake.accepted
    assert accepted.headers["authorization"] == f"Bearer {SG_KEY}"
    assert accepted.body["personalizations"][0]["to"] == [{"email": "ops@shop.example.org"}]
    assert shown["delivered"] is True
    assert shown["provider_message_id"] == accepted.response_headers["X-Message-Id"]
    assert shown["type"] == "sendgrid"
    assert bad.returncode == 1
    assert "NOT delivered" in bad.stdout
    assert "permanent" in bad.stdout
    refused = json.loads(bad_json.stdout)
    assert bad_json.returncode == 1
    assert (refused["delivered"], refused["outcome"]) == (False, "permanent")
    assert refused["detail"]
    for result in (good, bad, bad_json):
        assert "Traceback" not in result.stderr
        for secret in (SG_KEY, "SG.wrong"):
            assert secret not in result.stdout + result.stderr
    assert audit_rows(conn)[-1]["action"] == "provider.update"  # a test changes nothing


def test_provider_test_of_an_unreachable_provider_exits_1(cli: Cli, acme: dict[str, Any]) -> None:
    """A provider that cannot be reached is a `retry` outcome with a detail and exit 1."""
    result = cli("provider", "test", "sg", "-t", "acme", "--to", "ops@shop.example.org", "--json")

    assert result.returncode == 1, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["delivered"], shown["outcome"]) == (False, "retry")
    assert "connect" in shown["detail"].lower()
    assert SG_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--to", "not-an-address"], "--to 'not-an-address'"),
        (["--to", "a@b.example", "--from", "x y@acme.com"], "--from 'x y@acme.com'"),
    ],
    ids=["bad-to", "bad-from"],
)
def test_provider_test_checks_addresses(
    cli: Cli, acme: dict[str, Any], args: list[str], fragment: str
) -> None:
    """`provider test` refuses an address that is not one, before sending anything."""
    fails(cli("provider", "test", "out", "-t", "acme", *args), fragment, "expected an address")
    assert not acme["outbox"].exists()


# -- routes --------------------------------------------------------------------------------


def test_route_show(cli: Cli, acme: dict[str, Any]) -> None:
    """`route show` prints one rule with its provider, fallbacks and conditions."""
    r2 = acme["routes"][1]

    shown = as_json(cli("route", "show", str(r2), "--json"))
    human = ok(cli("route", "show", str(r2)))

    assert {k: v for k, v in shown.items() if k != "created_at"} == {
        "id": r2,
        "tenant": "acme",
        "priority": 20,
        "sender_domain": None,
        "recipient_domain": "*.example.org",
        "account": None,
        "provider": "sg",
        "fallbacks": ["out"],
        "enabled": True,
    }
    assert "*.example.org" in human


def route_order(conn: psycopg.Connection[Any]) -> list[tuple[int, int]]:
    return [
        (int(r[0]), int(r[1]))
        for r in conn.execute("SELECT id, priority FROM routing_rules ORDER BY priority, id")
    ]


def test_route_move(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """`route move` sets a priority or places a rule before or after another (between its
    neighbours, renumbering only when there is no room); each move notifies `route` and
    is audited."""
    r1, r2 = acme["routes"]
    r3 = admin.add_route(
        conn,
        "acme",
        "sg",
        priority=21,
        sender_domain="acme.com",
        recipient_domain=None,
        account_name=None,
    )
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")
    listener.flush()

    first = as_json(cli("route", "move", str(r2), "--priority", "5", "--json"))
    notified = listener.received(expect=1)
    order_1 = route_order(conn)
    ok(cli("route", "move", str(r2), "--after", str(r1)))  # between 10 and 21
    order_2 = route_order(conn)
    ok(cli("route", "move", str(r3), "--before", str(r1)))  # first: half of 10
    order_3 = route_order(conn)
    in_place = ok(cli("route", "move", str(r1), "--after", str(r3)))
    same = ok(cli("route", "move", str(r2), "--priority", "15"))

    assert first == {"id": r2, "priority": 5, "changed": {str(r2): 5}}
    assert notified == ["route"]
    assert order_1 == [(r2, 5), (r1, 10), (r3, 21)]
    assert order_2 == [(r1, 10), (r2, 15), (r3, 21)]
    assert order_3 == [(r3, 5), (r1, 10), (r2, 15)]
    assert f"route {r1} already has priority 10" in in_place
    assert f"route {r2} already has priority 15" in same
    assert route_order(conn) == order_3
    rows = audit_rows(conn)
    assert [r["action"] for r in rows] == ["route.move"] * 3
    assert rows[0]["target"] == f"acme/route/{r2}"
    assert (rows[0]["before"], rows[0]["after"]) == ({"priority": 20}, {"priority": 5})


def test_route_move_renumbers_when_there_is_no_room(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """Moving a rule between two with adjacent priorities renumbers the tenant's rules
    10, 20, 30 in the new order, and the audit row lists the other rules renumbered."""
    r1, r2 = acme["routes"]
    conn.execute("UPDATE routing_rules SET priority = 11 WHERE id = %s", (r2,))
    r3 = admin.add_route(
        conn,
        "acme",
        "sg",
        priority=50,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")

    moved = as_json(cli("route", "move", str(r3), "--before", str(r2), "--json"))

    assert route_order(conn) == [(r1, 10), (r3, 20), (r2, 30)]
    assert moved["changed"] == {str(r3): 20, str(r2): 30}
    [row] = audit_rows(conn)
    assert row["after"] == {"priority": 20, "renumbered": {str(r2): 30}}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["1"], "give exactly one of --priority, --before and --after"),
        (["1", "--priority", "3", "--before", "2"], "give exactly one"),
        (["1", "--before", "1"], "relative to itself"),
        (["1", "--after", "99"], "no route with id 99"),
        (["1", "--after", "3"], "route 3 belongs to tenant 'globex'"),
        (["99", "--priority", "1"], "no route with id 99"),
    ],
    ids=["none", "two", "itself", "unknown-anchor", "other-tenant", "unknown-route"],
)
def test_route_move_refusals(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], args: list[str], fragment: str
) -> None:
    """Impossible moves are refused with one line and change no priority."""
    admin.add_tenant(conn, "globex")
    admin.add_provider(
        conn,
        "globex",
        "out",
        "file",
        endpoint=None,
        settings={"path": "/tmp/g"},
        secret=None,
        encrypt=None,
    )
    admin.add_route(
        conn,
        "globex",
        "out",
        priority=1,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )
    before = route_order(conn)

    fails(cli("route", "move", *args), fragment)

    assert route_order(conn) == before


def test_route_delete(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """`route delete --yes` removes the rule, notifies `route` and audits what it was."""
    r1, r2 = acme["routes"]
    listener.flush()

    out = ok(cli("route", "delete", str(r2), "--yes"))

    assert f"route {r2} of tenant acme deleted" in out
    assert listener.received(expect=1) == ["route"]
    assert conn.execute("SELECT id FROM routing_rules").fetchall() == [(r1,)]
    [row] = audit_rows(conn)
    assert (row["action"], row["target"]) == ("route.delete", f"acme/route/{r2}")
    assert row["before"]["provider"] == "sg"
    assert row["before"]["fallbacks"] == ["out"]


# -- devices -------------------------------------------------------------------------------


def test_device_add_list_disable_enable_remove(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """`device add` registers a network for an account (a bare address is a /32), `list`
    shows it, `disable`/`enable`/`remove` change it; every change notifies `device` and
    leaves an audit row with what the device was and became. A change to nothing
    (disabling a disabled device) does neither."""
    listener.flush()
    notified = []

    def step(*args: str) -> str:
        out = ok(cli(*args))
        notified.extend(listener.received(expect=1))
        return out

    args = ["--network", "192.0.2.40", "--account", "app1", "--note", "2nd floor"]
    added = step("device", "add", "printer-2f", *args)
    listed = as_json(cli("device", "list", "--json"))
    table = ok(cli("device", "list"))
    disabled = step("device", "disable", "printer-2f")
    again = ok(cli("device", "disable", "printer-2f"))
    quiet = listener.received(timeout=0.5)
    step("device", "enable", "printer-2f")
    removed = as_json(cli("device", "remove", "printer-2f", "--json"))
    notified += listener.received(expect=1)

    assert "device printer-2f added: 192.0.2.40/32 sends as account app1" in added
    [device] = listed
    assert {k: device[k] for k in ("name", "network", "account", "tenant", "enabled", "note")} == {
        "name": "printer-2f",
        "network": "192.0.2.40/32",
        "account": "app1",
        "tenant": "acme",
        "enabled": True,
        "note": "2nd floor",
    }
    assert "printer-2f" in table and "192.0.2.40/32" in table
    assert "device printer-2f is now disabled" in disabled
    assert "device printer-2f was already disabled" in again and quiet == []
    assert removed == {"name": "printer-2f", "network": "192.0.2.40/32", "removed": True}
    assert "no devices" in ok(cli("device", "list"))
    assert notified == ["device"] * 4
    rows = audit_rows(conn)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("device.add", "printer-2f"),
        ("device.disable", "printer-2f"),
        ("device.enable", "printer-2f"),
        ("device.remove", "printer-2f"),
    ]
    assert rows[0]["before"] is None
    assert rows[0]["after"] == {**device_view(device), "enabled": True}
    assert (rows[1]["before"]["enabled"], rows[1]["after"]["enabled"]) == (True, False)
    assert rows[3]["before"]["network"] == "192.0.2.40/32" and rows[3]["after"] is None


def device_view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "network", "account", "tenant", "enabled", "note")}


def test_device_refusals_are_one_line_and_change_nothing(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """An overlapping network (naming the device it overlaps), a name taken, an unknown
    account, a network too wide, outside the tenant's allowed networks, or not a
    network at all, and an unknown device: each is one error line, exit 1, and no
    device, audit row or notification."""
    admin.update_tenant(conn, "acme", networks=["192.0.2.0/24", "10.0.0.0/8"])
    admin_devices.add_device(conn, "printer", "192.0.2.40/32", "app1")
    conn.execute("TRUNCATE audit_log RESTART IDENTITY")
    listener.flush()

    def add(name: str, network: str, account: str = "app1") -> Result:
        return cli("device", "add", name, "--network", network, "--account", account)

    fails(add("scan", "192.0.2.0/24"), "192.0.2.0/24 overlaps device 'printer' (192.0.2.40/32)")
    fails(add("printer", "192.0.2.41"), "device 'printer' already exists")
    fails(add("scan", "192.0.2.41", "nobody"), "no account named 'nobody'")
    fails(add("scan", "10.0.0.0/12"), "10.0.0.0/12 is too wide for a device", "/16")
    fails(add("scan", "198.51.100.7"), "outside the allowed networks of tenant 'acme'")
    fails(add("scan", "printer.lan"), "expected an address or CIDR")
    fails(add("bad name", "192.0.2.41"), "invalid name")
    fails(cli("device", "remove", "nope"), "no device named 'nope'")
    fails(cli("device", "enable", "nope"), "no device named 'nope'")

    assert listener.received(timeout=0.5) == []
    assert audit_rows(conn) == []
    assert one(conn, "SELECT count(*) FROM devices") == 1


def test_account_delete_refused_while_a_device_sends_as_it(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """An account a device sends as is not deleted: the refusal names the device; once
    the device is removed the account can go."""
    admin_devices.add_device(conn, "printer", "192.0.2.40/32", "billing")

    fails(
        cli("account", "delete", "billing", "--yes"),
        "account 'billing' is used by 1 device (printer): remove them first",
    )
    ok(cli("device", "remove", "printer"))
    ok(cli("account", "delete", "billing", "--yes"))

    assert one(conn, "SELECT count(*) FROM accounts WHERE username = 'billing'") == 0


# -- notifications and the audit trail -----------------------------------------------------


def test_adds_notify_and_are_audited(
    cli: Cli, conn: psycopg.Connection[Any], tmp_path: Path, listener: Listener
) -> None:
    """tenant, account, provider and route add each notify their kind and leave an audit
    row with the new values, secrets masked and no password hash."""
    steps = [
        (["tenant", "add", "acme"], None, "tenant"),
        (["account", "add", "app1", "-t", "acme", "--password-stdin"], "pw-12345\n", "account"),
        (
            ["provider", "add", "sg", "-t", "acme", "--type", "sendgrid", "--secret-stdin"],
            SG_KEY + "\n",
            "provider",
        ),
        (["route", "add", "-t", "acme", "-p", "sg", "--account", "app1"], None, "route"),
    ]
    listener.flush()
    received = []
    for args, stdin, _ in steps:
        ok(cli(*args, input=stdin))
        received += listener.received(expect=1)

    assert received == [kind for *_, kind in steps]
    rows = audit_rows(conn)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("tenant.add", "acme"),
        ("account.add", "app1"),
        ("provider.add", "acme/sg"),
        ("route.add", "acme/route/1"),
    ]
    assert all(r["before"] is None for r in rows)
    assert rows[1]["after"] == {
        "username": "app1",
        "tenant": "acme",
        "status": "active",
        "allowed_domains": [],
        "rate_limit": None,
        "password": MASK,
    }
    assert rows[2]["after"]["secret"] == MASK
    assert rows[2]["after"]["type"] == "sendgrid"
    assert rows[3]["after"]["account"] == "app1"
    text = json.dumps(rows)
    for leak in ("pw-12345", SG_KEY, "scrypt$", "gAAAA"):  # gAAAA: how Fernet tokens start
        assert leak not in text


def test_refused_changes_neither_notify_nor_audit(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], listener: Listener
) -> None:
    """A command that fails writes no audit row and sends no notification: both belong to
    the transaction that was rolled back."""
    listener.flush()

    fails(cli("tenant", "add", "acme"), "already exists")
    fails(cli("account", "add", "app1", "-t", "acme"), "already exists")
    fails(cli("provider", "delete", "sg", "-t", "acme", "--yes"), "is used by")
    fails(cli("route", "add", "-t", "acme", "-p", "nope"), "no provider named")

    assert listener.received(timeout=0.5) == []
    assert audit_rows(conn) == []


def test_audit_lists_newest_first_with_filters(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any]
) -> None:
    """`audit` lists changes newest first with who made them; --action (prefix), --target
    (with what is under it), --since and --limit narrow it; the table shows the change."""
    ok(cli("account", "disable", "app1"))
    ok(cli("provider", "disable", "sg", "-t", "acme"))
    ok(cli("tenant", "suspend", "acme"))
    ok(cli("account", "enable", "app1"))

    everything = as_json(cli("audit", "--json"))
    accounts = as_json(cli("audit", "--action", "account.", "--json"))
    disables = as_json(cli("audit", "--action", "account.disable", "--json"))
    acme_things = as_json(cli("audit", "--target", "acme", "--json"))
    app1 = as_json(cli("audit", "--target", "app1", "--json"))
    latest = as_json(cli("audit", "--limit", "1", "--json"))
    recent = as_json(cli("audit", "--since", "1h", "--json"))
    future = as_json(cli("audit", "--since", "2999-01-01", "--json"))
    human = ok(cli("audit"))
    empty = ok(cli("audit", "--action", "nothing."))

    assert [e["action"] for e in everything] == [
        "account.enable",
        "tenant.suspend",
        "provider.disable",
        "account.disable",
    ]
    me = one(conn, "SELECT current_user")
    assert all(e["db_role"] == me and e["os_user"] == getpass.getuser() for e in everything)
    assert [e["action"] for e in accounts] == ["account.enable", "account.disable"]
    assert [e["action"] for e in disables] == ["account.disable"]
    assert [e["target"] for e in acme_things] == ["acme", "acme/sg"]
    assert [e["action"] for e in app1] == ["account.enable", "account.disable"]
    assert [e["action"] for e in latest] == ["account.enable"]
    assert len(recent) == 4
    assert future == []
    assert everything[1]["before"]["status"] == "active"
    assert everything[1]["after"]["status"] == "suspended"
    for word in ("tenant.suspend", "provider.disable", "acme/sg", "suspended", "status:"):
        assert word in human
    assert "no audit log entries" in empty


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--since", "last tuesday"], "--since 'last tuesday'"), (["--limit", "0"], "--limit")],
    ids=["since", "limit"],
)
def test_audit_rejects_bad_options(cli: Cli, args: list[str], fragment: str) -> None:
    """`audit` with an unreadable --since or a --limit below 1 exits 1 with one line."""
    fails(cli("audit", *args), fragment)


# -- access control ------------------------------------------------------------------------


class Roles:
    """Login roles for one test, their configs, and the group roles under a prefix of
    their own, all dropped when the test ends."""

    def __init__(self, pg_url: str, tmp_path: Path, base: dict[str, Any]) -> None:
        self.pg_url = pg_url
        self.tmp_path = tmp_path
        self.base = base
        self.prefix = f"smtpproxy_t{secrets.token_hex(4)}"
        self.users: list[str] = []

    def user(self, label: str) -> tuple[str, Path]:
        """A new LOGIN role (no privileges) and a config file that connects as it."""
        name = f"{self.prefix}_{label}"
        with psycopg.connect(self.pg_url, autocommit=True) as c:
            c.execute(f'CREATE ROLE "{name}" LOGIN')
        self.users.append(name)
        url = psycopg.conninfo.make_conninfo(self.pg_url, user=name)
        raw = {**self.base, "database": {"url": url}}
        return name, write_config(self.tmp_path / f"{label}.toml", raw)

    def drop(self) -> None:
        groups = [f"{self.prefix}_{r}" for r in ("admin", "operator", "viewer")]
        with psycopg.connect(self.pg_url, autocommit=True) as c:
            for name in [*self.users, *groups]:
                if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    c.execute(f'DROP OWNED BY "{name}"')
                    c.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def roles(
    pg_url: str,
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    secret_key: str,
    config_path: Path,
) -> Iterator[Roles]:
    base = config_settings(tmp_path, pg_url, redis_url, key_prefix, secret_key)
    kit = Roles(pg_url, tmp_path, base)
    yield kit
    kit.drop()


def grant(cli: Cli, roles: Roles, role: str, user: str) -> str:
    return ok(cli("db", "grant", "--role", role, user, "--role-prefix", roles.prefix))


def test_viewer_reads_but_cannot_change_anything(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], roles: Roles
) -> None:
    """A viewer lists and shows everything (never hashes or secrets), and every change it
    tries is refused with one line naming the role to ask for; nothing is written."""
    name, path = roles.user("ann")
    ungranted = run_cli(path, "tenant", "list")
    out = grant(cli, roles, "viewer", name)

    def as_viewer(*args: str) -> Result:
        return run_cli(path, *args, input="x-secret\n")

    reads = [
        ["tenant", "list"],
        ["tenant", "show", "acme", "--json"],
        ["account", "list", "--json"],
        ["account", "show", "app1"],
        ["provider", "list", "--json"],
        ["provider", "show", "sg", "-t", "acme", "--json"],
        ["route", "list"],
        ["route", "show", "1", "--json"],
        ["audit", "--json"],
    ]
    for args in reads:
        text = ok(as_viewer(*args))
        assert "scrypt$" not in text
        assert SG_KEY not in text
    providers = as_json(as_viewer("provider", "list", "--json"))
    writes = {
        "create tenants": ["tenant", "add", "globex"],
        "suspend tenants": ["tenant", "suspend", "acme"],
        "create accounts": ["account", "add", "app9", "-t", "acme"],
        "change account passwords": ["account", "passwd", "app1", "--password-stdin"],
        "disable accounts": ["account", "disable", "app1"],
        "delete accounts": ["account", "delete", "billing", "--yes"],
        "add providers": [
            "provider",
            "add",
            "f",
            "-t",
            "acme",
            "--type",
            "file",
            "--set",
            "path=/x",
        ],
        "change providers": ["provider", "update", "sg", "-t", "acme", "--set", "region=eu"],
        "disable providers": ["provider", "disable", "sg", "-t", "acme"],
        "test providers (it reads provider secrets)": [
            "provider",
            "test",
            "out",
            "-t",
            "acme",
            "--to",
            "a@b.example",
        ],
        "add routes": ["route", "add", "-t", "acme", "-p", "sg"],
        "change routes": ["route", "move", "1", "--priority", "1"],
        "delete routes": ["route", "delete", "1", "--yes"],
    }
    before = conn.execute(
        "SELECT (SELECT json_agg(a ORDER BY id) FROM accounts a)::text,"
        " (SELECT json_agg(p ORDER BY id) FROM providers p)::text,"
        " (SELECT json_agg(r ORDER BY id) FROM routing_rules r)::text,"
        " (SELECT json_agg(t ORDER BY id) FROM tenants t)::text"
    ).fetchone()
    for doing, args in writes.items():
        needed = "admin" if "tenants" in doing else "operator"
        fails(
            as_viewer(*args),
            f"permission denied: your database role cannot {doing}; ask an admin to run "
            f"`smtpproxy db grant --role {needed} {name}`",
        )
    after = conn.execute(
        "SELECT (SELECT json_agg(a ORDER BY id) FROM accounts a)::text,"
        " (SELECT json_agg(p ORDER BY id) FROM providers p)::text,"
        " (SELECT json_agg(r ORDER BY id) FROM routing_rules r)::text,"
        " (SELECT json_agg(t ORDER BY id) FROM tenants t)::text"
    ).fetchone()

    fails(ungranted, "permission denied", f"`smtpproxy db grant --role viewer {name}`")
    assert f"granted {roles.prefix}_viewer to {name}" in out
    assert {p["name"]: p["has_secret"] for p in providers} == {"out": False, "sg": True}
    assert before == after
    assert not acme["outbox"].exists()
    url = psycopg.conninfo.make_conninfo(roles.pg_url, user=name)
    with psycopg.connect(url, autocommit=True) as c:
        for column, table in (("password_hash", "accounts"), ("secret", "providers")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT {column} FROM {table}")
        assert c.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM delivery_logs").fetchone() == (0,)


def test_operator_manages_accounts_providers_routes_but_not_tenants(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], roles: Roles
) -> None:
    """An operator adds and changes accounts, providers and routes, tests providers and
    replays messages, and is audited under its own role; tenants and deleting history
    need admin."""
    name, path = roles.user("olga")
    grant(cli, roles, "operator", name)
    mid = add_message(conn, "billing", "dlq")

    def as_operator(*args: str, input: str | None = None) -> Result:  # noqa: A002
        return run_cli(path, *args, input=input)

    created = as_json(as_operator("account", "add", "app9", "-t", "acme", "--json"))
    ok(as_operator("account", "passwd", "app9", "--password-stdin", input="pw-9\n"))
    ok(as_operator("account", "disable", "app1"))
    ok(as_operator("provider", "add", "pm", "-t", "acme", "--type", "file", "--set", "path=/x"))
    ok(as_operator("provider", "update", "sg", "-t", "acme", "--secret-stdin", input="SG.new\n"))
    ok(as_operator("provider", "test", "out", "-t", "acme", "--to", "a@b.example"))
    ok(as_operator("route", "add", "-t", "acme", "-p", "pm", "--account", "app9"))
    ok(as_operator("route", "move", "1", "--priority", "1"))
    ok(as_operator("route", "delete", "1", "--yes"))
    ok(as_operator("account", "delete", "app9", "--yes"))
    no_tenant = as_operator("tenant", "add", "globex")
    no_suspend = as_operator("tenant", "suspend", "acme")
    no_history = as_operator("account", "delete", "billing", "--with-history", "--yes")
    url = psycopg.conninfo.make_conninfo(roles.pg_url, user=name)
    with psycopg.connect(url, autocommit=True) as c:  # what a dead-letter replay does
        c.execute(
            "UPDATE messages SET status = 'queued', attempts = 0, next_attempt_at = now()"
            " WHERE id = %s",
            (mid,),
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE messages SET rcpt_to = '{}' WHERE id = %s", (mid,))

    assert created["username"] == "app9"
    fails(
        no_tenant,
        f"cannot create tenants; ask an admin to run `smtpproxy db grant --role admin {name}`",
    )
    fails(no_suspend, "cannot suspend tenants", "--role admin")
    fails(no_history, "cannot delete message history", "--role admin")
    assert one(conn, "SELECT count(*) FROM tenants") == 1
    assert one(conn, "SELECT count(*) FROM messages") == 1
    assert one(conn, "SELECT status FROM messages") == "queued"
    assert one(conn, "SELECT status FROM accounts WHERE username = 'app1'") == "disabled"
    assert list(acme["outbox"].glob("*.eml"))
    rows = audit_rows(conn)
    mine = [r for r in rows if r["db_role"] == name]
    assert [r["action"] for r in mine] == [
        "account.add",
        "account.passwd",
        "account.disable",
        "provider.add",
        "provider.update",
        "route.add",
        "route.move",
        "route.delete",
        "account.delete",
    ]
    assert "SG.new" not in json.dumps(rows)


def test_operator_manages_devices_and_viewer_lists_them(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], roles: Roles
) -> None:
    """Devices are the operator's, like accounts: an operator adds, disables and removes
    them (audited under its role); a viewer lists them and is refused every change."""
    viewer, viewer_path = roles.user("vic")
    operator, operator_path = roles.user("otto")
    grant(cli, roles, "viewer", viewer)
    grant(cli, roles, "operator", operator)
    network = ["--network", "192.0.2.40", "--account", "app1"]

    ok(run_cli(operator_path, "device", "add", "printer", *network))
    ok(run_cli(operator_path, "device", "disable", "printer"))
    listed = as_json(run_cli(viewer_path, "device", "list", "--json"))
    no_add = run_cli(viewer_path, "device", "add", "scanner", *network)
    no_remove = run_cli(viewer_path, "device", "remove", "printer")
    ok(run_cli(operator_path, "device", "remove", "printer"))

    assert [(d["name"], d["enabled"]) for d in listed] == [("printer", False)]
    fails(
        no_add,
        f"cannot add devices; ask an admin to run `smtpproxy db grant --role operator {viewer}`",
    )
    fails(no_remove, "cannot remove devices", "--role operator")
    actions = [r["action"] for r in audit_rows(conn) if r["db_role"] == operator]
    assert actions == ["device.add", "device.disable", "device.remove"]


def test_admin_role_manages_tenants_and_history(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], roles: Roles
) -> None:
    """An admin may add, suspend and delete tenants and delete an account's history."""
    name, path = roles.user("ada")
    grant(cli, roles, "admin", name)
    add_message(conn, "billing", "delivered")

    ok(run_cli(path, "tenant", "add", "globex"))
    ok(run_cli(path, "tenant", "suspend", "globex"))
    ok(run_cli(path, "account", "delete", "billing", "--with-history", "--yes"))
    ok(run_cli(path, "tenant", "delete", "globex", "--yes"))

    assert one(conn, "SELECT count(*) FROM tenants") == 1
    assert one(conn, "SELECT count(*) FROM messages") == 0
    actions = [r["action"] for r in audit_rows(conn) if r["db_role"] == name]
    assert actions == ["tenant.add", "tenant.suspend", "account.delete", "tenant.delete"]


def test_db_grant_is_idempotent_and_revocable(
    cli: Cli, conn: psycopg.Connection[Any], acme: dict[str, Any], roles: Roles
) -> None:
    """Granting twice is harmless, the group roles are NOLOGIN, `db revoke` ends the
    membership (and says so when there was none), and both are audited."""
    name, path = roles.user("vic")

    first = grant(cli, roles, "viewer", name)
    second = as_json(
        cli("db", "grant", "-r", "viewer", name, "--role-prefix", roles.prefix, "--json")
    )
    reading = run_cli(path, "account", "list", "--json")
    revoked = ok(cli("db", "revoke", "-r", "viewer", name, "--role-prefix", roles.prefix))
    again = as_json(
        cli("db", "revoke", "-r", "viewer", name, "--role-prefix", roles.prefix, "--json")
    )
    refused = run_cli(path, "account", "list")

    assert f"granted {roles.prefix}_viewer to {name}" in first
    assert second == {"user": name, "role": f"{roles.prefix}_viewer"}
    assert [a["username"] for a in json.loads(ok(reading))] == ["app1", "billing"]
    assert f"revoked {roles.prefix}_viewer from {name}" in revoked
    assert again["revoked"] is False
    fails(refused, "cannot list accounts", "--role viewer")
    logins = conn.execute(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE %s ORDER BY rolname",
        (f"{roles.prefix}\\_%",),
    ).fetchall()
    assert logins == [
        (f"{roles.prefix}_admin", False),
        (f"{roles.prefix}_operator", False),
        (f"{roles.prefix}_vic", True),
        (f"{roles.prefix}_viewer", False),
    ]
    assert [(r["action"], r["target"]) for r in audit_rows(conn)] == [
        ("db.grant", name),
        ("db.grant", name),
        ("db.revoke", name),
    ]


def test_db_grant_refusals(cli: Cli, acme: dict[str, Any], roles: Roles) -> None:
    """`db grant` names a missing user and how to create it, refuses a group role as the
    user and an unknown role, and refuses to run for a role that does not own the tables."""
    name, path = roles.user("eve")
    grant(cli, roles, "operator", name)

    missing = cli("db", "grant", "--role", "viewer", "nobody_here", "--role-prefix", roles.prefix)
    group = cli(
        "db", "grant", "-r", "viewer", f"{roles.prefix}_admin", "--role-prefix", roles.prefix
    )
    unknown = cli("db", "grant", "--role", "god", name)
    by_operator = run_cli(path, "db", "grant", "-r", "admin", name, "--role-prefix", roles.prefix)

    fails(missing, "no database role named 'nobody_here'", "CREATE ROLE")
    fails(group, "is one of smtpproxy's group roles")
    assert unknown.returncode == 2
    assert "god" in unknown.stderr
    fails(by_operator, "permission denied: your database role cannot grant roles", "owner")


# -- help and completion -------------------------------------------------------------------

MY_COMMANDS = [
    ["tenant", "add"],
    ["tenant", "list"],
    ["tenant", "show"],
    ["tenant", "suspend"],
    ["tenant", "resume"],
    ["tenant", "delete"],
    ["account", "add"],
    ["account", "list"],
    ["account", "show"],
    ["account", "passwd"],
    ["account", "disable"],
    ["account", "enable"],
    ["account", "delete"],
    ["provider", "add"],
    ["provider", "list"],
    ["provider", "show"],
    ["provider", "update"],
    ["provider", "test"],
    ["provider", "enable"],
    ["provider", "disable"],
    ["provider", "delete"],
    ["route", "add"],
    ["route", "list"],
    ["route", "show"],
    ["route", "move"],
    ["route", "delete"],
    ["device", "add"],
    ["device", "list"],
    ["device", "disable"],
    ["device", "enable"],
    ["device", "remove"],
    ["db", "migrate"],
    ["db", "status"],
    ["db", "grant"],
    ["db", "revoke"],
    ["audit"],
]


@pytest.mark.parametrize("command", MY_COMMANDS, ids=[" ".join(c) for c in MY_COMMANDS])
def test_help_has_an_example(tmp_path: Path, command: list[str]) -> None:
    """Every administrative command's --help works without a database and shows an example
    that uses the command itself."""
    result = run_cli(tmp_path / "absent.toml", *command, "--help")

    out = ok(result)
    assert "Example" in out
    assert f"smtpproxy {' '.join(command)}" in out.replace("\n", " ")


def complete(words: str) -> list[tuple[str, str]]:
    """What zsh completion offers for the command line `words`: (value, help) pairs."""
    script = Path(sys.executable).with_name("smtpproxy")
    env = {**os.environ, "_SMTPPROXY_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": words}
    out = subprocess.run(
        [str(script)], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    # _arguments '*: :(("value":"help"
    # "value":"help"))'          (help absent for plain choices)
    body = out.strip().removeprefix("_arguments '*: :((").removesuffix("))'")
    pairs = []
    for entry in body.splitlines():
        value, _, help_ = entry.partition('":"')
        pairs.append((value.strip('"'), help_.strip('"')))
    return pairs


@pytest.mark.parametrize("group", ["tenant", "account", "provider", "route", "device", "db"])
def test_shell_completion_offers_every_command_with_help(group: str) -> None:
    """Shell completion offers each subcommand of a group with its help text."""
    offered = dict(complete(f"smtpproxy {group} "))

    expected = {c[1] for c in MY_COMMANDS if c[0] == group}
    assert expected <= set(offered), offered
    assert all(offered[c].strip() for c in expected), offered


def test_shell_completion_offers_choices() -> None:
    """Completion knows the provider types and the database roles."""
    types = [v for v, _ in complete("smtpproxy provider add x --type ")]
    grant_roles = [v for v, _ in complete("smtpproxy db grant --role ")]

    assert {"sendgrid", "file", "ses", "mailgun", "postmark"} <= set(types)
    assert grant_roles == ["viewer", "operator", "admin"]
