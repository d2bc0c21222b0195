"""SendGrid provider: the request builder against the documented Mail Send API, the
response classifier, and send() over a real socket to tests/support/fake_sendgrid.py.

Every request built here is also checked with the fake's validate(), so a passing test
proves the builder's output is a request SendGrid documents as valid.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from email.policy import SMTPUTF8
from typing import Any

import httpx
import pytest
import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderSpec
from smtpproxy.delivery.providers.sendgrid import (
    RequestError,
    SendGridProvider,
    build_request,
    classify,
)
from smtpproxy.models import OutcomeKind
from tests.support import fake_sendgrid
from tests.support.deliveries import delivery, message, opened, wire
from tests.support.fake_sendgrid import FakeSendGrid, validate
from tests.support.net import silent_server

KEY = "SG.test"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5f2d1c90000000049454e44ae426082"
)
BINARY = bytes(range(256)) * 4  # every byte value, CR and LF included


# ---------------------------------------------------------------------------- helpers


def build(d: Delivery) -> dict[str, Any]:
    """build_request() as SendGrid receives it (JSON round trip), checked by the fake."""
    body = json.loads(json.dumps(build_request(d), ensure_ascii=False))
    assert validate(body) == []
    return body


def emails(people: list[dict[str, str]]) -> list[str]:
    return [p["email"] for p in people]


def sendgrid(
    url: str, secret: str = KEY, **settings: Any
) -> AbstractAsyncContextManager[SendGridProvider]:
    return opened(
        SendGridProvider(
            ProviderSpec(name="sg", type="sendgrid", endpoint=url, secret=secret, settings=settings)
        )
    )


# ---------------------------------------------------------------------------- the fake itself

VALID: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "bob@example.org"}]}],
    "from": {"email": "alice@example.com"},
    "subject": "hi",
    "content": [{"type": "text/plain", "value": "hi"}],
}


def _recipients(n: int) -> list[dict[str, str]]:
    return [{"email": f"r{i}@example.org"} for i in range(n)]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return apply


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.pop(key)


F = fake_sendgrid
INVALID = [
    ("no-personalization", _set("personalizations", []), F.MSG_NO_PERSONALIZATION),
    ("empty-to", _set("personalizations.0.to", []), F.MSG_TO_REQUIRED),
    ("no-to", _set("personalizations.0", {"cc": [{"email": "c@example.org"}]}), "'to'"),
    (
        "1001-recipients",
        _set(
            "personalizations",
            [{"to": _recipients(1001)[:600]}, {"to": _recipients(1001)[600:]}],
        ),
        F.MSG_TOO_MANY_RECIPIENTS,
    ),
    (
        "duplicate-address-any-case",
        _set(
            "personalizations",
            [{"to": [{"email": "bob@example.org"}]}, {"to": [{"email": "BOB@example.org"}]}],
        ),
        "You have included BOB@example.org more than once",
    ),
    ("no-subject", _drop("subject"), F.MSG_SUBJECT_REQUIRED),
    ("empty-subject", _set("subject", ""), "should be non-empty"),
    ("no-content", _drop("content"), F.MSG_CONTENT_REQUIRED),
    ("empty-content", _set("content", []), F.MSG_CONTENT_EMPTY),
    (
        "html-before-text",
        _set(
            "content",
            [{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain", "value": "x"}],
        ),
        F.MSG_CONTENT_ORDER,
    ),
    ("reserved-header", _set("headers", {"dkim-signature": "v=1"}), "reserved keys"),
    ("header-not-string", _set("headers", {"X-Count": 3}), "must be strings"),
    ("header-key-space", _set("headers", {"X Bad": "1"}), "empty spaces"),
    ("header-dup-case", _set("headers", {"X-A": "1", "x-a": "2"}), "duplicate keys"),
    ("name-semicolon", _set("personalizations.0.to.0.name", "Doe; John"), F.MSG_NAME_CHARS),
    ("name-comma", _set("personalizations.0.to.0.name", "Doe, John"), F.MSG_NAME_CHARS),
    ("from-unicode", _set("from", {"email": "jörg@example.com"}), F.MSG_FROM_UNICODE),
    ("bad-email", _set("personalizations.0.to.0.email", "bob"), "is not a 'email'"),
    (
        "attachment-no-filename",
        _set("attachments", [{"content": "aGk="}]),
        "'filename' is a required property",
    ),
    (
        "attachment-empty",
        _set("attachments", [{"content": "", "filename": "a.txt"}]),
        "should be non-empty",
    ),
    (
        "attachment-not-base64",
        _set("attachments", [{"content": "not base64!", "filename": "a.txt"}]),
        F.MSG_ATTACHMENT_BASE64,
    ),
    (
        "attachment-disposition",
        _set("attachments", [{"content": "aGk=", "filename": "a", "disposition": "embed"}]),
        "is not one of ['inline', 'attachment']",
    ),
    ("custom-args-string", _set("custom_args", "x"), "is not of type 'object'"),
    ("custom-args-int", _set("custom_args", {"n": 1}), F.MSG_CUSTOM_ARGS_STRINGS),
    (
        "reply-to-both",
        lambda b: b.update(reply_to={"email": "a@example.com"}, reply_to_list=[]),
        F.MSG_REPLY_TO_BOTH,
    ),
]


def test_fake_accepts_minimal_request_and_specs_own_examples() -> None:
    """The fake's validate() accepts a minimal request and both examples in SendGrid's spec."""
    assert validate(VALID) == []
    body = F.SPEC["components"]["requestBodies"]["PostMailSend"]["content"]["application/json"]
    examples = [e["value"] for e in body["examples"].values()]
    assert len(examples) == 2
    for example in examples:
        assert validate(example) == []


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_fake_refuses_what_sendgrid_documents_as_invalid(
    mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """The fake's validate() reports each documented rule a request breaks, in SendGrid's words."""
    body = json.loads(json.dumps(VALID))
    mutate(body)
    errors = validate(body)
    assert any(expected in e for e in errors), errors


def test_fake_http_answers_like_sendgrid() -> None:
    """The fake answers 404/405/401/415/400/413 with SendGrid's error bodies and 202 by default."""
    with FakeSendGrid(api_key=KEY) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = c.post("/v3/mail/other", json=VALID, headers=auth)
        assert r.status_code == 404
        r = c.get("/v3/mail/send", headers=auth)
        assert r.status_code == 405
        r = c.post("/v3/mail/send", json=VALID)
        assert r.status_code == 401
        assert r.json() == {
            "errors": [{"field": None, "message": "authorization required", "help": None}]
        }
        r = c.post("/v3/mail/send", json=VALID, headers={"Authorization": "Bearer SG.other"})
        assert r.status_code == 401
        r = c.post("/v3/mail/send", content=b"{}", headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.post(
            "/v3/mail/send", content=b"{nope", headers={**auth, "Content-Type": "application/json"}
        )
        assert (r.status_code, r.json()["errors"][0]["message"]) == (400, "Bad Request")
        r = c.post("/v3/mail/send", json={**VALID, "subject": ""}, headers=auth)
        assert r.status_code == 400
        assert r.json()["errors"] == [
            {"message": "'' should be non-empty", "field": "subject", "help": None}
        ]
        big = b'{"x": "' + b"a" * fake_sendgrid.MAX_BODY_BYTES + b'"}'
        r = c.post(
            "/v3/mail/send", content=big, headers={**auth, "Content-Type": "application/json"}
        )
        assert r.status_code == 413
        r = c.post("/v3/mail/send", json=VALID, headers=auth)
        assert r.status_code == 202
        assert r.content == b""
        assert r.headers["X-Message-Id"]
    assert [q.status for q in fake.requests] == [404, 405, 401, 401, 415, 400, 400, 413, 202]
    assert [q.accepted for q in fake.requests] == [False] * 8 + [True]
    assert fake.requests[-1].body == VALID
    assert len(fake.errors) == 8


def test_fake_scripted_answers_are_used_in_order_for_valid_requests() -> None:
    """respond_with() answers queue for valid requests only; then the default 202 returns."""
    with FakeSendGrid(api_key=KEY) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        fake.respond_with(429, {"errors": [{"message": "too many"}]}, {"Retry-After": "7"})
        fake.respond_with(503)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v3/mail/send", json={}, headers=auth).status_code == 400  # not used
        r = c.post("/v3/mail/send", json=VALID, headers=auth)
        assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
        assert r.json() == {"errors": [{"message": "too many"}]}
        assert c.post("/v3/mail/send", json=VALID, headers=auth).status_code == 503
        ids = {c.post("/v3/mail/send", json=VALID, headers=auth).headers["X-Message-Id"]}
        ids.add(c.post("/v3/mail/send", json=VALID, headers=auth).headers["X-Message-Id"])
    assert len(ids) == 2  # a fresh id each time
    assert [q.status for q in fake.requests] == [400, 429, 503, 202, 202]


# ---------------------------------------------------------------------------- build_request


def test_from_display_name_and_reply_to() -> None:
    """From keeps its display name; a single Reply-To becomes reply_to with its name."""
    m = message(reply_to="Help Desk <help@example.com>")
    body = build(delivery(wire(m)))
    assert body["from"] == {"email": "alice@example.com", "name": "Alice Example"}
    assert body["reply_to"] == {"email": "help@example.com", "name": "Help Desk"}
    assert "reply_to_list" not in body


def test_non_ascii_from_name_is_decoded() -> None:
    """A non-ASCII From display name, RFC 2047 encoded on the wire, arrives decoded."""
    raw = wire(message(sender="Jörg Müller-Łukasz <joerg@example.com>"))
    assert b"=?utf-8?" in raw
    body = build(delivery(raw, mail_from="joerg@example.com"))
    assert body["from"] == {"email": "joerg@example.com", "name": "Jörg Müller-Łukasz"}


def test_several_reply_to_addresses_become_reply_to_list() -> None:
    """Two Reply-To addresses become reply_to_list, in order, and no reply_to."""
    m = message(reply_to="Help <help@example.com>, sales@example.com")
    body = build(delivery(wire(m)))
    assert body["reply_to_list"] == [
        {"email": "help@example.com", "name": "Help"},
        {"email": "sales@example.com"},
    ]
    assert "reply_to" not in body


def test_repeated_reply_to_address_is_sent_once() -> None:
    """A Reply-To that repeats an address still gives SendGrid a valid, single reply address."""
    m = message(reply_to="help@example.com, help@example.com")
    body = build(delivery(wire(m)))
    replies = body.get("reply_to_list") or [body["reply_to"]]
    assert emails(replies) == ["help@example.com"]


def test_to_and_cc_only_for_envelope_recipients_rest_is_bcc() -> None:
    """To/Cc keep header names but only envelope recipients; other envelope recipients are bcc."""
    m = message(
        to="Bob <bob@example.org>, Mallory <mallory@example.org>",
        cc="Carol <carol@example.org>, Trent <trent@example.org>",
    )
    body = build(delivery(wire(m), "bob@example.org", "carol@example.org", "dave@example.org"))
    assert body["personalizations"] == [
        {
            "to": [{"email": "bob@example.org", "name": "Bob"}],
            "cc": [{"email": "carol@example.org", "name": "Carol"}],
            "bcc": [{"email": "dave@example.org"}],
        }
    ]
    assert "mallory" not in json.dumps(body)
    assert "trent" not in json.dumps(body)


def test_envelope_matches_header_addresses_case_insensitively() -> None:
    """An envelope recipient spelled in another case still counts as the header's To address."""
    m = message(to="Bob <Bob@Example.ORG>")
    body = build(delivery(wire(m), "bob@example.org"))
    assert body["personalizations"] == [{"to": [{"email": "Bob@Example.ORG", "name": "Bob"}]}]


def test_bcc_header_addresses_never_appear_in_to_or_cc() -> None:
    """Bcc recipients get bcc only; a Bcc header is never passed on; off-envelope Bcc vanish."""
    m = message(bcc="Dave <dave@example.org>, eve@example.org")
    assert b"Bcc: " in wire(m)
    body = build(delivery(wire(m), "bob@example.org", "dave@example.org"))
    [p] = body["personalizations"]
    assert emails(p["to"]) == ["bob@example.org"]
    assert "cc" not in p
    assert emails(p["bcc"]) == ["dave@example.org"]
    assert "eve@" not in json.dumps(body)
    assert all(k.lower() != "bcc" for k in body.get("headers", {}))


@pytest.mark.parametrize(
    "to",
    [None, "list@example.org", "undisclosed-recipients:;"],
    ids=["no-to-header", "to-not-in-envelope", "empty-group"],
)
def test_no_header_to_in_envelope_gives_one_personalization_per_recipient(
    to: str | None,
) -> None:
    """When no To address is a recipient, each recipient gets a personalization of its own."""
    m = message(to=to, cc="carol@example.org")
    envelope = ("carol@example.org", "dave@example.org", "DAVE@example.org", "erin@example.org")
    body = build(delivery(wire(m), *envelope))
    assert [list(p) for p in body["personalizations"]] == [["to"]] * 3
    assert [[r["email"].lower() for r in p["to"]] for p in body["personalizations"]] == [
        ["carol@example.org"],
        ["dave@example.org"],
        ["erin@example.org"],
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        (b"=?iso-8859-1?q?caf=E9?= =?utf-8?b?4piV?=", "café☕"),
        (b"Re: =?utf-8?b?w6l0w6k=?= report", "Re: été report"),
    ],
    ids=["utf8-q", "two-charsets", "mixed-plain"],
)
def test_rfc2047_subject_is_decoded(header: bytes, expected: str) -> None:
    """An RFC 2047 encoded Subject reaches SendGrid as decoded text."""
    raw = wire(message(subject="placeholder"))
    raw = raw.replace(b"Subject: placeholder", b"Subject: " + header)
    assert build(delivery(raw))["subject"] == expected


