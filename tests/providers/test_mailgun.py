"""Mailgun provider: the request builder, the response classifier, and send() over a real
socket to tests/support/fake_mailgun.py, which checks requests as Mailgun documents them.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import trio

from smtpproxy.delivery.providers import mailgun
from smtpproxy.delivery.providers.base import Delivery, ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.mailgun import (
    MailgunProvider,
    RequestError,
    build_request,
    classify,
)
from smtpproxy.models import OutcomeKind
from tests.support import fake_mailgun
from tests.support.deliveries import delivery, message, opened, wire
from tests.support.fake_mailgun import FakeMailgun, Part, validate
from tests.support.net import silent_server

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
DOMAIN = "mg.example.com"
BINARY = bytes(range(256)) * 4  # every byte value, CR and LF included


# ---------------------------------------------------------------------------- helpers


def spec(endpoint: str | None = None, secret: str | None = KEY, **settings: Any) -> ProviderSpec:
    return ProviderSpec(
        name="mg",
        type="mailgun",
        endpoint=endpoint,
        secret=secret,
        settings={"domain": DOMAIN, **settings},
    )


def provider(
    url: str, secret: str = KEY, **settings: Any
) -> AbstractAsyncContextManager[MailgunProvider]:
    return opened(MailgunProvider(spec(url, secret, **settings)))


def post(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("auth", ("api", KEY))
    return client.post(path, **kwargs)


MIME_PATH = f"/v3/{DOMAIN}/messages.mime"
GOOD_FILE = {"message": ("message.mime", wire(message()), "message/rfc822")}


# ---------------------------------------------------------------------------- the fake itself


def test_fake_accepts_a_valid_request_and_records_message_and_to() -> None:
    """A documented messages.mime request gets 200 "Queued. Thank you." and is recorded."""
    with (
        FakeMailgun(api_key=KEY, domains=(DOMAIN,)) as fake,
        httpx.Client(base_url=fake.url, timeout=10) as c,
    ):
        r = post(
            c,
            MIME_PATH,
            data={"to": ["bob@example.org", "Carol <carol@example.org>"]},
            files=GOOD_FILE,
        )
    assert r.status_code == 200
    assert r.json()["message"] == "Queued. Thank you."
    assert r.json()["id"].endswith(f"@{DOMAIN}>")
    [req] = fake.requests
    assert req.accepted
    assert req.domain == DOMAIN
    assert req.message == GOOD_FILE["message"][1]
    assert req.to == ["bob@example.org", "Carol <carol@example.org>"]


def _recipients(n: int) -> list[str]:
    return [f"r{i}@example.org" for i in range(n)]


REFUSED = [
    ("wrong-path", "/v3/mg.example.com/messages", {}, 404, "Not Found"),
    ("unknown-domain", "/v3/other.example.com/messages.mime", {}, 404, "Domain not found"),
    ("no-auth", MIME_PATH, {"auth": None}, 401, "Forbidden"),
    ("wrong-user", MIME_PATH, {"auth": ("user", KEY)}, 401, "Forbidden"),
    ("wrong-key", MIME_PATH, {"auth": ("api", "key-other")}, 401, "Forbidden"),
    (
        "urlencoded",
        MIME_PATH,
        {"data": {"to": "bob@example.org", "message": "x"}, "files": None},
        400,
        fake_mailgun.MSG_NOT_MULTIPART,
    ),
    ("no-to", MIME_PATH, {"data": {}}, 400, fake_mailgun.MSG_TO_MISSING),
    ("bad-to", MIME_PATH, {"data": {"to": "bob"}}, 400, fake_mailgun.MSG_TO_INVALID),
    (
        "1001-recipients",
        MIME_PATH,
        {"data": {"to": _recipients(1001)}},
        400,
        fake_mailgun.MSG_TOO_MANY_RECIPIENTS,
    ),
    (
        "no-message",
        MIME_PATH,
        {"data": {"to": "bob@example.org", "o:tag": "x"}, "files": {"other": ("a", b"x")}},
        400,
        fake_mailgun.MSG_MESSAGE_MISSING,
    ),
    (
        "message-not-a-file",
        MIME_PATH,
        {
            "data": {"to": "bob@example.org", "message": "From: a@b.c\r\n\r\nx"},
            "files": {"other": ("a", b"x")},
        },
        400,
        fake_mailgun.MSG_MESSAGE_NOT_FILE,
    ),
    (
        "tracking-enum",
        MIME_PATH,
        {"data": {"to": "bob@example.org", "o:tracking": "always"}},
        400,
        "is not one of",
    ),
    (
        "options-over-16kb",
        MIME_PATH,
        {"data": {"to": "bob@example.org", "v:blob": "x" * 16 * 1024}},
        400,
        fake_mailgun.MSG_OPTIONS_TOO_LARGE,
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "expected"),
    [c[1:] for c in REFUSED],
    ids=[c[0] for c in REFUSED],
)
def test_fake_refuses_what_mailgun_documents_as_invalid(
    path: str, kwargs: dict[str, Any], status: int, expected: str
) -> None:
    """The fake answers each documented refusal with Mailgun's status and words."""
    kwargs = {"data": {"to": "bob@example.org"}, "files": GOOD_FILE, **kwargs}
    if kwargs["files"] is None:
        del kwargs["files"]
    with (
        FakeMailgun(api_key=KEY, domains=(DOMAIN,)) as fake,
        httpx.Client(base_url=fake.url, timeout=10) as c,
    ):
        r = post(c, path, **kwargs)
    assert r.status_code == status
    assert expected in r.text
    [req] = fake.requests
    assert not req.valid
    assert any(expected in e for e in fake.errors), fake.errors


