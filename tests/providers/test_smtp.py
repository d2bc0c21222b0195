"""SMTP relay provider: settings, the pure transaction builder and classifier, and send()
over real sockets to tests/support/fake_smtp.py (stock aiosmtpd in a background thread).

Decision pinned here: a server that does not offer STARTTLS while tls = "starttls" is a
RETRY (nothing is sent, the password least of all), like Postfix's "encrypt" level.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.smtp import (
    MAX_RECIPIENTS,
    TYPE,
    Reply,
    RequestError,
    Settings,
    SmtpProvider,
    StartTlsNotOffered,
    Transcript,
    build_transaction,
    classify,
    connection_failure,
    parse_settings,
    queue_id,
    redact,
    stuff,
)
from smtpproxy.models import Outcome, OutcomeKind
from tests.support import deliveries
from tests.support.fake_smtp import HOST, FakeSmtp, silent_server
from tests.support.net import closed_port

USER = "relay-user"
PASSWORD = "s3cret-Pa55word"
LONG_LINE = b"x" * 998
BODY = (
    b"From: J\xc3\xb6rg <jorg@example.com>\r\n"
    b"To: bob@example.org, carol@example.org\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n"
    b"Message-ID: <exact-1@example.com>\r\n"
    b"X-Odd:    spaced   \r\n"
    b"X-Folded: first\r\n\tsecond\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"H\xc3\xa4llo \xe2\x9c\x93 \xf0\x9f\x93\xa8\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b".leading dot\r\n"
    b"\r\n"
    b"trailing space \r\n" + LONG_LINE + b"\r\n"
    b".\r\n"
    b"end\r\n"
)
PLAIN_BODY = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def delivery(
    body: bytes = PLAIN_BODY,
    *recipients: str,
    mail_from: str = "alice@example.com",
) -> Delivery:
    return deliveries.delivery(body, *recipients, mail_from=mail_from)


def make_spec(
    port: int | None = None,
    *,
    secret: str | None = None,
    endpoint: str | None = None,
    **settings: Any,
) -> ProviderSpec:
    base: dict[str, Any] = {"helo_name": "client.test", "timeout": 5}
    if port is not None:
        base.update(host=HOST, port=port)
    base.update(settings)
    return ProviderSpec(name="relay", type="smtp", settings=base, secret=secret, endpoint=endpoint)


@asynccontextmanager
async def open_provider(spec: ProviderSpec) -> AsyncIterator[SmtpProvider]:
    TYPE.validate(spec)
    provider = SmtpProvider(spec)
    try:
        yield provider
    finally:
        with trio.fail_after(10):
            await provider.aclose()


async def send_one(spec: ProviderSpec, d: Delivery, seconds: float = 10) -> Outcome:
    async with open_provider(spec) as provider:
        with trio.fail_after(seconds):
            return await provider.send(d)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    with FakeSmtp(tmp_path / "tls") as s:
        yield s


# ---------------------------------------------------------------------------- settings


def test_type() -> None:
    assert TYPE.name == "smtp"
    assert TYPE.secret == "password"
    assert not TYPE.secret_required
    assert TYPE.max_recipients == MAX_RECIPIENTS == 100
    with pytest.raises(ProviderConfigError, match="no setting 'hots'"):
        TYPE.validate(make_spec(25, hots="x"))


def test_settings_defaults() -> None:
    s = parse_settings(ProviderSpec("r", "smtp", {"host": "mail.example.net"}))
    assert s == Settings(host="mail.example.net", port=587)
    assert (s.tls, s.verify_tls, s.timeout, s.max_connections) == ("starttls", True, 30.0, 4)
    s = parse_settings(ProviderSpec("r", "smtp", {"host": "mx", "tls": "implicit"}))
    assert s.port == 465
    s = parse_settings(ProviderSpec("r", "smtp", {"host": "mx", "tls": "none"}))
    assert (s.port, s.tls) == (587, "none")
    s = parse_settings(
        ProviderSpec(
            "r", "smtp", {"host": "mx", "timeout": "2m", "port": "2525", "verify_tls": "false"}
        )
    )
    assert (s.timeout, s.port, s.verify_tls) == (120.0, 2525, False)


@pytest.mark.parametrize(
    ("endpoint", "settings", "expected"),
    [
        ("smtp://mail.example.net:2525", {}, ("mail.example.net", 2525, "starttls")),
        ("smtp://mail.example.net", {}, ("mail.example.net", 587, "starttls")),
        ("smtps://mail.example.net", {}, ("mail.example.net", 465, "implicit")),
        ("smtps://mail.example.net:4650", {}, ("mail.example.net", 4650, "implicit")),
        ("smtp://[::1]:25", {"tls": "none"}, ("::1", 25, "none")),
        ("smtp://a.example", {"host": "b.example", "port": 26}, ("b.example", 26, "starttls")),
    ],
)
def test_settings_from_endpoint(
    endpoint: str, settings: dict[str, Any], expected: tuple[str, int, str]
) -> None:
    s = parse_settings(ProviderSpec("r", "smtp", settings, endpoint=endpoint))
    assert (s.host, s.port, s.tls) == expected


@pytest.mark.parametrize(
    ("settings", "endpoint", "secret", "match"),
    [
        ({}, None, None, "'host' is required"),
        ({"host": "mx", "tls": "ssl"}, None, None, "'tls' must be"),
        ({"host": "mx", "port": 0}, None, None, "'port'"),
        ({"host": "mx", "port": True}, None, None, "'port'"),
        ({"host": "mx", "timeout": "soon"}, None, None, "'timeout'"),
        ({"host": "mx", "timeout": 0}, None, None, "'timeout' must be positive"),
        ({"host": "mx", "max_connections": 0}, None, None, "'max_connections'"),
        ({"host": "mx", "verify_tls": "maybe"}, None, None, "'verify_tls'"),
        ({"host": "mx", "helo_name": "a b"}, None, None, "'helo_name'"),
        ({"tls": "starttls"}, "smtps://mx", None, "smtps:// endpoint"),
        ({}, "http://mx", None, "endpoint must look like"),
        ({}, "smtp://user:pw@mx", None, "endpoint must look like"),
        ({"host": "mx"}, None, PASSWORD, "'username' is not set"),
        ({"host": "mx", "username": USER}, None, None, "no password stored"),
        ({"host": "mx", "username": USER, "tls": "none"}, None, PASSWORD, "clear text"),
        ({"host": "mx", "ca_file": "/nonexistent/ca.pem"}, None, None, "'ca_file'"),
    ],
)
def test_settings_refused(
    settings: dict[str, Any], endpoint: str | None, secret: str | None, match: str
) -> None:
    spec = ProviderSpec("r", "smtp", settings, endpoint=endpoint, secret=secret)
    with pytest.raises(ProviderConfigError, match=match) as info:
        SmtpProvider(spec)
    assert "pw@" not in str(info.value)
    assert PASSWORD not in str(info.value)


def test_plaintext_auth_when_allowed() -> None:
    spec = make_spec(25, tls="none", username=USER, allow_plaintext_auth=True, secret=PASSWORD)
    assert SmtpProvider(spec).settings.allow_plaintext_auth
    assert PASSWORD not in repr(spec)


# ---------------------------------------------------------------------------- pure parts


FEATURES = {"8bitmime": "", "smtputf8": "", "size": "1000", "pipelining": ""}


def test_stuff() -> None:
    assert stuff(b"a\r\n.\r\n..b\r\n.c\r\n") == b"a\r\n..\r\n...b\r\n..c\r\n.\r\n"
    assert stuff(b".first\r\nx.y\r\n") == b"..first\r\nx.y\r\n.\r\n"
    assert stuff(b"no final line end") == b"no final line end\r\n.\r\n"
    assert stuff(b"") == b"\r\n.\r\n"


def test_build_transaction_envelope_as_given() -> None:
    t = build_transaction(delivery(PLAIN_BODY, "Bob@Example.org", "c@example.org"), FEATURES)
    assert t.mail_arg == f"FROM:<alice@example.com> SIZE={len(PLAIN_BODY)}"
    assert t.rcpt_args == (
        ("Bob@Example.org", "TO:<Bob@Example.org>"),
        ("c@example.org", "TO:<c@example.org>"),
    )
    assert t.data == stuff(PLAIN_BODY)
    assert not t.smtputf8
    null = build_transaction(delivery(PLAIN_BODY, mail_from=""), None)
    assert null.mail_arg == "FROM:<>"  # no ESMTP: no parameters either


def test_build_transaction_8bit_and_utf8() -> None:
    body8 = b"Subject: hi\r\n\r\nh\xc3\xa4llo\r\n"
    t = build_transaction(delivery(body8), FEATURES)
    assert t.mail_arg == f"FROM:<alice@example.com> BODY=8BITMIME SIZE={len(body8)}"
    assert not t.smtputf8  # the headers are ASCII
    t = build_transaction(delivery(body8), {})
    assert t.mail_arg == "FROM:<alice@example.com>"  # sent unchanged, undeclared
    t = build_transaction(delivery(BODY), FEATURES | {"size": "0"})
    assert t.mail_arg.endswith(f"BODY=8BITMIME SIZE={len(BODY)} SMTPUTF8")
    assert t.smtputf8
    t = build_transaction(delivery(PLAIN_BODY, "jörg@例え.jp"), FEATURES)
    assert t.smtputf8
    assert t.mail_arg.endswith("SMTPUTF8")
    assert t.rcpt_args == (("jörg@例え.jp", "TO:<jörg@例え.jp>"),)
    with pytest.raises(RequestError, match="SMTPUTF8"):
        build_transaction(delivery(PLAIN_BODY, "jörg@example.org"), {"8bitmime": ""})


def test_build_transaction_refusals() -> None:
    with pytest.raises(RequestError, match="larger than the server's limit of 10 bytes"):
        build_transaction(delivery(PLAIN_BODY), {"size": "10"})
    for bad in ("a@b\r\nRCPT TO:<x@y>", "a\x00@b", "<a@b>"):
        with pytest.raises(RequestError, match="invalid envelope address"):
            build_transaction(delivery(PLAIN_BODY, bad), FEATURES)
    with pytest.raises(RequestError, match="invalid envelope address"):
        build_transaction(delivery(PLAIN_BODY, mail_from="a@b\n"), FEATURES)


def test_queue_id() -> None:
    assert queue_id(Reply(250, "2.0.0 Ok: queued as 4Xk2Bq1Zz9z")) == "4Xk2Bq1Zz9z"
    assert queue_id(Reply(250, "Queued as <ABC-123>")) == "ABC-123"
    assert queue_id(Reply(250, "OK id=1qXyZa-0001Ab-Cd")) == "1qXyZa-0001Ab-Cd"
    assert queue_id(Reply(250, "2.0.0 Ok 0100018f-abc")) == "2.0.0 Ok 0100018f-abc"
    assert queue_id(Reply(250, "")) == "250"
    assert Reply.of(250, b"first\nsecond  line") == Reply(250, "first second line")


OK = Reply(250, "2.1.0 OK")
QUEUED = Reply(250, "2.0.0 Ok: queued as ABC123")
R450 = Reply(450, "4.2.1 mailbox busy")
R550 = Reply(550, "5.1.1 no such user")


@pytest.mark.parametrize(
    ("transcript", "kind", "detail_has"),
    [
        (Transcript(Reply(451, "4.3.0 try later")), OutcomeKind.RETRY, "MAIL FROM: 451"),
        (Transcript(Reply(553, "5.7.1 sender refused")), OutcomeKind.PERMANENT, "MAIL FROM: 553"),
        (Transcript(Reply(-1, "garbage")), OutcomeKind.RETRY, "bad reply"),
        (Transcript(OK, (("a@x", R450), ("b@x", R450))), OutcomeKind.RETRY, "every recipient"),
        (Transcript(OK, (("a@x", R550), ("b@x", R550))), OutcomeKind.PERMANENT, "a@x (550"),
        (Transcript(OK, (("a@x", R550), ("b@x", R450))), OutcomeKind.RETRY, "b@x (450"),
        (
            Transcript(OK, (("a@x", OK),), Reply(554, "5.6.0 no")),
            OutcomeKind.PERMANENT,
            "DATA: 554",
        ),
        (Transcript(OK, (("a@x", OK),), Reply(451, "4.3.0 x")), OutcomeKind.RETRY, "DATA: 451"),
        (
            Transcript(OK, (("a@x", OK),), Reply(554, "5.6.0"), data_sent=True),
            OutcomeKind.PERMANENT,
            "DATA: 554",
        ),
        (
            Transcript(OK, (("a@x", OK),), Reply(452, "4.3.1 full"), data_sent=True),
            OutcomeKind.RETRY,
            "DATA: 452",
        ),
        (Transcript(OK, (("a@x", OK),), None), OutcomeKind.RETRY, "DATA: no reply"),
        (Transcript(OK, (("a@x", OK),), OK), OutcomeKind.RETRY, "DATA: 250"),  # no 354
    ],
)
def test_classify_failures(transcript: Transcript, kind: OutcomeKind, detail_has: str) -> None:
    outcome = classify(transcript)
    assert outcome.kind == kind
    assert detail_has in outcome.detail
    assert outcome.deferred == outcome.rejected == ()


def test_classify_delivered() -> None:
    outcome = classify(Transcript(OK, (("a@x", OK),), QUEUED, data_sent=True))
    assert outcome == Outcome.delivered("ABC123", "250 2.0.0 Ok: queued as ABC123")
    partial = classify(
        Transcript(
            OK,
            (("a@x", OK), ("b@x", R450), ("c@x", R550), ("d@x", Reply(421, "4.4.2 bye"))),
            Reply(250, "2.0.0 accepted"),
            data_sent=True,
        )
    )
    assert partial.kind == OutcomeKind.DELIVERED
    assert partial.provider_message_id == "2.0.0 accepted"
    assert partial.deferred == ("b@x", "d@x")
    assert partial.rejected == ("c@x",)
    assert "deferred: b@x (450 4.2.1 mailbox busy)" in partial.detail
    assert "rejected: c@x (550 5.1.1 no such user)" in partial.detail


SETTINGS = Settings(host="mx.example", port=587, username=USER)


def test_connection_failures() -> None:
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate"
    outcome = connection_failure(cert, "STARTTLS", SETTINGS)
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "self-signed certificate" in outcome.detail
    assert "ca_file" in outcome.detail
    assert "configuration" in outcome.detail
    auth = smtplib.SMTPAuthenticationError(535, b"5.7.8 Authentication credentials invalid")
    outcome = connection_failure(auth, "AUTH", SETTINGS)
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "relay-user" in outcome.detail
    assert "535 5.7.8" in outcome.detail
    auth = smtplib.SMTPAuthenticationError(454, b"4.7.0 temporary failure")
    assert connection_failure(auth, "AUTH", SETTINGS).kind == OutcomeKind.RETRY
    no_auth = smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    assert connection_failure(no_auth, "AUTH", SETTINGS).kind == OutcomeKind.PERMANENT
    retry = [
        (ConnectionRefusedError(111, "Connection refused"), "connect", "cannot connect"),
        (TimeoutError("timed out"), "connect", "timed out during connect"),
        (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), "RCPT TO", "closed"),
        (smtplib.SMTPConnectError(421, b"busy"), "connect", "connect: 421 busy"),
        (smtplib.SMTPResponseException(454, b"TLS not available"), "STARTTLS", "454"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER]"), "connect", "TLS handshake failed"),
        (StartTlsNotOffered("x"), "STARTTLS", "does not offer STARTTLS"),
    ]
    for exc, stage, text in retry:
        outcome = connection_failure(exc, stage, SETTINGS)
        assert outcome.kind == OutcomeKind.RETRY, exc
        assert text in outcome.detail, outcome.detail
        assert outcome.detail.startswith("mx.example:587")
    late = connection_failure(TimeoutError("timed out"), "DATA", SETTINGS, sent_data=True)
    assert "final '.'" in late.detail


def test_redact() -> None:
    outcome = Outcome.permanent(f"echo {PASSWORD} and czNjcmV0LVBhNTV3b3Jk")
    assert redact(outcome, PASSWORD).detail == "echo *** and ***"
    assert redact(outcome, None) is outcome
    clean = Outcome.retry("nothing secret")
    assert redact(clean, PASSWORD) is clean


# ---------------------------------------------------------------------------- over sockets


async def test_exact_bytes_and_envelope(server: FakeSmtp) -> None:
    d = delivery(BODY, "bob@example.org", "Carol@Example.org")
    outcome = await send_one(make_spec(server.port, verify_tls=False), d)
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    assert outcome.provider_message_id == "Q0001"
    assert outcome.detail == "250 2.0.0 Ok: queued as Q0001"
    [got] = server.received
    assert got.content == BODY
    assert LONG_LINE + b"\r\n" in got.content
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org", "Carol@Example.org"]
    assert got.mail_options == ["BODY=8BITMIME", f"SIZE={len(BODY)}", "SMTPUTF8"]
    assert got.tls
    assert got.helo == "client.test"
    assert got.login is None


async def test_null_sender_and_utf8_address(server: FakeSmtp) -> None:
    d = delivery(PLAIN_BODY, "jörg@example.org", mail_from="")
    outcome = await send_one(make_spec(server.port, verify_tls=False), d)
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    [got] = server.received
    assert got.mail_from == "<>"
    assert got.rcpt_tos == ["jörg@example.org"]
    assert "SMTPUTF8" in got.mail_options
    assert got.content == PLAIN_BODY


async def test_starttls_verified_with_ca_file(server: FakeSmtp) -> None:
    spec = make_spec(server.port, ca_file=str(server.cert_file))
    outcome = await send_one(spec, delivery())
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    assert server.received[0].tls


async def test_starttls_unverifiable_is_permanent(server: FakeSmtp) -> None:
    outcome = await send_one(make_spec(server.port), delivery())
    assert outcome.kind == OutcomeKind.PERMANENT, outcome
    assert "certificate verification failed" in outcome.detail
    assert "ca_file" in outcome.detail
    assert server.received == []


async def test_certificate_for_another_name_is_permanent(tmp_path: Path) -> None:
    with FakeSmtp(tmp_path, cert_names=("other.test",)) as s:
        spec = make_spec(s.port, ca_file=str(s.cert_file))
        outcome = await send_one(spec, delivery())
        assert outcome.kind == OutcomeKind.PERMANENT, outcome
        assert "mismatch" in outcome.detail
        assert s.received == []


async def test_implicit_tls(tmp_path: Path) -> None:
    with FakeSmtp(tmp_path, starttls=False, implicit_tls=True, credentials=(USER, PASSWORD)) as s:
        spec = ProviderSpec(
            "relay",
            "smtp",
            {"ca_file": str(s.cert_file), "username": USER, "timeout": 5},
            endpoint=f"smtps://{HOST}:{s.tls_port}",
            secret=PASSWORD,
        )
        outcome = await send_one(spec, delivery())
        assert outcome.kind == OutcomeKind.DELIVERED, outcome
        [got] = s.received
        assert got.tls
        assert got.login == USER
        # SMTPS spoken to the plain port: the handshake fails, worth another try
        outcome = await send_one(make_spec(s.port, tls="implicit", verify_tls=False), delivery())
        assert outcome.kind == OutcomeKind.RETRY, outcome
        assert "TLS handshake failed" in outcome.detail


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth(tmp_path: Path, mechanism: str) -> None:
    with FakeSmtp(tmp_path, credentials=(USER, PASSWORD), mechanisms=(mechanism,)) as s:
        spec = make_spec(s.port, verify_tls=False, username=USER, secret=PASSWORD)
        outcome = await send_one(spec, delivery())
        assert outcome.kind == OutcomeKind.DELIVERED, outcome
        assert s.auth_attempts == [(mechanism, USER, True)]
        assert s.received[0].login == USER


async def test_wrong_password_is_permanent(tmp_path: Path) -> None:
    with FakeSmtp(tmp_path, credentials=(USER, "the-right-one")) as s:
        spec = make_spec(s.port, verify_tls=False, username=USER, secret=PASSWORD)
        outcome = await send_one(spec, delivery())
        assert outcome.kind == OutcomeKind.PERMANENT, outcome
        assert "535" in outcome.detail
        assert USER in outcome.detail
        assert PASSWORD not in outcome.detail
        assert PASSWORD not in repr(outcome)
        assert s.auth_attempts and all(not ok for _, _, ok in s.auth_attempts)
        assert s.received == []


async def test_no_starttls_offered_is_retry(tmp_path: Path) -> None:
    with FakeSmtp(tmp_path, starttls=False, credentials=(USER, PASSWORD)) as s:
        spec = make_spec(s.port, username=USER, secret=PASSWORD)
        outcome = await send_one(spec, delivery())
        assert outcome.kind == OutcomeKind.RETRY, outcome
        assert "does not offer STARTTLS" in outcome.detail
        assert s.auth_attempts == []  # the password never went out
        assert s.received == []
        # tls = "none" is the explicit way to talk to such a server
        outcome = await send_one(make_spec(s.port, tls="none"), delivery())
        assert outcome.kind == OutcomeKind.DELIVERED, outcome
        assert not s.received[0].tls


async def test_recipient_refusals(server: FakeSmtp) -> None:
    server.script.rcpt_replies = {
        "gone@example.org": "550 5.1.1 no such user",
        "busy@example.org": "450 4.2.1 mailbox busy",
    }
    d = delivery(PLAIN_BODY, "gone@example.org", "bob@example.org", "busy@example.org")
    outcome = await send_one(make_spec(server.port, verify_tls=False), d)
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    assert outcome.rejected == ("gone@example.org",)
    assert outcome.deferred == ("busy@example.org",)
    assert outcome.provider_message_id == "Q0001"
    assert "550 5.1.1 no such user" in outcome.detail
    assert server.received[0].rcpt_tos == ["bob@example.org"]


async def test_every_recipient_refused(server: FakeSmtp) -> None:
    server.script.rcpt_replies = {
        "a@example.org": "450 4.2.1 busy",
        "b@example.org": "451 4.3.0 later",
        "c@example.org": "550 5.1.1 unknown",
    }
    spec = make_spec(server.port, verify_tls=False)
    async with open_provider(spec) as provider:
        with trio.fail_after(10):
            retry = await provider.send(delivery(PLAIN_BODY, "a@example.org", "b@example.org"))
            mixed = await provider.send(delivery(PLAIN_BODY, "a@example.org", "c@example.org"))
            permanent = await provider.send(delivery(PLAIN_BODY, "c@example.org"))
    assert retry.kind == OutcomeKind.RETRY, retry
    assert mixed.kind == OutcomeKind.RETRY, mixed
    assert permanent.kind == OutcomeKind.PERMANENT, permanent
    assert server.received == []
    assert server.connections == 1  # RSET after each, and the connection kept


@pytest.mark.parametrize(
    ("where", "reply", "kind"),
    [
        ("mail", "451 4.3.0 try again later", OutcomeKind.RETRY),
        ("mail", "550 5.7.1 sender refused", OutcomeKind.PERMANENT),
        ("data", "554 5.6.0 message refused", OutcomeKind.PERMANENT),
        ("data", "452 4.3.1 insufficient storage", OutcomeKind.RETRY),
    ],
)
async def test_mail_and_data_replies(
    server: FakeSmtp, where: str, reply: str, kind: OutcomeKind
) -> None:
    setattr(server.script, f"{where}_reply", reply)
    spec = make_spec(server.port, verify_tls=False)
    async with open_provider(spec) as provider:
        with trio.fail_after(10):
            outcome = await provider.send(delivery())
            assert outcome.kind == kind, outcome
            assert reply in outcome.detail
            assert outcome.detail.startswith("MAIL FROM:" if where == "mail" else "DATA:")
            setattr(server.script, f"{where}_reply", None)
            again = await provider.send(delivery())
    assert again.kind == OutcomeKind.DELIVERED, again
    assert server.connections == 1


async def test_larger_than_server_size_is_permanent(tmp_path: Path) -> None:
    with FakeSmtp(tmp_path, data_size_limit=100) as s:
        spec = make_spec(s.port, verify_tls=False)
        async with open_provider(spec) as provider:
            with trio.fail_after(10):
                big = await provider.send(delivery(PLAIN_BODY + b"x" * 200 + b"\r\n"))
                small = await provider.send(delivery())
        assert big.kind == OutcomeKind.PERMANENT, big
        assert "limit of 100 bytes" in big.detail
        assert small.kind == OutcomeKind.DELIVERED, small
        assert len(s.received) == 1
        assert s.connections == 1


async def test_connection_refused_is_retry() -> None:
    outcome = await send_one(make_spec(closed_port(), verify_tls=False), delivery())
    assert outcome.kind == OutcomeKind.RETRY, outcome
    assert "cannot connect" in outcome.detail


async def test_silent_server_times_out() -> None:
    with silent_server() as port:
        spec = make_spec(port, verify_tls=False, timeout=0.5)
        start = trio.current_time()
        outcome = await send_one(spec, delivery(), seconds=5)
    assert outcome.kind == OutcomeKind.RETRY, outcome
    assert "timed out" in outcome.detail
    assert trio.current_time() - start < 4


async def test_hang_after_data_is_retry(server: FakeSmtp) -> None:
    server.script.hang.add("DATA")
    spec = make_spec(server.port, verify_tls=False, timeout=0.5)
    outcome = await send_one(spec, delivery(), seconds=5)
    assert outcome.kind == OutcomeKind.RETRY, outcome
    assert "timed out waiting for the reply to the final '.'" in outcome.detail


async def test_connection_reused(server: FakeSmtp) -> None:
    spec = make_spec(server.port, verify_tls=False)
    async with open_provider(spec) as provider:
        with trio.fail_after(10):
            first = await provider.send(delivery(PLAIN_BODY, "a@example.org"))
            second = await provider.send(delivery(BODY, "b@example.org"))
    assert (first.kind, second.kind) == (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED)
    assert server.connections == 1
    assert [r.connection for r in server.received] == [1, 1]
    assert [r.content for r in server.received] == [PLAIN_BODY, BODY]
    assert [r.rcpt_tos for r in server.received] == [["a@example.org"], ["b@example.org"]]


async def test_connection_closed_by_server_is_replaced(server: FakeSmtp) -> None:
    spec = make_spec(server.port, verify_tls=False)
    async with open_provider(spec) as provider:
        with trio.fail_after(10):
            first = await provider.send(delivery())
            await trio.to_thread.run_sync(server.drop_connections)
            second = await provider.send(delivery())
    assert first.kind == second.kind == OutcomeKind.DELIVERED, (first, second)
    assert server.connections == 2
    assert [r.connection for r in server.received] == [1, 2]


async def test_pool_is_bounded(server: FakeSmtp) -> None:
    spec = make_spec(server.port, verify_tls=False, max_connections=2)
    outcomes: list[Outcome] = []
    async with open_provider(spec) as provider:

        async def one(i: int) -> None:
            outcomes.append(await provider.send(delivery(PLAIN_BODY, f"r{i}@example.org")))

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
    assert [o.kind for o in outcomes] == [OutcomeKind.DELIVERED] * 6
    assert 1 <= server.connections <= 2
    assert sorted(r.rcpt_tos[0] for r in server.received) == [f"r{i}@example.org" for i in range(6)]


async def test_aclose_then_send(server: FakeSmtp) -> None:
    provider = SmtpProvider(make_spec(server.port, verify_tls=False))
    with trio.fail_after(10):
        assert (await provider.send(delivery())).kind == OutcomeKind.DELIVERED
        await provider.aclose()
        outcome = await provider.send(delivery())
        await provider.aclose()  # twice is fine
    assert outcome.kind == OutcomeKind.RETRY
    assert "shutting down" in outcome.detail
