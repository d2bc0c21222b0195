"""SMTP ingress through a running service: AUTH, envelope checks, durability, reply codes."""

from __future__ import annotations

import json
import smtplib
import socket
from pathlib import Path
from typing import Any

import psycopg
import trio

from smtpproxy.config import Config
from smtpproxy.store import key_for
from tests.conftest import Service, make_config
from tests.support import serving, smtp

run = trio.to_thread.run_sync


async def test_accepted_message_is_durable_before_250(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str, redis_url: str
) -> None:
    """A 250 means the body is in the store, the row is committed and the id is on the stream."""
    data = smtp.message()
    with trio.fail_after(20):
        code, reply = await run(
            lambda: smtp.send(service.smtp_port, "app", account["password"], data)
        )
    assert code == 250
    mid = smtp.queued_id(reply)
    body_path = cfg.storage_path / key_for(mid)
    assert body_path.read_bytes() == data
    assert oct(body_path.stat().st_mode & 0o777) == "0o640"
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT mail_from, rcpt_to, subject, header_message_id, size, sha256"
            " FROM messages WHERE id = %s",
            (mid,),
        ).fetchone()
    assert row is not None
    assert row[0] == "alice@example.com"
    assert row[1] == ["bob@example.org"]
    assert row[2] == "hello"
    assert row[3] == data.split(b"Message-ID: <")[1].split(b">")[0].decode()
    assert row[4] == len(data)


async def test_auth_login_and_plain_both_work(service: Service, account: dict[str, Any]) -> None:
    """AUTH LOGIN (334 Username:/Password:) and AUTH PLAIN both authenticate."""
    with trio.fail_after(20):
        for mech in ("LOGIN", "PLAIN"):
            code, _ = await run(
                lambda m=mech: smtp.send(
                    service.smtp_port, "app", account["password"], smtp.message(), mechanism=m
                )
            )
            assert code == 250


async def test_auth_login_prompts(service: Service, account: dict[str, Any]) -> None:
    """AUTH LOGIN prompts with base64 'Username:' and 'Password:'; '*' aborts with one reply."""

    def talk() -> list[tuple[int, bytes]]:
        with smtp.connect(service.smtp_port) as c:
            first = c.docmd("AUTH", "LOGIN")
            second = c.docmd("YXBw")  # "app"
            aborted = c.docmd("*")
            after = c.noop()
            return [first, second, aborted, after]

    with trio.fail_after(20):
        first, second, aborted, after = await run(talk)
    assert first == (334, b"VXNlcm5hbWU6")
    assert second == (334, b"UGFzc3dvcmQ6")
    assert aborted[0] == 501  # exactly one reply to the abort: the NOOP gets its own
    assert after[0] == 250


async def test_bad_credentials_get_535(service: Service, account: dict[str, Any]) -> None:
    """A wrong password and an unknown user get the same 535 5.7.8."""

    def attempt(user: str, password: str) -> tuple[int, bytes]:
        with smtp.connect(service.smtp_port) as c:
            try:
                smtp.login(c, user, password)
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
            return 235, b""

    with trio.fail_after(20):
        wrong = await run(lambda: attempt("app", "nope"))
        unknown = await run(lambda: attempt("nobody", "nope"))
    assert wrong == unknown == (535, b"5.7.8 Authentication credentials invalid")


async def test_auth_needs_tls_and_mail_needs_auth(
    service: Service, account: dict[str, Any]
) -> None:
    """Before STARTTLS, AUTH is neither offered nor accepted; MAIL before AUTH gets 530."""

    def talk() -> tuple[bool, tuple[int, bytes], tuple[int, bytes]]:
        with smtp.connect(service.smtp_port, starttls=False) as c:
            offered = c.has_extn("auth")
            auth = c.docmd("AUTH", "PLAIN AGFwcABub3Bl")
            mail = c.mail("alice@example.com")
            return offered, auth, mail

    with trio.fail_after(20):
        offered, auth, mail = await run(talk)
    assert not offered
    assert auth[0] == 538
    assert mail[0] == 530


async def test_starttls_discards_injected_plaintext_and_cannot_repeat(
    service: Service, account: dict[str, Any]
) -> None:
    """Commands pipelined in plaintext after STARTTLS are discarded, not run inside the
    TLS session (STARTTLS command injection); the session after the handshake starts
    fresh; a second STARTTLS is refused."""

    def talk() -> tuple[bytes, list[bytes]]:
        with socket.create_connection(("127.0.0.1", service.smtp_port), timeout=10) as raw:
            plain = raw.makefile("rb")
            plain.readline()  # greeting
            raw.sendall(b"EHLO client.example\r\n")
            while plain.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\nRSET\r\n")  # RSET injected before the handshake
            ready = plain.readline()
            with smtp.insecure_context().wrap_socket(raw) as tls:
                secure = tls.makefile("rb")
                tls.sendall(b"NOOP\r\nSTARTTLS\r\n")
                replies = [secure.readline(), secure.readline()]
                return ready, replies

    with trio.fail_after(20):
        ready, (first, second) = await run(talk)
    assert ready.startswith(b"220 ")
    assert first.startswith(b"250 ")  # the NOOP's reply: no reply to the injected RSET
    assert second.startswith(b"554 5.5.1")


