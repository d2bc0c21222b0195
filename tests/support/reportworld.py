"""A small, realistic installation for the report tests: two tenants, three accounts, and
messages in every status with the delivery attempts that led there (failover, retries,
a dead letter, a lost body, a split by route, a duplicate Message-ID).

Tenants and accounts are made through smtpproxy.admin; messages and delivery_logs rows
are inserted as the delivery code writes them, at fixed times from T0 (2024-05-01 10:00
UTC), so every report over them has one exact expected answer. Only what must be live
(next attempts, a claim) is set relative to the database's now().
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import psycopg

from smtpproxy import admin
from smtpproxy.ids import new_message_id

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
Conn = psycopg.Connection[Any]


def at(minutes: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(minutes=minutes, seconds=seconds)


@attrs.define
class World:
    tenants: dict[str, int] = attrs.field(factory=dict)
    accounts: dict[str, int] = attrs.field(factory=dict)
    messages: dict[str, str] = attrs.field(factory=dict)  # name -> message id
    logs: dict[str, int] = attrs.field(factory=dict)  # name -> delivery_logs id
    account_tenant: dict[str, str] = attrs.field(factory=dict)


def add_message(
    conn: Conn,
    world: World,
    name: str,
    account: str,
    created: datetime,
    status: str,
    *,
    rcpt: tuple[str, ...] = ("alice@example.org",),
    parent: str | None = None,
    suffix: str = "",
    **columns: Any,
) -> str:
    """A messages row as ingress and delivery leave it; returns its id."""
    parent_id = world.messages[parent] if parent else None
    mid = f"{parent_id}{suffix}" if parent_id else new_message_id(int(created.timestamp() * 1000))
    values: dict[str, Any] = {
        "id": mid,
        "parent_id": parent_id,
        "tenant_id": world.tenants[world.account_tenant[account]],
        "account_id": world.accounts[account],
        "mail_from": f"{account}@{world.account_tenant[account]}.test",
        "rcpt_to": list(rcpt),
        "subject": f"{name} subject",
        "header_message_id": "",
        "size": 2048,
        "sha256": "0" * 64,
        "storage_key": f"ab/{mid}",
        "client_ip": "203.0.113.7",
        "status": status,
        "created_at": created,
        "updated_at": created,
        **columns,
    }
    names = ", ".join(values)
    marks = ", ".join(f"%({k})s" for k in values)
    conn.execute(f"INSERT INTO messages ({names}) VALUES ({marks})", values)  # type: ignore[arg-type]
    world.messages[name] = mid
    return mid


def add_log(
    conn: Conn,
    world: World,
    name: str,
    message: str,
    when: datetime,
    provider: str,
    status: str,
    attempt: int,
    duration_ms: int,
    error: str = "",
    provider_message_id: str | None = None,
) -> int:
    """A delivery_logs row for message (by name), as delivery.records writes one."""
    row = conn.execute(
        """
        INSERT INTO delivery_logs (message_id, account_id, tenant_id, provider_name, status,
                                   error_message, attempt_number, duration_ms,
                                   provider_message_id, recipients, created_at)
        SELECT id, account_id, tenant_id, %s, %s, %s, %s, %s, %s, rcpt_to, %s
        FROM messages WHERE id = %s
        RETURNING id
        """,
        (
            provider,
            status,
            error,
            attempt,
            duration_ms,
            provider_message_id,
            when,
            world.messages[message],
        ),
    ).fetchone()
    assert row is not None
    world.logs[name] = int(row[0])
    return int(row[0])


LONG_ERROR = (
    "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in virtual "
    "mailbox table (the provider said so twice)"
)


def build(conn: Conn) -> World:
    """The installation every report test reads (see the module docstring)."""
    w = World()
    for tenant in ("acme", "globex"):
        w.tenants[tenant] = admin.add_tenant(conn, tenant)
    for account, tenant in (("app1", "acme"), ("app2", "acme"), ("gx", "globex")):
        w.accounts[account] = admin.add_account(conn, account, tenant, "not-a-real-hash", [])
        w.account_tenant[account] = tenant

    # delivered at the first try
    add_message(
        conn, w, "ok", "app1", at(0), "delivered", header_message_id="inv-1@acme.test",
        attempts=1, provider_name="sendgrid", provider_message_id="sg-1", finished_at=at(0, 2),
    )  # fmt: skip
    add_log(conn, w, "ok", "ok", at(0, 2), "sendgrid", "delivered", 1, 850, "", "sg-1")

    # sendgrid was down: failed over to ses, which delivered
    add_message(
        conn, w, "failover", "app1", at(5), "delivered",
        rcpt=("bob@example.org", "carol@example.org"), attempts=1, provider_name="ses",
        provider_message_id="ses-1", finished_at=at(5, 3),
    )  # fmt: skip
    add_log(conn, w, "failover-1", "failover", at(5, 1), "sendgrid", "failover", 1, 1200,
            "503 Service Unavailable")  # fmt: skip
    add_log(conn, w, "failover-2", "failover", at(5, 3), "ses", "delivered", 1, 400, "", "ses-1")

    # a timeout: waiting for its second attempt
    add_message(
        conn, w, "retry", "app2", at(10), "retrying", rcpt=("Dave@Example.org",), attempts=1,
        provider_name="ses", last_error="timed out after 30 s",
    )  # fmt: skip
    conn.execute(
        "UPDATE messages SET next_attempt_at = now() + interval '10 minutes' WHERE id = %s",
        (w.messages["retry"],),
    )
    add_log(conn, w, "retry", "retry", at(10, 30), "ses", "retrying", 1, 30000,
            "timed out after 30 s")  # fmt: skip

    # three attempts, then the dead-letter queue
    add_message(
        conn, w, "dlq", "gx", at(15), "dlq", rcpt=("erin@example.net",), attempts=3,
        subject="[red]Overdue[/red] invoice: 50% off [link=x]",
        provider_name="mailgun", last_error="gave up after 3 attempts: 421 try again later",
        finished_at=at(45),
    )  # fmt: skip
    add_log(conn, w, "dlq-1", "dlq", at(15, 1), "mailgun", "retrying", 1, 2000,
            "421 try again later")  # fmt: skip
    add_log(conn, w, "dlq-2", "dlq", at(25), "mailgun", "retrying", 2, 3000, "421 try again later")
    add_log(conn, w, "dlq-3", "dlq", at(45), "mailgun", "dlq", 3, 4000,
            "gave up after 3 attempts: 421 try again later")  # fmt: skip

    # refused for good
    add_message(
        conn, w, "failed", "app1", at(20), "failed", rcpt=("nobody@example.org",), attempts=1,
        provider_name="sendgrid", last_error=LONG_ERROR, finished_at=at(20, 1),
    )  # fmt: skip
    add_log(conn, w, "failed", "failed", at(20, 1), "sendgrid", "failed", 1, 300, LONG_ERROR)

    # the body vanished from the store before delivery
    add_message(
        conn, w, "lost", "gx", at(30), "storage_error", rcpt=("frank@example.net",), attempts=1,
        last_error="body missing from the store", finished_at=at(30, 1),
    )  # fmt: skip
    add_log(conn, w, "lost", "lost", at(30, 1), "", "storage_error", 1, 0,
            "body missing from the store")  # fmt: skip

    # recipients routed to two providers: split into two children
    add_message(
        conn, w, "split", "app1", at(40), "split", rcpt=("a@one.test", "b@two.test"),
        header_message_id="split@acme.test", attempts=1, finished_at=at(40, 1),
    )  # fmt: skip
    add_message(
        conn, w, "split.1", "app1", at(40), "delivered", rcpt=("a@one.test",), parent="split",
        suffix=".1", header_message_id="split@acme.test", attempts=1, provider_name="sendgrid",
        provider_message_id="sg-2", finished_at=at(41),
    )  # fmt: skip
    add_message(
        conn, w, "split.2", "app1", at(40), "retrying", rcpt=("b@two.test",), parent="split",
        suffix=".2", header_message_id="split@acme.test", attempts=1, provider_name="ses",
        last_error="451 greylisted",
    )  # fmt: skip
    conn.execute(
        "UPDATE messages SET next_attempt_at = now() + interval '5 minutes' WHERE id = %s",
        (w.messages["split.2"],),
    )
    add_log(conn, w, "split.1", "split.1", at(41), "sendgrid", "delivered", 1, 500, "", "sg-2")
    add_log(conn, w, "split.2", "split.2", at(41, 5), "ses", "retrying", 1, 700, "451 greylisted")

    # waiting: queued, being sent, and one the client was told 451 for
    add_message(conn, w, "queued", "app2", at(50), "queued")
    add_message(
        conn, w, "sending", "app1", at(55), "sending", attempts=1, claimed_by="relay-1:4242",
        claimed_at=at(55, 1),
    )  # fmt: skip
    add_message(conn, w, "refused", "app2", at(58), "enqueue_failed", finished_at=at(58))

    # the same Message-ID sent twice, an hour apart: two messages; the older body is gone
    add_message(
        conn, w, "dup-1", "gx", at(60), "delivered", header_message_id="dup@globex.test",
        attempts=1, provider_name="mailgun", finished_at=at(60, 1), body_deleted_at=at(90),
    )  # fmt: skip
    add_log(conn, w, "dup-1", "dup-1", at(60, 1), "mailgun", "delivered", 1, 600)
    add_message(
        conn, w, "dup-2", "gx", at(70), "delivered", header_message_id="dup@globex.test",
        attempts=1, provider_name="mailgun", finished_at=at(70, 1),
    )  # fmt: skip
    add_log(conn, w, "dup-2", "dup-2", at(70, 1), "mailgun", "delivered", 1, 800)
    return w


# every attempt, newest first (what `smtpproxy logs` lists over the whole world)
NEWEST_FIRST = [
    "dup-2", "dup-1", "dlq-3", "split.2", "split.1", "lost", "dlq-2", "failed", "dlq-1",
    "retry", "failover-2", "failover-1", "ok",
]  # fmt: skip