def test_fake_401_body_is_mailguns_plain_forbidden() -> None:
    """A wrong key gets exactly the body SPEC documents for 401: Forbidden."""
    with FakeMailgun(api_key=KEY) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        r = post(c, MIME_PATH, data={"to": "bob@example.org"}, files=GOOD_FILE, auth=("api", "x"))
    assert (r.status_code, r.text) == (401, "Forbidden")


def test_fake_refuses_requests_over_25_mib_with_413() -> None:
    """A request body over 25 MiB gets nginx's 413 before auth or fields are looked at."""
    big = b"x" * (fake_mailgun.MAX_REQUEST_BYTES + 1)
    with FakeMailgun(api_key=KEY) as fake, httpx.Client(base_url=fake.url, timeout=30) as c:
        r = c.post(MIME_PATH, content=big)
    assert r.status_code == 413
    assert b"413 Request Entity Too Large" in r.content
    assert fake.requests[0].status == 413


def test_fake_scripted_answers_are_used_in_order_for_valid_requests() -> None:
    """respond_with() answers go to valid requests only; then the default 200 returns."""
    with FakeMailgun(api_key=KEY) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        fake.respond_with(429, {"message": "slow down"}, {"Retry-After": "7"})
        assert post(c, MIME_PATH, data={}, files=GOOD_FILE).status_code == 400  # not used
        r = post(c, MIME_PATH, data={"to": "bob@example.org"}, files=GOOD_FILE)
        assert (r.status_code, r.headers["Retry-After"], r.json()) == (
            429,
            "7",
            {"message": "slow down"},
        )
        ids = {
            post(c, MIME_PATH, data={"to": "bob@example.org"}, files=GOOD_FILE).json()["id"]
            for _ in range(2)
        }
    assert len(ids) == 2
    assert [q.status for q in fake.requests] == [400, 429, 200, 200]


def test_fake_validate_reports_a_string_field_given_twice() -> None:
    """A SPEC string field sent twice is a type error, as the schema says."""
    msg = Part("message", "m.eml", "message/rfc822", b"x")
    fields = [("to", "bob@example.org"), ("o:dkim", "yes"), ("o:dkim", "no")]
    problems = validate(fields, [msg])
    assert any(p.startswith("o:dkim:") for p in problems), problems
    assert validate(fields[:2], [msg]) == []


# ---------------------------------------------------------------------------- build_request