def test_long_non_ascii_subject_folded_by_email_package_round_trips() -> None:
    """A long non-ASCII subject, folded into several encoded words, arrives whole and unfolded."""
    subject = "Überweisung für Rechnung Nr. 4711 - bitte prüfen und bestätigen, danke! " * 3
    subject = subject.strip()
    raw = wire(message(subject=subject))
    assert raw.count(b"=?utf-8?") > 1
    assert build(delivery(raw))["subject"] == subject


@pytest.mark.parametrize("subject", [None, ""], ids=["no-header", "empty-header"])
def test_missing_or_empty_subject_becomes_no_subject(subject: str | None) -> None:
    """SendGrid requires a subject: an absent or empty one is sent as "(no subject)"."""
    body = build(delivery(wire(message(subject=subject))))
    assert body["subject"] == "(no subject)"


@pytest.mark.parametrize("html_first", [False, True], ids=["text-first", "html-first"])
def test_alternative_content_is_text_then_html(html_first: bool) -> None:
    """multipart/alternative becomes content [text/plain, text/html], whatever the MIME order."""
    text, html = "Hello Bob,\nsee you.\n", "<p>Hello <b>Bob</b>,</p>\n"
    m = message()
    if html_first:
        m.set_content(html, subtype="html")
        m.add_alternative(text)
    else:
        m.set_content(text)
        m.add_alternative(html, subtype="html")
    assert m.get_content_type() == "multipart/alternative"
    body = build(delivery(wire(m)))
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["content"][0]["value"].replace("\r\n", "\n") == text
    assert body["content"][1]["value"].replace("\r\n", "\n") == html