async def test_sender_domain_must_be_allowed(service: Service, account: dict[str, Any]) -> None:
    """A sender outside the account's allowed domains gets 550 5.7.1; <> is accepted."""

    def talk() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtp.connect(service.smtp_port) as c:
            smtp.login(c, "app", account["password"])
            bad = c.mail("eve@evil.example")
            c.rset()
            null = c.mail("<>")
            return bad, null

    with trio.fail_after(20):
        bad, null = await run(talk)
    assert bad[0] == 550 and bad[1].startswith(b"5.7.1")
    assert null[0] == 250


async def test_unqualified_addresses_are_refused_at_mail_and_rcpt(
    service: Service, account: dict[str, Any]
) -> None:
    """A sender or recipient that is not user@fully.qualified gets 553 at once, instead of
    being accepted and bouncing at the provider; quoted and UTF-8 local parts pass."""

    def talk() -> dict[str, tuple[int, bytes]]:
        out = {}
        with smtp.connect(service.smtp_port) as c:
            smtp.login(c, "app", account["password"])
            out["sender"] = c.docmd("MAIL FROM:<alice>")
            out["sender ok"] = c.mail("alice@example.com")
            for rcpt in ("bob", "bob@localhost", "@example.org", "bob@exa mple.org"):
                out[rcpt] = c.docmd(f"RCPT TO:<{rcpt}>")
            out["quoted"] = c.docmd('RCPT TO:<"bob smith"@example.org>')
            out["literal"] = c.docmd("RCPT TO:<bob@[192.0.2.1]>")
        return out

    with trio.fail_after(20):
        got = await run(talk)
    assert got["sender"][0] == 553 and got["sender"][1].startswith(b"5.1.7")
    assert got["sender ok"][0] == 250
    for rcpt in ("bob", "bob@localhost", "@example.org", "bob@exa mple.org"):
        assert got[rcpt][0] in (501, 553), (rcpt, got[rcpt])
    assert got["bob"][1].startswith(b"5.1.3")
    assert got["quoted"][0] == 250 and got["literal"][0] == 250


async def test_queue_unavailable_means_451_and_nothing_delivered(
    tmp_path: Any,
    pg_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """When Redis cannot take the id after the retries, the client gets 451 and the row
    is enqueue_failed with its body removed."""
    from smtpproxy.runtime.service import serve
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        pg_url,
        "redis://127.0.0.1:1/0",  # nothing listens there
        key_prefix,
        smtp={"enqueue_retry_delays": ["10ms", "20ms", "30ms"]},
        redis={"socket_timeout": "1s"},
    )
    stop = trio.Event()

    async def start() -> Any:
        return await nursery.start(serve, cfg, stop)

    with trio.fail_after(30):
        # the consumer cannot create its group either; serve must still come up
        running = await start()
        code, _ = await run(
            lambda: smtp.send(running.smtp[0][1], "app", account["password"], smtp.message())
        )
    stop.set()
    assert code == 451
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT status, storage_key FROM messages").fetchall()
    assert [r[0] for r in rows] == ["enqueue_failed"]
    assert not (cfg.storage_path / rows[0][1]).exists()