def test_build_request_default_region_is_us() -> None:
    """Without a region, the URL is Mailgun's US host with the domain's messages.mime."""
    req = build_request(spec(), delivery(b"x"))
    assert req.url == f"https://api.mailgun.net/v3/{DOMAIN}/messages.mime"


def test_build_request_eu_region_uses_eu_host() -> None:
    """region "eu" sends to api.eu.mailgun.net."""
    req = build_request(spec(region="eu"), delivery(b"x"))
    assert req.url == f"https://api.eu.mailgun.net/v3/{DOMAIN}/messages.mime"


def test_build_request_endpoint_overrides_region() -> None:
    """spec.endpoint wins over the region's host (a trailing slash is harmless)."""
    req = build_request(spec("http://127.0.0.1:9/", region="eu"), delivery(b"x"))
    assert req.url == f"http://127.0.0.1:9/v3/{DOMAIN}/messages.mime"


def test_build_request_keeps_bytes_and_envelope_recipients() -> None:
    """The message is the delivery's bytes; `to` is the envelope, once per address."""
    raw = wire(message())
    req = build_request(
        spec(), delivery(raw, "Dave@example.org", "bob@example.org", "dave@EXAMPLE.org")
    )
    assert req.message is raw
    assert req.to == ("Dave@example.org", "bob@example.org")  # first spelling, in order
    assert "message=" not in repr(req)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"region": "ap"}, "region must be 'us' or 'eu'"),
        ({"domain": ""}, "'domain' is required"),
        ({"domain": "mg.example.com/../x"}, "not a domain name"),
        ({"timeout": "soon"}, "'timeout' must be a number"),
    ],
    ids=["region", "no-domain", "bad-domain", "bad-timeout"],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], words: str) -> None:
    """Unusable settings raise ProviderConfigError naming the setting."""
    with pytest.raises(ProviderConfigError, match=words):
        MailgunProvider(spec(**settings))


def test_type_declares_limits_settings_and_secret() -> None:
    """TYPE names mailgun, its 1000-recipient and 25 MB limits, and a required API key."""
    t = mailgun.TYPE
    assert (t.name, t.max_recipients, t.max_message_bytes) == ("mailgun", 1000, 25_000_000)
    assert t.secret == "API key"
    assert t.secret_required
    assert t.default_endpoint == "https://api.mailgun.net"
    assert set(t.settings) == {"domain", "region", "timeout", "max_connections"}
    assert t.settings["domain"].required
    t.validate(spec())
    with pytest.raises(ProviderConfigError, match="no setting 'from'"):
        t.validate(spec(**{"from": "x"}))
    with pytest.raises(ProviderConfigError, match="no API key stored"):
        t.validate(spec(secret=None))


def test_secret_is_not_in_reprs() -> None:
    """Neither the spec's nor the provider's repr shows the API key."""
    s = spec()
    p = MailgunProvider(s)
    assert KEY not in repr(s)
    assert KEY not in repr(p)


# ---------------------------------------------------------------------------- classify


def test_classify_200_is_delivered_with_mailguns_id() -> None:
    """200 is delivered, with the queued message's id as the provider message id."""
    text = json.dumps({"id": "<20240101.1@mg.example.com>", "message": "Queued. Thank you."})
    outcome = classify(200, httpx.Headers(), text)
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == "<20240101.1@mg.example.com>"


@pytest.mark.parametrize(
    ("status", "text", "words"),
    [
        (400, json.dumps({"message": fake_mailgun.MSG_TO_INVALID}), fake_mailgun.MSG_TO_INVALID),
        (401, "Forbidden", "Forbidden (check the API key and the region)"),
        (401, '"Forbidden"', "Forbidden (check the API key and the region)"),
        (404, json.dumps({"message": "Domain not found: x.org"}), "check the domain"),
        (413, fake_mailgun.NGINX_413.decode(), "413 Request Entity Too Large"),
    ],
    ids=["400", "401-text", "401-json-string", "404", "413"],
)
def test_classify_client_errors_are_permanent(status: int, text: str, words: str) -> None:
    """400, 401, 404 and 413 are permanent, with Mailgun's own words in the detail."""
    outcome = classify(status, httpx.Headers(), text)
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith(f"HTTP {status}: ")
    assert words in outcome.detail