def test_html_only_message_sends_html_content() -> None:
    """A single-part HTML message is sent as one text/html content block."""
    m = message()
    m.set_content("<p>only html</p>\n", subtype="html")
    body = build(delivery(wire(m)))
    assert [c["type"] for c in body["content"]] == ["text/html"]
    assert body["content"][0]["value"].strip() == "<p>only html</p>"


def test_attachments_round_trip_byte_exact() -> None:
    """Attachments arrive base64 encoded, byte-exact, with filename, type and disposition."""
    m = message(text="two files attached\n")
    m.add_attachment(BINARY, maintype="application", subtype="pdf", filename="report.pdf")
    csv = "name;city\nJörg;Köln\r\n".encode()
    m.add_attachment(csv, maintype="text", subtype="csv", filename="données.csv")
    body = build(delivery(wire(m)))
    assert [c["type"] for c in body["content"]] == ["text/plain"]
    atts = body["attachments"]
    assert [(a["filename"], a["type"], a["disposition"]) for a in atts] == [
        ("report.pdf", "application/pdf", "attachment"),
        ("données.csv", "text/csv", "attachment"),
    ]
    assert base64.b64decode(atts[0]["content"], validate=True) == BINARY
    assert base64.b64decode(atts[1]["content"], validate=True) == csv
    assert all("content_id" not in a for a in atts)


