"""SMTP ingress on the open internet: connection limits, timeouts, AUTH throttling and
caching, tenant limits (rate, quota, networks), backpressure, header From, implicit TLS,
certificate reload, and the per-session log line; with real clients over real sockets."""

from __future__ import annotations

import base64
import contextlib
import signal
import smtplib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import trio
from cryptography import x509

from smtpproxy import admin
from smtpproxy.config.passwords import hash_password
from smtpproxy.ingress.tls import generate_self_signed
from smtpproxy.runtime.service import Running
from tests.conftest import PASSWORD, make_config
from tests.support import serving, smtp
from tests.support.faults import RedisProcess
from tests.support.process import SmtpProxyProcess, write_config

run = trio.to_thread.run_sync


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, prefix: str, **sections: Any
) -> tuple[Running, trio.Event]:
    return await serving.start(
        nursery, make_config(tmp_path, pg_url, redis_url, prefix, **sections)
    )


def notify(conn: psycopg.Connection[Any]) -> None:
    conn.execute("NOTIFY smtpproxy_config, 'test'")


OPEN: list[smtplib.SMTP] = []


def greeting(port: int, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """Open a session from the given local address and return its greeting; the session
    stays open (in OPEN) until the test closes it."""
    client = smtplib.SMTP(timeout=10, source_address=(source, 0))
    OPEN.append(client)
    return client.connect("127.0.0.1", port)


def login_result(
    port: int, user: str, password: str, source: str = "127.0.0.1"
) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        client.ehlo("c.test")
        client.starttls(context=smtp.insecure_context())
        client.ehlo("c.test")
        smtp.login(client, user, password)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error
    else:
        return 235, b""
    finally:
        client.close()


async def test_connection_limits_total_and_per_address(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None, nursery: trio.Nursery
) -> None:
    """Over max_connections_per_ip a client address gets 421 4.7.0 while another address
    still gets in; over max_connections everyone gets 421."""
    running, stop = await start(
        nursery,
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        smtp={"max_connections_per_ip": 2, "max_connections": 3},
    )
    port = running.smtp[0][1]
    held: list[socket.socket] = []
    with trio.fail_after(30):
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", port)))
            held[-1].recv(1024)
        third = await run(lambda: greeting(port))
        other = await run(lambda: greeting(port, "127.0.0.2"))  # a third session overall
        fourth = await run(lambda: greeting(port, "127.0.0.3"))
    for s in held:
        s.close()
    while OPEN:
        OPEN.pop().close()
    stop.set()
    assert third[0] == 421 and b"your address" in third[1]
    assert other[0] == 220
    assert fourth[0] == 421 and b"Too many connections" in fourth[1]


def _hang_up_early(port: int, tls_port: int, n: int) -> None:
    """n connections of each kind a scanner or a load balancer's health check makes:
    closed at once, reset at once, closed after the greeting, and closed on the
    implicit-TLS port before the handshake."""
    for _ in range(n):
        socket.create_connection(("127.0.0.1", port)).close()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            s.recv(1024)
        socket.create_connection(("127.0.0.1", tls_port)).close()


def _greetings(port: int, count: int) -> list[int]:
    """Open count sessions, one after another and all held open; their greeting codes."""
    held = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(10)
            held.append(s)
        return [int(s.recv(1024)[:3]) for s in held]
    finally:
        for s in held:
            s.close()


async def test_connections_closed_early_give_their_slot_back(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None, nursery: trio.Nursery
) -> None:
    """Hundreds of connections that close before, at or right after the greeting (and
    before the TLS handshake on the implicit-TLS port) hold no slot: afterwards exactly
    max_connections sessions are served and the next gets 421."""
    running, stop = await start(
        nursery,
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        smtp={"max_connections": 3, "tls_listen": ["127.0.0.1:0"]},
    )
    port, tls_port = running.smtp[0][1], running.smtp[1][1]
    with trio.fail_after(60):
        await run(lambda: _hang_up_early(port, tls_port, 100))
        deadline = trio.current_time() + 10
        codes = await run(lambda: _greetings(port, 4))
        while codes != [220, 220, 220, 421] and trio.current_time() < deadline:
            await trio.sleep(0.2)  # the server sees the last closes a moment later
            codes = await run(lambda: _greetings(port, 4))
    stop.set()
    assert codes == [220, 220, 220, 421], codes


async def test_idle_and_total_session_timeouts(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None, nursery: trio.Nursery
) -> None:
    """An idle session is closed after smtp.timeout, a busy one after
    smtp.max_session_duration, each with a 421 4.4.2 first."""
    running, stop = await start(
        nursery,
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        smtp={"timeout": "1s", "max_session_duration": "2s"},
    )
    port = running.smtp[0][1]

    def idle() -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.recv(1024)
            start_at = time.monotonic()
            got = b""
            while chunk := s.recv(1024):
                got += chunk
            return time.monotonic() - start_at, got

    def busy() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.recv(1024)
            got = b""
            for _ in range(30):
                try:
                    s.sendall(b"NOOP\r\n")
                    got += s.recv(1024)
                except OSError:
                    break
                time.sleep(0.2)
            return got

    with trio.fail_after(30):
        idle_for, farewell = await run(idle)
        replies = await run(busy)
    stop.set()
    assert 0.8 < idle_for < 5
    assert farewell.startswith(b"421 4.4.2 Idle too long")
    assert b"421 4.4.2 Session too long" in replies


async def test_auth_failures_slow_down_then_lock_out(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """Each failed AUTH is answered more slowly; past auth_max_failures the client gets
    421 4.7.0 and is disconnected, and the username stays locked from other addresses."""
    running, stop = await start(
        nursery, tmp_path, pg_url, redis_url, key_prefix, smtp={"auth_max_failures": 3}
    )
    port = running.smtp[0][1]
    times = []
    with trio.fail_after(60):
        results = []
        for _ in range(3):
            t0 = time.monotonic()
            results.append(await run(lambda: login_result(port, "app", "wrong")))
            times.append(time.monotonic() - t0)
        locked_ip = await run(lambda: login_result(port, "app", PASSWORD))
        locked_user = await run(lambda: login_result(port, "app", PASSWORD, "127.0.0.2"))
    stop.set()
    assert [r[0] for r in results[:2]] == [535, 535]
    assert results[2][0] == 421  # the failure that reached the limit
    assert times[1] > times[0] + 0.3  # slower each time
    assert locked_ip[0] == 421 and locked_user[0] == 421


async def test_password_change_and_networks_apply_at_once(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """Cached logins are forgotten when the configuration changes: a new password or a
    tenant network list takes effect for the next login."""
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    # each change is followed by a wait for the reload it notifies (not a fixed sleep)
    with trio.fail_after(60), serving.log_records() as reloaded:
        assert (await run(lambda: login_result(port, "app", PASSWORD)))[0] == 235
        assert (await run(lambda: login_result(port, "app", PASSWORD)))[0] == 235  # cached
        await serving.changed_and_reloaded(
            reloaded,
            lambda: admin.set_password(conn, "app", hash_password("new password")),
            "account",
        )
        old = await run(lambda: login_result(port, "app", PASSWORD))
        new = await run(lambda: login_result(port, "app", "new password"))
        await serving.changed_and_reloaded(
            reloaded, lambda: admin.update_tenant(conn, "acme", networks=["10.0.0.0/8"]), "tenant"
        )
        outside = await run(lambda: login_result(port, "app", "new password"))
        await serving.changed_and_reloaded(
            reloaded, lambda: admin.update_tenant(conn, "acme", networks=["127.0.0.0/8"]), "tenant"
        )
        inside = await run(lambda: login_result(port, "app", "new password"))
    stop.set()
    assert old[0] == 535 and new[0] == 235
    assert outside == (535, b"5.7.8 Authentication credentials invalid")
    assert inside[0] == 235


def pipelined_transaction(port: int, password: str) -> tuple[int, bytes]:
    """MAIL, RCPT and DATA sent in one go (PIPELINING); the first reply."""
    client = smtp.connect(port)
    try:
        smtp.login(client, "app", password)
        client.send("MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        return client.getreply()
    except smtplib.SMTPServerDisconnected:
        return 0, b"disconnected"
    finally:
        with contextlib.suppress(OSError):
            client.close()


def transaction(
    port: int, password: str, mail_from: str = "alice@example.com", data: bytes | None = None
) -> tuple[int, bytes]:
    """One session: the first refusal (code, text), or the DATA reply."""
    client = smtp.connect(port)
    try:
        smtp.login(client, "app", password)
        code, text = client.mail(mail_from)
        if code != 250:
            return code, text
        client.rcpt("bob@example.org")
        return client.data(data or smtp.message())
    except smtplib.SMTPServerDisconnected:
        return 0, b"disconnected"
    finally:
        with contextlib.suppress(OSError):
            client.close()


async def test_account_rate_limit(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """Over its rate an account gets 421 4.7.0 saying when to retry; the count is in
    Redis, so every instance shares it."""
    admin.update_account(conn, "app", rate_limit="2/h")
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    with trio.fail_after(60):
        results = [await run(lambda: transaction(port, PASSWORD)) for _ in range(3)]
        grouped = await run(lambda: pipelined_transaction(port, PASSWORD))
    stop.set()
    assert [r[0] for r in results] == [250, 250, 421]
    assert b"4.7.0" in results[2][1] and b"try again in" in results[2][1]
    # a client pipelining MAIL, RCPT and DATA gets the 421 too, before the close
    assert grouped[0] == 421 and b"4.7.0" in grouped[1]
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{key_prefix}:rate:*"))
    client.close()
    assert len(keys) == 1


async def test_monthly_quota_survives_restarts_and_rebuilds(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    conn: psycopg.Connection[Any],
    nursery: trio.Nursery,
) -> None:
    """A tenant at its monthly limit gets 452 4.7.1 at MAIL, also after a restart, and
    after its Redis counter is lost (rebuilt from PostgreSQL)."""
    admin.update_tenant(conn, "acme", monthly_limit=2)
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    with trio.fail_after(60):
        first = [await run(lambda: transaction(port, PASSWORD)) for _ in range(3)]
        stop.set()
        running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
        port = running.smtp[0][1]
        after_restart = await run(lambda: transaction(port, PASSWORD))
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{key_prefix}:quota:*"):
            client.delete(key)
        client.close()
        after_loss = await run(lambda: transaction(port, PASSWORD))
    stop.set()
    assert [r[0] for r in first] == [250, 250, 452]
    assert first[2][1].startswith(b"4.7.1")
    assert after_restart[0] == 452 and after_loss[0] == 452


async def test_backpressure(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """Past smtp.max_queue_depth undelivered messages, new transactions get 421 4.3.2
    and readiness says why."""
    running, stop = await start(
        nursery,
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        smtp={"max_queue_depth": 2},
        delivery={"enabled": False},
    )
    port = running.smtp[0][1]
    assert running.health is not None
    with trio.fail_after(60):
        sent = [await run(lambda: transaction(port, PASSWORD)) for _ in range(3)]
        # the backlog monitor notices the depth within its interval (later under load)
        while (busy := await run(lambda: transaction(port, PASSWORD)))[0] == 250:
            await trio.sleep(0.2)
        status, body = await run(lambda: serving.readiness(running.health[1]))
    stop.set()
    assert [r[0] for r in sent] == [250, 250, 250]
    assert busy[0] == 421 and busy[1].startswith(b"4.3.2")
    assert status == 503 and "queue" in body["failing"]


async def test_header_from_must_match_when_asked(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """With smtp.check_header_from the header From domain must be allowed too."""
    running, stop = await start(
        nursery, tmp_path, pg_url, redis_url, key_prefix, smtp={"check_header_from": True}
    )
    port = running.smtp[0][1]
    spoofed = smtp.message(sender="CEO <ceo@bank.example>")
    with trio.fail_after(30):
        bad = await run(lambda: transaction(port, PASSWORD, data=spoofed))
        good = await run(lambda: transaction(port, PASSWORD))
    stop.set()
    assert bad[0] == 550 and bad[1].startswith(b"5.7.1")
    assert good[0] == 250


async def test_implicit_tls_listener_and_session_log(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """smtp.tls_listen speaks TLS from the first byte and allows AUTH at once; every
    session ends with one log line naming client, account, ids and outcome."""
    with serving.log_records() as lines:
        running, stop = await start(
            nursery, tmp_path, pg_url, redis_url, key_prefix, smtp={"tls_listen": ["127.0.0.1:0"]}
        )
        tls_port = running.smtp[1][1]

        def over_tls() -> tuple[int, bytes]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", tls_port, context=smtp.insecure_context(), timeout=10
            ) as c:
                c.ehlo("c.test")
                assert c.has_extn("auth") and not c.has_extn("starttls")
                smtp.login(c, "app", PASSWORD)
                c.mail("alice@example.com")
                c.rcpt("bob@example.org")
                return c.data(smtp.message())

        with trio.fail_after(30):
            code, reply = await run(over_tls)
            mid = smtp.queued_id(reply)
            while not any(line.get("msg") == "SMTP session ended" for line in lines):
                await trio.sleep(0.05)
        stop.set()
    assert code == 250
    [session] = [line for line in lines if line.get("msg") == "SMTP session ended"]
    assert session["client_ip"] == "127.0.0.1" and session["account"] == "app"
    assert session["message_ids"] == [mid] and session["accepted"] == 1


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Path]]:
    a = generate_self_signed(tmp_path / "a", "first.test")
    b = generate_self_signed(tmp_path / "b", "second.test")
    yield (*a, *b)


def served_name(port: int) -> str:
    """The CN of the certificate the server presents after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("c.test")
        c.starttls(context=smtp.insecure_context())
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


async def test_sighup_reloads_the_certificate_without_dropping_sessions(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    certs: tuple[Path, Path, Path, Path],
) -> None:
    """After the certificate files are replaced and SIGHUP sent, new sessions get the new
    certificate, while a session opened before keeps working."""
    cert, key, new_cert, new_key = certs
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    config = write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "smtp": {
                "listen": ["127.0.0.1:0"],
                "tls_cert": str(live_cert),
                "tls_key": str(live_key),
            },
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "health": {"listen": ""},
        },
    )
    proc = SmtpProxyProcess(config)
    try:
        await run(proc.wait_ready)
        port = proc.smtp_port
        before = await run(lambda: served_name(port))
        open_session = smtplib.SMTP("127.0.0.1", port, timeout=10)
        open_session.ehlo("c.test")
        open_session.starttls(context=smtp.insecure_context())
        live_cert.write_bytes(new_cert.read_bytes())
        live_key.write_bytes(new_key.read_bytes())
        proc.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while "TLS certificate reloaded" not in " ".join(proc.messages()):
                await trio.sleep(0.05)
        after = await run(lambda: served_name(port))
        still = open_session.noop()
        open_session.close()
    finally:
        code = await run(proc.stop)
    assert (before, after) == ("first.test", "second.test")
    assert still[0] == 250
    assert code == 0


async def test_auth_failures_count_across_instances(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """Failed logins are counted in Redis: failures spread over two instances (or two
    smtp.reuse_port processes) lock the client out of both, as on one."""
    ports = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        running, _ = await start(
            nursery,
            tmp_path / name,
            pg_url,
            redis_url,
            key_prefix,
            smtp={"auth_max_failures": 3},
            delivery={"enabled": False},
        )
        ports.append(running.smtp[0][1])
    with trio.fail_after(60):
        failures = [
            await run(lambda port=port: login_result(port, "app", "wrong"))
            for port in (ports[0], ports[1], ports[0])
        ]
        after = [await run(lambda port=port: login_result(port, "app", PASSWORD)) for port in ports]
    assert [code for code, _ in failures] == [535, 535, 421]
    assert [code for code, _ in after] == [421, 421]


async def test_auth_failures_still_counted_without_redis(
    tmp_path: Path, pg_url: str, key_prefix: str, account: dict[str, Any], nursery: trio.Nursery
) -> None:
    """With Redis down the process counts failures itself: guessing is still throttled."""
    with RedisProcess(tmp_path / "redis") as redis_server:
        running, stop = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_server.url,
            key_prefix,
            smtp={"auth_max_failures": 3},
            delivery={"enabled": False},
            redis={"url": redis_server.url, "key_prefix": key_prefix, "socket_timeout": "1s"},
        )
        port = running.smtp[0][1]
        redis_server.kill()
        with trio.fail_after(60):
            failures = [await run(lambda: login_result(port, "app", "wrong")) for _ in range(3)]
            after = await run(lambda: login_result(port, "app", PASSWORD))
        stop.set()
    assert [code for code, _ in failures] == [535, 535, 421]
    assert after[0] == 421


async def test_parallel_guesses_are_held_back_without_redis_too(
    tmp_path: Path, pg_url: str, key_prefix: str, account: dict[str, Any], nursery: trio.Nursery
) -> None:
    """With Redis down, the process's own counters reserve each check as Redis does:
    20 guesses at once still get no more than auth_max_failures checks."""
    with RedisProcess(tmp_path / "redis") as redis_server:
        running, stop = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_server.url,
            key_prefix,
            smtp={"auth_max_failures": 3},
            delivery={"enabled": False},
            redis={"url": redis_server.url, "key_prefix": key_prefix, "socket_timeout": "1s"},
        )
        port = running.smtp[0][1]
        redis_server.kill()
        with trio.fail_after(120):
            codes = await run(lambda: guesses_at_once(port, 19, PASSWORD))
        stop.set()
    assert codes.count(235) == 0, codes
    assert codes.count(535) <= 2 and set(codes) <= {535, 421}, codes


def guesses_at_once(port: int, wrong: int, password: str, sessions: int = 0) -> list[int]:
    """Open TLS sessions from one address (sessions, or wrong + 1), then send AUTH on all
    of them without waiting for any answer: `wrong` wrong passwords first, then, once
    the first of them is answered (the server has read them all: the order in which it
    reads a burst of sessions is its own), the right one on the rest. Returns the AUTH
    reply codes in sending order."""
    clients = []
    try:
        for _ in range(sessions or wrong + 1):
            clients.append(smtp.connect(port, timeout=60))

        def auth(client: smtplib.SMTP, secret: str) -> None:
            blob = base64.b64encode(f"\0app\0{secret}".encode()).decode()
            client.send(f"AUTH PLAIN {blob}\r\n")

        for n, client in enumerate(clients[:wrong]):
            auth(client, f"wrong-{n}")
        codes = [clients[0].getreply()[0]] if wrong else []
        for client in clients[wrong:]:
            auth(client, password)
        return codes + [client.getreply()[0] for client in clients[1 if wrong else 0 :]]
    finally:
        for client in clients:
            client.close()


async def test_parallel_guesses_get_no_more_tries_than_serial_ones(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """60 AUTH attempts from one address at once (59 wrong, then the right password):
    no more than auth_max_failures passwords are checked, everything after is refused,
    the right password included, as when the guesses come one by one."""
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    with trio.fail_after(120):
        codes = await run(lambda: guesses_at_once(port, 59, PASSWORD))
    stop.set()
    assert codes.count(235) == 0, codes
    assert codes.count(535) <= 4, codes  # the 5th failure is answered 421 (locked)
    assert set(codes) <= {535, 421}, codes


async def test_many_right_logins_at_once_all_get_in(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """50 sessions from one address logging in at once with the right password (an
    application starting its connection pool) all get 235: attempts beyond the failure
    limit wait for the outcome of those being checked, they are not refused."""
    running, stop = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    port = running.smtp[0][1]
    with trio.fail_after(120):
        codes = await run(lambda: guesses_at_once(port, 0, PASSWORD, sessions=50))
    stop.set()
    assert codes == [235] * 50, codes