def test_classify_429_waits_for_retry_after() -> None:
    """429 with Retry-After is a retry after that many seconds."""
    outcome = classify(429, httpx.Headers({"Retry-After": "7"}), '{"message": "slow"}')
    assert (outcome.kind, outcome.retry_after) == (OutcomeKind.RETRY, 7)


def test_classify_429_without_retry_after_reads_mailguns_message() -> None:
    """429 without Retry-After waits as long as SPEC's message says ("after 120 seconds")."""
    text = json.dumps(fake_mailgun._spec_example("429"))
    outcome = classify(429, httpx.Headers(), text)
    assert (outcome.kind, outcome.retry_after) == (OutcomeKind.RETRY, 120)
    assert "account-requests-per-sec limit exceeded" in outcome.detail


@pytest.mark.parametrize("status", [408, 500, 502, 503])
def test_classify_timeouts_and_server_errors_are_retried(status: int) -> None:
    """408 and 5xx are transient: retry."""
    outcome = classify(status, httpx.Headers(), '{"message": "Internal Server Error"}')
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith(f"HTTP {status}")


# ---------------------------------------------------------------------------- send() on a socket


def _email_package_8bit() -> bytes:
    m = message(subject="Grüße aus Köln", text="Grüße, Jörg! ☕\n")
    m.set_content("Grüße, Jörg! ☕\n", cte="8bit")
    m.add_attachment(BINARY, maintype="application", subtype="octet-stream", filename="b.bin")
    raw = wire(m)
    assert "Grüße, Jörg! ☕".encode() in raw  # 8-bit UTF-8, not re-encoded
    return raw


def _hand_made_oddities() -> bytes:
    return (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: odd\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"caf\xe9 \xff\x00 trailing space   \r\n"
        b"a bare LF line\nand a lone CR\r"
        b"\r\n--looks-like-a-boundary\r\n\r\n.\r\n..dot-stuffed?\r\n"
        b"no final line end"
    )