@pytest.mark.parametrize("with_disposition", [True, False], ids=["inline", "cid-only"])
def test_inline_image_in_related_gets_inline_disposition_and_content_id(
    with_disposition: bool,
) -> None:
    """A Content-ID image in multipart/related is inline with content_id lacking angle brackets."""
    m = message(text="see logo\n")
    m.add_alternative('<p><img src="cid:logo.1@example.com"></p>\n', subtype="html")
    html_part = m.get_payload()[1]
    html_part.add_related(PNG, "image", "png", cid="<logo.1@example.com>")
    [image] = [p for p in m.walk() if p.get_content_type() == "image/png"]
    assert image["Content-Disposition"] == "inline"
    if not with_disposition:
        del image["Content-Disposition"]
    body = build(delivery(wire(m)))
    [att] = body["attachments"]
    assert att["disposition"] == "inline"
    assert att["content_id"] == "logo.1@example.com"
    assert att["type"] == "image/png"
    assert att["filename"]
    assert base64.b64decode(att["content"], validate=True) == PNG
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert "cid:logo.1@example.com" in body["content"][1]["value"]


def test_custom_headers_kept_reserved_headers_dropped() -> None:
    """X-Mailer/X-Campaign/Message-ID pass; Received, DKIM-Signature, X-SG-ID, To... never do."""
    m = message(
        reply_to="help@example.com",
        cc="carol@example.org",
        headers=(
            ("Received", "from client.test by mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000"),
            ("DKIM-Signature", "v=1; a=rsa-sha256; d=example.com; s=s1; b=abc"),
            ("X-SG-ID", "forged"),
            ("x-sg-eid", "forged"),
            ("Message-ID", "<id-1@example.com>"),
            ("X-Mailer", "Thunderbird 115.0"),
            ("X-Campaign", "spring-2025"),
        ),
    )
    body = build(delivery(wire(m), "bob@example.org", "carol@example.org"))
    assert body["headers"] == {
        "Message-ID": "<id-1@example.com>",
        "X-Mailer": "Thunderbird 115.0",
        "X-Campaign": "spring-2025",
    }
    reserved = {h.lower() for h in fake_sendgrid.DOCS["limitations"]["reserved_headers"]}
    assert not {k.lower() for k in body["headers"]} & reserved