async def test_store_failure_means_451_and_no_row(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str
) -> None:
    """When the body cannot be stored the client gets 451 and no row is written."""
    import shutil

    shutil.rmtree(cfg.storage_path)
    cfg.storage_path.write_text("not a directory any more")
    with trio.fail_after(20):
        code, reply = await run(
            lambda: smtp.send(service.smtp_port, "app", account["password"], smtp.message())
        )
    assert code == 451 and b"4.3.0" in reply
    assert b"directory" not in reply.lower()  # no internal error text in the reply
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_database_failure_means_451_and_the_body_is_removed(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str
) -> None:
    """When the row cannot be inserted the client gets 451 and the stored body is removed."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE messages RENAME TO messages_away")
    try:
        with trio.fail_after(20):
            code, _ = await run(
                lambda: smtp.send(service.smtp_port, "app", account["password"], smtp.message())
            )
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE messages_away RENAME TO messages")
    assert code == 451
    leftovers = [p for p in cfg.storage_path.rglob("*") if p.is_file()]
    assert leftovers == []


async def test_resubmission_gets_the_original_id_and_is_stored_once(
    service: Service, account: dict[str, Any], cfg: Config, pg_url: str
) -> None:
    """A client re-sending the same message (same Message-ID and body) within the window
    gets 250 with the first id and no second copy is kept; a changed body is new mail."""
    data = smtp.message(message_id="<resend-1@example.com>")
    changed = smtp.message(message_id="<resend-1@example.com>", body="other text\n")
    with trio.fail_after(30):
        replies = [
            await run(lambda d=d: smtp.send(service.smtp_port, "app", account["password"], d))
            for d in (data, data, changed)
        ]
    ids = [smtp.queued_id(r[1]) for r in replies]
    assert ids[0] == ids[1] != ids[2]
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id FROM messages ORDER BY id").fetchall()
    assert sorted(r[0] for r in rows) == sorted({ids[0], ids[2]})
    stored = list(cfg.storage_path.rglob("*.eml"))
    assert len(stored) == 2


def split_transactions(port: int, password: str, data: bytes, rcpts: list[str]) -> list[str]:
    """Send data to rcpts as an MTA does when the server limits recipients: as many RCPTs
    as are taken (452 for the rest), then the same bytes again in a new transaction to
    the recipients left. Returns the queued ids."""
    ids = []
    with smtp.connect(port) as client:
        smtp.login(client, "app", password)
        left = list(rcpts)
        while left:
            assert client.mail("alice@example.com")[0] == 250
            taken = []
            for r in left:
                code, _ = client.rcpt(r)
                if code == 452:
                    break
                assert code == 250, code
                taken.append(r)
            assert taken
            code, reply = client.data(data)
            assert code == 250, reply
            ids.append(smtp.queued_id(reply))
            left = left[len(taken) :]
    return ids


async def test_one_message_split_over_transactions_reaches_every_recipient(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """120 recipients, max_recipients 50: the client sends the same bytes in three
    transactions, each is a message of its own (not a duplicate) and all 120 get it."""
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        smtp={"max_recipients": 50},
        delivery={"default_route": "outbox"},
    )
    running, stop = await serving.start(nursery, cfg)
    port = running.smtp[0][1]
    rcpts = [f"user{n:03}@example.org" for n in range(120)]
    data = smtp.message(message_id="<split-over-transactions@example.com>")
    with trio.fail_after(60):
        ids = await run(lambda: split_transactions(port, account["password"], data, rcpts))
        for mid in ids:
            await serving.wait_status(pg_url, mid, "delivered")
    stop.set()
    assert len(ids) == len(set(ids)) == 3
    delivered = []
    for mid in ids:
        envelope = json.loads((tmp_path / "outbox" / f"{mid}.json").read_text())
        assert (tmp_path / "outbox" / f"{mid}.eml").read_bytes() == data
        delivered += envelope["rcpt_to"]
    assert sorted(delivered) == rcpts


async def test_a_duplicate_is_the_same_envelope_too(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """The same Message-ID and body is a duplicate only with the same sender and the same
    recipient set (in any order); another sender, fewer, more or overlapping recipients
    make a new message."""
    data = smtp.message(message_id="<same-bytes@example.com>")
    password = account["password"]

    def send(mail_from: str, *rcpts: str) -> str:
        code, reply = smtp.send(
            service.smtp_port, "app", password, data, mail_from=mail_from, rcpt_to=rcpts
        )
        assert code == 250, reply
        return smtp.queued_id(reply)

    with trio.fail_after(30):
        first = await run(lambda: send("alice@example.com", "a@example.org", "b@example.org"))
        again = await run(lambda: send("alice@example.com", "b@example.org", "a@example.org"))
        others = [
            await run(lambda e=e: send(*e))
            for e in (
                ("carol@example.com", "a@example.org", "b@example.org"),
                ("alice@example.com", "a@example.org"),
                ("alice@example.com", "a@example.org", "b@example.org", "c@example.org"),
                ("alice@example.com", "b@example.org", "c@example.org"),
            )
        ]
    assert again == first
    assert len({first, *others}) == 5
    with psycopg.connect(pg_url) as conn:
        count = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert count == (5,)


async def test_hostile_input_is_refused_and_nothing_of_it_is_queued(
    service: Service, account: dict[str, Any], pg_url: str
) -> None:
    """Through the running service: STARTTLS's 220 carries 2.0.0; a NUL in an address
    and a UTF-8 address without SMTPUTF8 are refused; a message pipelined behind a
    refused DATA ends the session and none of the commands inside it run."""
    inner = (
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        + smtp.message()
        + b".\r\n"
    )

    def session() -> tuple[bytes, list[int], list[int]]:
        client = smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10)
        client.ehlo("client.test")
        _, ready = client.starttls(context=smtp.insecure_context())
        client.ehlo("client.test")
        smtp.login(client, "app", account["password"])

        def raw(line: bytes) -> int:
            client.send(line + b"\r\n")
            return client.getreply()[0]

        refused = [
            raw(b"MAIL FROM:<alice\0x@example.com>"),
            raw("MAIL FROM:<jörg@example.com>".encode()),
            raw(b"MAIL FROM:<alice@example.com>"),
            raw(b"RCPT TO:<bob\0by@example.org>"),
        ]
        client.send(b"DATA\r\n" + inner)
        after = [client.getreply()[0] for _ in range(2)]
        try:
            after.append(client.getreply()[0])
        except smtplib.SMTPServerDisconnected:
            after.append(0)
        client.close()
        return ready, refused, after

    with trio.fail_after(30):
        ready, refused, after = await run(session)
        await trio.sleep(0.5)
    assert ready.startswith(b"2.0.0")
    assert refused == [553, 553, 250, 553]
    assert after == [503, 421, 0]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