@pytest.mark.parametrize(
    "raw",
    [_email_package_8bit(), _hand_made_oddities()],
    ids=["8bit-utf8-with-binary-attachment", "hand-made-oddities"],
)
async def test_send_posts_the_exact_bytes_and_envelope(raw: bytes) -> None:
    """Mailgun receives the raw message byte for byte, the envelope as `to`, api:key auth."""
    d = delivery(raw, "bob@example.org", "carol@example.org")
    with FakeMailgun(api_key=KEY, domains=(DOMAIN,)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(d)
    assert fake.errors == []
    [req] = fake.requests
    assert (req.method, req.path) == ("POST", MIME_PATH)
    assert req.message == raw
    assert req.to == ["bob@example.org", "carol@example.org"]
    [part] = req.files
    assert (part.name, part.content_type) == ("message", "message/rfc822")
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == json.loads(req.response_body)["id"]


async def test_send_bcc_recipient_is_delivered_without_appearing_in_headers() -> None:
    """A Bcc recipient (only in the envelope) is a `to` field; the message never names it."""
    m = message(to="Bob <bob@example.org>")
    raw = wire(m)
    assert b"dave" not in raw
    with FakeMailgun(api_key=KEY, domains=(DOMAIN,)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(raw, "bob@example.org", "dave@example.org"))
    [req] = fake.requests
    assert req.accepted
    assert req.to == ["bob@example.org", "dave@example.org"]
    assert req.message == raw
    assert b"dave" not in req.raw.split(b'name="message"')[1]
    assert outcome.kind == OutcomeKind.DELIVERED


async def test_send_eu_region_setting_with_endpoint_still_posts_to_endpoint() -> None:
    """With an endpoint, the region setting does not redirect the request elsewhere."""
    with FakeMailgun(api_key=KEY, domains=(DOMAIN,)) as fake:
        async with provider(fake.url, region="eu") as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.DELIVERED
    assert len(fake.accepted) == 1


async def test_send_with_wrong_key_is_permanent_401_without_the_key() -> None:
    """A key Mailgun does not know: permanent, "Forbidden", and no key in the detail."""
    with FakeMailgun(api_key=KEY) as fake:
        async with provider(fake.url, secret="key-wrong-secret") as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("HTTP 401: Forbidden")
    assert "key-wrong-secret" not in outcome.detail
    assert [r.status for r in fake.requests] == [401]


async def test_send_unknown_domain_is_permanent_404() -> None:
    """A domain the account lacks: permanent, naming the domain check."""
    with FakeMailgun(api_key=KEY, domains=("other.example.com",)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert f"Domain not found: {DOMAIN}" in outcome.detail
    assert [r.status for r in fake.requests] == [404]


async def test_send_scripted_400_is_permanent_with_mailguns_message() -> None:
    """A 400 from Mailgun is permanent and carries Mailgun's message."""
    words = "Domain mg.example.com is not allowed to send: Free accounts are for test purposes"
    with FakeMailgun(api_key=KEY) as fake:
        fake.respond_with(400, {"message": words})
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail == f"HTTP 400: {words}"
    assert fake.requests[0].valid


async def test_send_scripted_429_with_retry_after_is_retry() -> None:
    """A 429 with Retry-After: 7 is a retry after 7 seconds."""
    with FakeMailgun(api_key=KEY) as fake:
        fake.respond_with(429, {"message": "too many requests"}, {"Retry-After": "7"})
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert (outcome.kind, outcome.retry_after) == (OutcomeKind.RETRY, 7)
    assert "too many requests" in outcome.detail


async def test_send_scripted_500_is_retry_then_next_send_goes_through() -> None:
    """A 500 is a retry, and the next send is delivered."""
    with FakeMailgun(api_key=KEY) as fake:
        fake.respond_with(500, {"message": "Internal Server Error"})
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                first = await p.send(delivery(wire(message())))
                second = await p.send(delivery(wire(message())))
    assert first.kind == OutcomeKind.RETRY
    assert first.detail == "HTTP 500: Internal Server Error"
    assert second.kind == OutcomeKind.DELIVERED
    assert [r.status for r in fake.requests] == [500, 200]


async def test_send_to_closed_port_is_retry_connection_error() -> None:
    """Nothing listening (connection refused): a retry with "connection error"."""
    with FakeMailgun(api_key=KEY) as gone:
        url = gone.url
    async with provider(url) as p:
        with trio.fail_after(10):
            outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith("connection error")


async def test_send_to_silent_server_times_out_as_retry() -> None:
    """A server that accepts but never answers: a retry with "timeout" after the setting."""
    async with silent_server() as (url, held), provider(url, timeout=0.5) as p:
        with trio.fail_after(5):
            outcome = await p.send(delivery(wire(message())))
    assert held
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith("timeout")


async def test_send_too_many_recipients_is_permanent_without_request() -> None:
    """1001 distinct recipients fail permanently and Mailgun is never called."""
    recipients = [f"r{i}@example.org" for i in range(1001)]
    with FakeMailgun(api_key=KEY) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message()), *recipients))
                at_limit = await p.send(delivery(wire(message()), *recipients[:1000]))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "more than 1000 recipients" in outcome.detail
    assert at_limit.kind == OutcomeKind.DELIVERED
    assert [len(r.to) for r in fake.requests] == [1000]


async def test_send_over_25_mb_is_permanent_without_request() -> None:
    """A message over Mailgun's 25 MB fails permanently without a request."""
    raw = wire(message())
    raw += b"x" * (mailgun.MAX_MESSAGE_BYTES + 1 - len(raw))
    with FakeMailgun(api_key=KEY) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(30):
                outcome = await p.send(delivery(raw))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "25 MB" in outcome.detail
    assert fake.requests == []


def test_build_request_refuses_empty_envelope() -> None:
    """A delivery with no recipients cannot be sent: RequestError."""
    d = Delivery("m", 1, 1, "a@example.com", (), b"x")
    with pytest.raises(RequestError, match="no recipients"):
        build_request(spec(), d)