def test_duplicate_custom_header_keeps_the_first() -> None:
    """SendGrid refuses duplicate header keys: a repeated header keeps its first value."""
    m = message(headers=(("X-Campaign", "first"), ("X-Campaign", "second")))
    assert build(delivery(wire(m)))["headers"] == {"X-Campaign": "first"}


def test_duplicate_custom_header_in_another_case_keeps_the_first() -> None:
    """Header names are case-insensitive: X-Campaign then x-campaign keeps only the first."""
    m = message(headers=(("X-Campaign", "first"), ("x-campaign", "second")))
    assert build(delivery(wire(m)))["headers"] == {"X-Campaign": "first"}


def test_recipient_names_with_semicolon_or_comma_are_cleaned() -> None:
    """SendGrid refuses ';' and ',' in to/cc names: they are replaced, the rest is kept."""
    m = message(
        to='"Doe; John" <john@example.org>, "Smith, Ann" <ann@example.org>',
        cc='"Lee;Kim , Jr." <kim@example.org>',
    )
    envelope = ("john@example.org", "ann@example.org", "kim@example.org")
    [p] = build(delivery(wire(m), *envelope))["personalizations"]
    assert p["to"] == [
        {"email": "john@example.org", "name": "Doe John"},
        {"email": "ann@example.org", "name": "Smith Ann"},
    ]
    assert p["cc"] == [{"email": "kim@example.org", "name": "Lee Kim Jr."}]


def test_more_than_1000_recipients_raises_request_error() -> None:
    """1001 distinct recipients cannot go in one SendGrid request: RequestError."""
    recipients = [f"r{i}@example.org" for i in range(1001)]
    with pytest.raises(RequestError, match="1000"):
        build_request(delivery(wire(message(to="r0@example.org")), *recipients))


@pytest.mark.parametrize("to", [None, "r0@example.org"], ids=["one-each", "to-and-bcc"])
def test_exactly_1000_recipients_is_a_valid_request(to: str | None) -> None:
    """1000 recipients (plus a case-variant duplicate) fit in one valid request."""
    recipients = [f"r{i}@example.org" for i in range(1000)] + ["R1@EXAMPLE.ORG"]
    body = build(delivery(wire(message(to=to)), *recipients))
    kinds = ("to", "cc", "bcc")
    people = [r for p in body["personalizations"] for k in kinds for r in p.get(k, [])]
    assert len(people) == 1000


def test_non_ascii_from_address_raises_request_error() -> None:
    """SendGrid takes no Unicode from address: an SMTPUTF8 From raises RequestError."""
    m = message(sender="Jörg <jörg@example.com>")
    raw = m.as_bytes(policy=SMTPUTF8)
    assert "jörg@example.com".encode() in raw
    with pytest.raises(RequestError, match="non-ASCII"):
        build_request(delivery(raw, mail_from="joerg@example.com"))


def test_envelope_sender_is_from_when_header_missing() -> None:
    """Without a From header the envelope sender becomes SendGrid's from."""
    body = build(delivery(wire(message(sender=None)), mail_from="bounce@example.com"))
    assert body["from"] == {"email": "bounce@example.com"}


def test_custom_args_carry_smtpproxy_message_id() -> None:
    """custom_args is an object holding smtpproxy's message id (for event webhooks)."""
    assert build(delivery(wire(message())))["custom_args"] == {"smtpproxy_id": "msg-1"}


def test_forwarded_message_is_one_rfc822_attachment() -> None:
    """A forwarded message/rfc822 part is one attachment and never becomes the body."""
    outer = message(text="x")
    outer.set_content("<p>see the forwarded mail</p>\n", subtype="html")
    inner = message(sender="carol@example.net", to="dave@example.net", subject="orig")
    inner.set_content("inner text\n")
    outer.add_attachment(inner, filename="orig.eml")
    body = build(delivery(wire(outer)))
    assert [c["type"] for c in body["content"]] == ["text/html"]
    [att] = body.get("attachments", [None])
    assert att is not None
    assert (att["type"], att["filename"]) == ("message/rfc822", "orig.eml")
    data = base64.b64decode(att["content"])
    assert b"Subject: orig" in data
    assert b"inner text" in data


# ---------------------------------------------------------------------------- classify


def test_classify_202_is_delivered_with_x_message_id() -> None:
    """202 Accepted is delivered, with X-Message-Id as the provider message id."""
    outcome = classify(202, httpx.Headers({"X-Message-Id": "abc123"}), "")
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == "abc123"


def test_classify_400_is_permanent_with_error_messages() -> None:
    """400 is permanent and its detail holds every SendGrid error message."""
    text = json.dumps(
        {
            "errors": [
                {"message": fake_sendgrid.MSG_SUBJECT_REQUIRED, "field": "subject", "help": None},
                {"message": fake_sendgrid.MSG_NAME_CHARS, "field": "x", "help": None},
            ]
        }
    )
    outcome = classify(400, httpx.Headers({"Content-Type": "application/json"}), text)
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("HTTP 400")
    assert fake_sendgrid.MSG_SUBJECT_REQUIRED in outcome.detail
    assert fake_sendgrid.MSG_NAME_CHARS in outcome.detail


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, fake_sendgrid.MSG_AUTH_MISSING),
        (403, "access forbidden"),
        (413, fake_sendgrid.MSG_TOO_LARGE),
    ],
)
def test_classify_auth_and_size_errors_are_permanent(status: int, message: str) -> None:
    """401, 403 and 413 are permanent: retrying the same request cannot succeed."""
    text = json.dumps({"errors": [{"message": message, "field": None, "help": None}]})
    outcome = classify(status, httpx.Headers(), text)
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail == f"HTTP {status}: {message}"


def test_classify_429_with_retry_after() -> None:
    """429 with Retry-After is a retry after that many seconds."""
    outcome = classify(429, httpx.Headers({"Retry-After": "7"}), "")
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.retry_after == 7


def test_classify_429_with_ratelimit_reset_epoch() -> None:
    """429 with only X-RateLimit-Reset (epoch seconds) waits until that moment."""
    reset = int(time.time()) + 30
    outcome = classify(429, httpx.Headers({"X-RateLimit-Reset": str(reset)}), "")
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.retry_after is not None
    assert 28 <= outcome.retry_after <= 30


def test_classify_429_with_past_ratelimit_reset_never_waits_negative() -> None:
    """An X-RateLimit-Reset already past means retry now, not a negative wait."""
    outcome = classify(429, httpx.Headers({"X-RateLimit-Reset": str(int(time.time()) - 60)}), "")
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.retry_after == 0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_classify_server_errors_are_retried(status: int) -> None:
    """5xx answers are transient: retry."""
    outcome = classify(status, httpx.Headers(), '{"errors":[{"message":"internal server error"}]}')
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith(f"HTTP {status}")


# ---------------------------------------------------------------------------- send() on a socket


async def test_send_delivers_to_fake_with_bearer_key_and_valid_body() -> None:
    """send() posts a request the fake accepts, with the Bearer key, UTF-8 JSON and its id."""
    m = message(subject="Grüße", cc="Carol <carol@example.org>")
    m.add_attachment(BINARY, maintype="application", subtype="octet-stream", filename="b.bin")
    d = delivery(wire(m), "bob@example.org", "carol@example.org", "dave@example.org")
    with FakeSendGrid(api_key=KEY) as fake:
        async with sendgrid(fake.url) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(d)
    assert fake.errors == []
    [req] = fake.requests
    assert req.accepted
    assert (req.method, req.path) == ("POST", "/v3/mail/send")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert "Grüße".encode() in req.raw
    assert req.body == json.loads(json.dumps(build_request(d)))
    assert base64.b64decode(req.body["attachments"][0]["content"]) == BINARY
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == req.response_headers["X-Message-Id"]


async def test_send_with_wrong_key_is_permanent_401() -> None:
    """A key SendGrid does not know gives a permanent outcome naming HTTP 401."""
    with FakeSendGrid(api_key=KEY) as fake:
        async with sendgrid(fake.url, secret="SG.wrong") as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "HTTP 401" in outcome.detail
    assert fake_sendgrid.MSG_AUTH_INVALID in outcome.detail
    assert [r.status for r in fake.requests] == [401]
    assert "SG.wrong" not in outcome.detail


async def test_send_scripted_429_with_retry_after_is_retry() -> None:
    """A 429 with Retry-After: 7 from SendGrid is a retry after 7 seconds."""
    with FakeSendGrid(api_key=KEY) as fake:
        fake.respond_with(
            429, {"errors": [{"message": "too many requests", "field": None}]}, {"Retry-After": "7"}
        )
        async with sendgrid(fake.url) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.retry_after == 7
    assert "too many requests" in outcome.detail
    assert fake.requests[0].valid


async def test_send_scripted_503_is_retry() -> None:
    """A 503 from SendGrid is a retry, and the next send goes through."""
    with FakeSendGrid(api_key=KEY) as fake:
        fake.respond_with(503, "Service Unavailable")
        async with sendgrid(fake.url) as provider:
            with trio.fail_after(10):
                first = await provider.send(delivery(wire(message())))
                second = await provider.send(delivery(wire(message())))
    assert first.kind == OutcomeKind.RETRY
    assert first.detail.startswith("HTTP 503")
    assert second.kind == OutcomeKind.DELIVERED
    assert [r.status for r in fake.requests] == [503, 202]


async def test_send_unbuildable_message_is_permanent_without_request() -> None:
    """A message SendGrid cannot take fails permanently without any HTTP request."""
    raw = message(sender="jörg@example.com").as_bytes(policy=SMTPUTF8)
    with FakeSendGrid(api_key=KEY) as fake:
        async with sendgrid(fake.url) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery(raw))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "non-ASCII" in outcome.detail
    assert fake.requests == []


async def test_send_over_30_mb_is_permanent_without_request() -> None:
    """A request body over SendGrid's 30 MB limit fails permanently without a request."""
    m = message()
    m.add_attachment(
        os.urandom(23 * 1000 * 1000), maintype="application", subtype="zip", filename="big.zip"
    )
    raw = wire(m)
    with FakeSendGrid(api_key=KEY) as fake:
        async with sendgrid(fake.url) as provider:
            with trio.fail_after(60):
                outcome = await provider.send(delivery(raw))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "30 MB" in outcome.detail
    assert fake.requests == []


async def test_send_to_closed_port_is_retry_connection_error() -> None:
    """Nothing listening: a retry with "connection error"."""
    with FakeSendGrid(api_key=KEY) as gone:
        url = gone.url
    async with sendgrid(url) as provider:
        with trio.fail_after(10):
            outcome = await provider.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith("connection error")


async def test_send_to_silent_server_times_out_as_retry() -> None:
    """A server that accepts the connection but never answers: a retry with "timeout"."""
    async with silent_server() as (url, held), sendgrid(url, timeout=0.5) as provider:
        with trio.fail_after(5):
            started = trio.current_time()
            outcome = await provider.send(delivery(wire(message())))
            elapsed = trio.current_time() - started
    assert held  # the connection was accepted: this is a read timeout
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith("timeout")
    assert elapsed < 3


def test_raw_utf8_headers_become_text() -> None:
    """Raw UTF-8 in headers (an SMTPUTF8 client) arrives as text, not surrogate escapes."""
    raw = (
        "From: Zoë Ünal <zoe@example.com>\r\nTo: Jörg <bob@example.org>\r\n"
        "Subject: Grüße\r\nX-Note: naïve\r\n\r\nhi\r\n"
    ).encode()
    body = build_request(Delivery("m1", 1, 1, "zoe@example.com", ("bob@example.org",), raw))
    encoded = json.dumps(body, ensure_ascii=False).encode("utf-8")  # must not raise
    assert body["from"] == {"email": "zoe@example.com", "name": "Zoë Ünal"}
    assert body["personalizations"][0]["to"] == [{"email": "bob@example.org", "name": "Jörg"}]
    assert body["subject"] == "Grüße"
    assert body["headers"]["X-Note"] == "naïve"
    assert "Grüße".encode() in encoded
