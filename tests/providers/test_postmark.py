"""Postmark provider: the request builder against the documented Email API, the response
classifier, and send() over a real socket to tests/support/fake_postmark.py.

Every request built here is also checked with the fake's validate(), so a passing test
proves the builder's output is a request Postmark documents as valid.
"""

from __future__ import annotations

import base64
import email.header
import email.utils
import functools
import json
import os
from contextlib import AbstractAsyncContextManager
from email.message import EmailMessage
from email.policy import SMTPUTF8
from typing import Any

import httpx
import pytest
import trio

from smtpproxy.delivery.providers import postmark
from smtpproxy.delivery.providers.base import Delivery, ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.postmark import (
    PostmarkProvider,
    RequestError,
    build_request,
    classify,
    combine,
)
from smtpproxy.models import Outcome, OutcomeKind
from tests.support import deliveries, fake_postmark
from tests.support.deliveries import message, opened, wire
from tests.support.fake_postmark import FakePostmark, validate
from tests.support.net import silent_server

TOKEN = "2f1c3a4e-0000-4000-8000-postmarktest"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5f2d1c90000000049454e44ae426082"
)
BINARY = bytes(range(256)) * 4  # every byte value, CR and LF included


# ---------------------------------------------------------------------------- helpers


delivery = functools.partial(deliveries.delivery, message_id="01J0000000ABCDEFGHJKMNPQRS")


def build_all(d: Delivery, **kwargs: Any) -> list[dict[str, Any]]:
    """build_request() bodies as Postmark receives them, each checked by the fake."""
    bodies = [
        json.loads(json.dumps(r.body, ensure_ascii=False)) for r in build_request(d, **kwargs)
    ]
    for body in bodies:
        assert validate(body) == []
    return bodies


def build(d: Delivery, **kwargs: Any) -> dict[str, Any]:
    [body] = build_all(d, **kwargs)
    return body


def spec(endpoint: str | None = None, secret: str | None = TOKEN, **settings: Any) -> ProviderSpec:
    return ProviderSpec(
        name="pm", type="postmark", endpoint=endpoint, secret=secret, settings=settings
    )


def provider(
    url: str, secret: str = TOKEN, **settings: Any
) -> AbstractAsyncContextManager[PostmarkProvider]:
    return opened(PostmarkProvider(spec(url, secret, **settings)))


def decoded_name(address: str) -> tuple[str, str]:
    """(display name, addr-spec) of a formatted address, RFC 2047 words decoded."""
    [(name, addr)] = email.utils.getaddresses([address])
    return str(email.header.make_header(email.header.decode_header(name))), addr


HEADERS = {
    "X-Postmark-Server-Token": TOKEN,
    "Accept": "application/json",
    "Content-Type": "application/json",
}
VALID: dict[str, Any] = {"From": "alice@example.com", "To": "bob@example.org", "TextBody": "hi"}


# ---------------------------------------------------------------------------- the fake itself


def test_fake_accepts_a_minimal_request_and_answers_like_postmark() -> None:
    """A minimal documented request gets 200 with To, SubmittedAt, MessageID, ErrorCode 0."""
    assert validate(VALID) == []
    with FakePostmark(TOKEN) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        r = c.post("/email", json=VALID, headers=HEADERS)
    assert r.status_code == 200
    answer = r.json()
    assert set(answer) == {"To", "SubmittedAt", "MessageID", "ErrorCode", "Message"}
    assert (answer["To"], answer["ErrorCode"], answer["Message"]) == ("bob@example.org", 0, "OK")
    [req] = fake.requests
    assert req.accepted
    assert req.body == VALID


def _with(**fields: Any) -> dict[str, Any]:
    return {**VALID, **fields}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != key}


def _many(n: int) -> str:
    return ", ".join(f"r{i}@example.org" for i in range(n))


INVALID = [
    ("no-from", _without("From"), 300, "'From' is a required property"),
    ("no-to", _without("To"), 300, "'To' is a required property"),
    ("no-body", _without("TextBody"), 300, fake_postmark.MSG_NO_BODY),
    ("empty-bodies", _with(TextBody="", HtmlBody=""), 300, fake_postmark.MSG_NO_BODY),
    ("empty-to", _with(To=""), 300, fake_postmark.MSG_ZERO_RECIPIENTS),
    (
        "51-recipients",
        _with(To=_many(20), Cc=_many(20).replace("r", "c"), Bcc=_many(11).replace("r", "b")),
        300,
        fake_postmark.MSG_TOO_MANY_RECIPIENTS,
    ),
    ("no-at", _with(To="bob.example.org"), 300, "It must contain the '@' symbol."),
    ("bad-domain", _with(Cc="carol@exa_mple.org"), 300, "Illegal email domain 'exa_mple.org'"),
    ("bad-mailbox", _with(To="jörg@example.org"), 300, "Invalid 'To' address: 'jörg@example.org'."),
    ("to-not-string", _with(To=["bob@example.org"]), 403, "Invalid request field(s)"),
    ("header-no-value", _with(Headers=[{"Name": "X-A"}]), 403, "'Value' is a required property"),
    ("header-bad-name", _with(Headers=[{"Name": "X A", "Value": "1"}]), 300, "not a header name"),
    ("header-crlf", _with(Headers=[{"Name": "X-A", "Value": "1\r\nBcc: x"}]), 300, "line breaks"),
    (
        "attachment-no-type",
        _with(Attachments=[{"Name": "a.txt", "Content": "aGk="}]),
        403,
        "'ContentType' is a required property",
    ),
    (
        "attachment-not-base64",
        _with(Attachments=[{"Name": "a", "Content": "not base64!", "ContentType": "text/plain"}]),
        300,
        "not valid base64",
    ),
    ("track-links", _with(TrackLinks="Always"), 403, "is not one of"),
    ("metadata-int", _with(Metadata={"n": 1}), 403, "is not of type 'string'"),
    ("metadata-long", _with(Metadata={"k": "v" * 81}), 300, fake_postmark.MSG_METADATA),
    (
        "text-over-5mb",
        _with(TextBody="x" * (fake_postmark.MAX_BODY_BYTES + 1)),
        300,
        "larger than 5 MB",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_fake_refuses_what_postmark_documents_as_invalid(
    body: dict[str, Any], code: int, expected: str
) -> None:
    """The fake's validate() reports each documented rule a body breaks, with its ErrorCode."""
    errors = validate(body)
    assert any(e.startswith(f"{code}: ") and expected in e for e in errors), errors


def test_fake_http_answers_like_postmark() -> None:
    """Token, media type, JSON and size checks answer with Postmark's status and ErrorCode."""
    json_headers = {k: v for k, v in HEADERS.items() if k != "X-Postmark-Server-Token"}
    with FakePostmark(TOKEN) as fake, httpx.Client(base_url=fake.url, timeout=30) as c:
        r = c.post("/email", json=VALID, headers=json_headers)
        assert (r.status_code, r.json()) == (
            401,
            {"ErrorCode": 10, "Message": fake_postmark.MSG_AUTH_MISSING},
        )
        r = c.post("/email", json=VALID, headers={**HEADERS, "X-Postmark-Server-Token": "nope"})
        assert (r.status_code, r.json()["ErrorCode"], r.json()["Message"]) == (
            401,
            10,
            fake_postmark.MSG_AUTH_INVALID,
        )
        r = c.post("/email", json=VALID, headers={**HEADERS, "Accept": "text/html"})
        assert (r.status_code, r.json()["ErrorCode"]) == (415, 409)
        r = c.post("/email", content=b"{}", headers={**HEADERS, "Content-Type": "text/plain"})
        assert (r.status_code, r.json()["ErrorCode"]) == (415, 409)
        r = c.post("/email", content=b"{nope", headers=HEADERS)
        assert (r.status_code, r.json()) == (422, {"ErrorCode": 402, "Message": "Invalid JSON"})
        r = c.post("/email", json=_without("TextBody"), headers=HEADERS)
        assert (r.status_code, r.json()["ErrorCode"]) == (422, 300)
        big = b'{"x": "' + b"a" * fake_postmark.MAX_REQUEST_BYTES + b'"}'
        assert c.post("/email", content=big, headers=HEADERS).status_code == 413
        assert c.post("/email/batch", json=VALID, headers=HEADERS).status_code == 404
        assert c.get("/email", headers=HEADERS).status_code == 405
        r = c.post(
            "/email", json=VALID, headers={**HEADERS, "x-postmark-server-token": TOKEN.upper()}
        )
        assert r.status_code == 200  # "The header name and value are case insensitive."
    assert [q.status for q in fake.requests] == [401, 401, 415, 415, 422, 422, 413, 404, 405, 200]
    assert len(fake.errors) == 9


def test_fake_account_state_answers() -> None:
    """Unknown stream, unconfirmed sender and inactive recipients answer as Postmark does."""
    with (
        FakePostmark(
            TOKEN, inactive=("gone@example.org",), senders=("@example.com",), streams=("outbound",)
        ) as fake,
        httpx.Client(base_url=fake.url, timeout=10) as c,
    ):
        r = c.post("/email", json=_with(MessageStream="broadcast"), headers=HEADERS)
        assert (r.status_code, r.json()["ErrorCode"]) == (422, 1235)
        r = c.post("/email", json=_with(From="Eve <eve@example.net>"), headers=HEADERS)
        assert (r.status_code, r.json()["ErrorCode"]) == (422, 400)
        assert "(Eve <eve@example.net>) is not a Sender Signature" in r.json()["Message"]
        r = c.post("/email", json=_with(To="Gone@example.org"), headers=HEADERS)
        assert (r.status_code, r.json()["ErrorCode"]) == (422, 406)
        assert "Found inactive addresses: gone@example.org." in r.json()["Message"]
        r = c.post("/email", json=_with(Cc="gone@example.org"), headers=HEADERS)
        assert (r.status_code, r.json()["ErrorCode"]) == (200, 0)
        assert r.json()["Message"].startswith(
            "Message OK, but will not deliver to these inactive addresses: gone@example.org."
        )
    assert [q.status for q in fake.requests] == [422, 422, 422, 200]


def test_fake_scripted_answers_are_used_in_order_for_valid_requests() -> None:
    """respond_with() answers go to valid requests only; then the default 200 returns."""
    with FakePostmark(TOKEN) as fake, httpx.Client(base_url=fake.url, timeout=10) as c:
        fake.respond_with(429, {"ErrorCode": 429, "Message": "Rate limit"}, {"Retry-After": "3"})
        assert c.post("/email", json={}, headers=HEADERS).status_code == 422  # not used
        r = c.post("/email", json=VALID, headers=HEADERS)
        assert (r.status_code, r.headers["Retry-After"]) == (429, "3")
        ids = {c.post("/email", json=VALID, headers=HEADERS).json()["MessageID"] for _ in "ab"}
    assert len(ids) == 2
    assert [q.status for q in fake.requests] == [422, 429, 200, 200]


# ---------------------------------------------------------------------------- build_request


def test_from_reply_to_subject_and_multipart_alternative_bodies() -> None:
    """From keeps its name; Reply-To, Subject, text and HTML of an alternative arrive exact."""
    m = message(
        reply_to="Help Desk <help@example.com>",
        text="Hi Bob,\nplain text\n",
        html="<p>Hi <b>Bob</b></p>\n",
    )
    assert m.get_content_type() == "multipart/alternative"
    body = build(delivery(wire(m)))
    assert body["From"] == "Alice Example <alice@example.com>"
    assert body["ReplyTo"] == "Help Desk <help@example.com>"
    assert body["Subject"] == "hello"
    assert body["TextBody"] == "Hi Bob,\r\nplain text\r\n"  # as on the wire
    assert body["HtmlBody"] == "<p>Hi <b>Bob</b></p>\r\n"
    assert body["MessageStream"] == "outbound"
    assert body["Metadata"] == {"smtpproxy_id": "01J0000000ABCDEFGHJKMNPQRS"}


def test_non_ascii_subject_and_display_names_are_encoded_properly() -> None:
    """A non-ASCII subject arrives decoded; non-ASCII names become RFC 2047 encoded words."""
    m = message(
        sender="Jörg Müller-Łukasz <joerg@example.com>",
        to="Zoë Ångström <zoe@example.org>",
        cc='"Doe, Jane" <jane@example.org>',
        subject="Grüße aus Köln ☕",
    )
    body = build(delivery(wire(m), "zoe@example.org", "jane@example.org"))
    assert body["Subject"] == "Grüße aus Köln ☕"
    assert body["From"].isascii()
    assert body["From"].startswith("=?utf-8?")
    assert decoded_name(body["From"]) == ("Jörg Müller-Łukasz", "joerg@example.com")
    assert decoded_name(body["To"]) == ("Zoë Ångström", "zoe@example.org")
    assert body["Cc"] == '"Doe, Jane" <jane@example.org>'  # a name with a comma is quoted


def test_html_only_message_sends_html_body_only() -> None:
    """An HTML-only message has HtmlBody and no TextBody."""
    body = build(delivery(wire(message(text=None, html="<p>only html</p>\n"))))
    assert body["HtmlBody"] == "<p>only html</p>\r\n"
    assert "TextBody" not in body


def test_attachment_only_message_gets_a_minimal_text_body() -> None:
    """Postmark requires a body: a message with none gets a one-space TextBody."""
    m = EmailMessage()
    m["From"] = "alice@example.com"
    m["To"] = "bob@example.org"
    m.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="scan.pdf")
    body = build(delivery(wire(m)))
    assert body["TextBody"] == " "
    assert [a["Name"] for a in body["Attachments"]] == ["scan.pdf"]


def test_attachments_are_byte_exact_and_inline_image_has_content_id() -> None:
    """Attachments decode to the exact bytes; an inline image gets ContentID "cid:<id>"."""
    m = message(text="see image\n", html='<p><img src="cid:logo@example.com"></p>\n')
    html_part = m.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@example.com>")
    m.add_attachment(BINARY, maintype="application", subtype="octet-stream", filename="all.bin")
    m.add_attachment("Grüße\n".encode(), maintype="text", subtype="plain", filename="grüße.txt")
    body = build(delivery(wire(m)))
    by_name = {a["Name"]: a for a in body["Attachments"]}
    inline = [a for a in body["Attachments"] if "ContentID" in a]
    assert len(inline) == 1
    assert inline[0]["ContentID"] == "cid:logo@example.com"
    assert inline[0]["ContentType"] == "image/png"
    assert base64.b64decode(inline[0]["Content"]) == PNG
    assert base64.b64decode(by_name["all.bin"]["Content"]) == BINARY
    assert by_name["all.bin"]["ContentType"] == "application/octet-stream"
    assert "ContentID" not in by_name["all.bin"]
    assert base64.b64decode(by_name["grüße.txt"]["Content"]) == "Grüße\n".encode()
    assert body["HtmlBody"] == '<p><img src="cid:logo@example.com"></p>\r\n'


def test_a_message_admitted_at_the_size_limit_fits_in_one_request() -> None:
    """SMTP admission (TYPE.max_message_bytes) must not accept what Postmark then refuses:
    a message of that size, nearly all attachment, still encodes under 10 MB once the
    attachment is base64 in the JSON request."""
    limit = postmark.TYPE.max_message_bytes
    assert limit is not None
    m = message(text="see attached\n")
    m.add_attachment(b"", maintype="application", subtype="octet-stream", filename="a.bin")
    overhead = len(wire(m))
    # the attachment's base64 in the MIME message is 4/3 of its bytes, plus line breaks
    payload = os.urandom((limit - overhead - 1024) * 3 // 4 * 76 // 78)
    m = message(text="see attached\n")
    m.add_attachment(payload, maintype="application", subtype="octet-stream", filename="a.bin")
    raw = wire(m)
    assert limit - 64 * 1024 < len(raw) <= limit
    [request] = build_request(delivery(raw))
    assert len(postmark.encode(request.body)) <= postmark.MAX_REQUEST_BYTES


def test_to_and_cc_only_for_envelope_recipients_rest_is_bcc() -> None:
    """To/Cc keep header names but only envelope recipients; other recipients are Bcc."""
    m = message(
        to="Bob <bob@example.org>, Mallory <mallory@example.org>",
        cc="Carol <carol@example.org>, Trent <trent@example.org>",
    )
    body = build(delivery(wire(m), "bob@example.org", "carol@example.org", "dave@example.org"))
    assert body["To"] == "Bob <bob@example.org>"
    assert body["Cc"] == "Carol <carol@example.org>"
    assert body["Bcc"] == "dave@example.org"
    assert "mallory" not in json.dumps(body)
    assert "trent" not in json.dumps(body)


def test_bcc_recipients_never_appear_in_to_cc_or_headers() -> None:
    """Bcc recipients go in Bcc only; the Bcc header and off-envelope Bcc never pass on."""
    m = message(bcc="Dave <dave@example.org>, eve@example.org")
    assert b"Bcc: " in wire(m)
    body = build(delivery(wire(m), "bob@example.org", "dave@example.org", "frank@example.org"))
    assert body["To"] == "Bob <bob@example.org>"
    assert "Cc" not in body
    assert body["Bcc"] == "dave@example.org, frank@example.org"
    assert "eve@" not in json.dumps(body)
    assert all(h["Name"].lower() != "bcc" for h in body.get("Headers", []))
    assert "dave" not in body["To"]


def test_envelope_matches_header_addresses_case_insensitively_and_once() -> None:
    """An envelope address in another case counts as the header's; duplicates go once."""
    m = message(to="Bob <Bob@Example.ORG>")
    body = build(delivery(wire(m), "bob@example.org", "BOB@example.org", "dave@example.org"))
    assert body["To"] == "Bob <Bob@Example.ORG>"
    assert body["Bcc"] == "dave@example.org"
    [req] = build_request(delivery(wire(m), "bob@example.org", "BOB@example.org"))
    assert req.recipients == ("bob@example.org",)


def test_cc_recipients_move_to_to_when_no_to_address_is_a_recipient() -> None:
    """Postmark requires To: Cc recipients (visible to all anyway) become To, rest stay Bcc."""
    m = message(to="list@example.org", cc="Carol <carol@example.org>")
    body = build(delivery(wire(m), "carol@example.org", "dave@example.org"))
    assert body["To"] == "Carol <carol@example.org>"
    assert "Cc" not in body
    assert body["Bcc"] == "dave@example.org"


@pytest.mark.parametrize(
    "to",
    [None, "list@example.org", "undisclosed-recipients:;"],
    ids=["no-to-header", "to-not-in-envelope", "empty-group"],
)
def test_only_hidden_recipients_get_one_request_each(to: str | None) -> None:
    """With no visible recipient, each gets its own request, so nobody sees another."""
    m = message(to=to)
    envelope = ("dave@example.org", "DAVE@example.org", "erin@example.org")
    requests = build_request(delivery(wire(m), *envelope))
    assert [r.recipients for r in requests] == [("dave@example.org",), ("erin@example.org",)]
    bodies = build_all(delivery(wire(m), *envelope))
    assert [b["To"] for b in bodies] == ["dave@example.org", "erin@example.org"]
    assert all("Cc" not in b and "Bcc" not in b for b in bodies)


def test_custom_headers_are_passed_on_and_postmarks_own_are_not() -> None:
    """Custom and threading headers go in Headers, in order; built, trace and Date do not."""
    m = message(
        headers=(
            ("Message-ID", "<abc@example.com>"),
            ("In-Reply-To", "<parent@example.com>"),
            ("References", "<root@example.com> <parent@example.com>"),
            ("Date", "Mon, 01 Jan 2024 10:00:00 +0000"),
            ("DKIM-Signature", "v=1; a=rsa-sha256; d=example.com; b=abc"),
            ("Received", "from a by b; Mon, 01 Jan 2024 10:00:00 +0000"),
            ("List-Unsubscribe", "<mailto:unsub@example.com>"),
            ("X-Campaign", "spring-2024"),
            ("X-Note", "Grüße"),
        )
    )
    body = build(delivery(wire(m)))
    assert body["Headers"] == [
        {"Name": "Message-ID", "Value": "<abc@example.com>"},
        {"Name": "In-Reply-To", "Value": "<parent@example.com>"},
        {"Name": "References", "Value": "<root@example.com> <parent@example.com>"},
        {"Name": "List-Unsubscribe", "Value": "<mailto:unsub@example.com>"},
        {"Name": "X-Campaign", "Value": "spring-2024"},
        {"Name": "X-Note", "Value": "Grüße"},
    ]


def test_message_stream_setting_is_used() -> None:
    """message_stream chooses the MessageStream field."""
    body = build(delivery(wire(message())), message_stream="notifications")
    assert body["MessageStream"] == "notifications"


def test_raw_utf8_headers_are_read_as_utf8() -> None:
    """8-bit UTF-8 header names and IDN addresses (RFC 6532) are decoded, not mangled."""
    raw = (
        "From: Jörg <joerg@example.com>\r\nTo: Zoë <zoe@bücher.example>\r\n"
        "Subject: Grüße\r\nX-Note: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n"
    ).encode()
    body = build(delivery(raw, "zoe@bücher.example"))
    assert decoded_name(body["From"]) == ("Jörg", "joerg@example.com")
    assert decoded_name(body["To"]) == ("Zoë", "zoe@xn--bcher-kva.example")
    assert body["Subject"] == "Grüße"
    assert body["Headers"] == [{"Name": "X-Note", "Value": "Grüße"}]
    assert postmark.encode(body).decode("utf-8")


def test_idn_domain_goes_out_in_punycode_and_non_ascii_mailbox_is_refused() -> None:
    """An IDN domain is sent as punycode; a non-ASCII local part is a RequestError."""
    body = build(delivery(wire(message()), "bob@example.org", "carol@bücher.example"))
    assert body["Bcc"] == "carol@xn--bcher-kva.example"
    raw = message(sender="jörg@example.com").as_bytes(policy=SMTPUTF8)
    with pytest.raises(RequestError, match="non-ASCII local part"):
        build_request(delivery(raw))


def test_more_than_50_recipients_is_a_request_error() -> None:
    """51 distinct recipients cannot be one Postmark message."""
    recipients = ["bob@example.org"] + [f"r{i}@example.org" for i in range(50)]
    with pytest.raises(RequestError, match="more than 50 recipients"):
        build_request(delivery(wire(message()), *recipients))
    [body] = build_all(delivery(wire(message()), *recipients[:50]))
    assert len(body["Bcc"].split(", ")) == 49


def test_text_body_over_5_mb_is_a_request_error() -> None:
    """A TextBody over Postmark's 5 MB is refused before any request."""
    raw = wire(message(text="x" * (postmark.MAX_BODY_BYTES + 1)))
    with pytest.raises(RequestError, match="TextBody larger than"):
        build_request(delivery(raw))


# ---------------------------------------------------------------------------- classify


def _pm(code: int, msg: str = "details") -> str:
    return json.dumps({"ErrorCode": code, "Message": msg})


CLASSIFY = [
    # (id, status, body, headers, kind, retry_after, words)
    (
        "200-ok",
        200,
        json.dumps({"MessageID": "m-1", "ErrorCode": 0, "Message": "OK"}),
        {},
        OutcomeKind.DELIVERED,
        None,
        "HTTP 200",
    ),
    (
        "401-token",
        401,
        _pm(10, fake_postmark.MSG_AUTH_INVALID),
        {},
        OutcomeKind.PERMANENT,
        None,
        "ErrorCode 10 (bad or missing API token)",
    ),
    (
        "422-300-invalid",
        422,
        _pm(300, "Invalid 'To' address: 'x'."),
        {},
        OutcomeKind.PERMANENT,
        None,
        "ErrorCode 300 (invalid email request)",
    ),
    (
        "422-406-inactive",
        422,
        _pm(406, fake_postmark.MSG_ALL_INACTIVE.format(addresses="b@x.org")),
        {},
        OutcomeKind.PERMANENT,
        None,
        "ErrorCode 406 (inactive recipient)",
    ),
    (
        "422-400-sender",
        422,
        _pm(400, "not a Sender Signature"),
        {},
        OutcomeKind.PERMANENT,
        None,
        "ErrorCode 400 (sender signature not found)",
    ),
    (
        "422-401-unconfirmed",
        422,
        _pm(401),
        {},
        OutcomeKind.PERMANENT,
        None,
        "sender signature not confirmed",
    ),
    ("422-402-json", 422, _pm(402, "Invalid JSON"), {}, OutcomeKind.PERMANENT, None, "402"),
    (
        "422-403-fields",
        422,
        _pm(403, "Invalid request field(s)"),
        {},
        OutcomeKind.PERMANENT,
        None,
        "403",
    ),
    (
        "422-411-attachment",
        422,
        _pm(411),
        {},
        OutcomeKind.PERMANENT,
        None,
        "forbidden attachment type",
    ),
    ("422-412-pending", 422, _pm(412), {}, OutcomeKind.PERMANENT, None, "account is pending"),
    ("422-413-may-not-send", 422, _pm(413), {}, OutcomeKind.PERMANENT, None, "may not send"),
    ("422-1235-stream", 422, _pm(1235), {}, OutcomeKind.PERMANENT, None, "stream not found"),
    ("422-unknown-code", 422, _pm(9999), {}, OutcomeKind.PERMANENT, None, "ErrorCode 9999"),
    (
        "422-405-credits",
        422,
        _pm(405, "out of credits"),
        {},
        OutcomeKind.RETRY,
        None,
        "not allowed to send",
    ),
    (
        "422-100-maintenance",
        422,
        _pm(100),
        {"Retry-After": "60"},
        OutcomeKind.RETRY,
        60,
        "maintenance",
    ),
    (
        "429-rate",
        429,
        _pm(429, "Rate limit exceeded"),
        {"Retry-After": "5"},
        OutcomeKind.RETRY,
        5,
        "rate limit exceeded",
    ),
    ("500-internal", 500, "Internal Server Error", {}, OutcomeKind.RETRY, None, "HTTP 500"),
    (
        "503-maintenance",
        503,
        _pm(100, "Planned maintenance"),
        {"Retry-After": "120"},
        OutcomeKind.RETRY,
        120,
        "Planned maintenance",
    ),
    ("413-too-large", 413, "Payload Too Large", {}, OutcomeKind.PERMANENT, None, "HTTP 413"),
    ("415-media", 415, _pm(409, "JSON required"), {}, OutcomeKind.PERMANENT, None, "409"),
    ("200-with-error", 200, _pm(300, "odd"), {}, OutcomeKind.PERMANENT, None, "ErrorCode 300"),
]


@pytest.mark.parametrize(
    ("status", "text", "headers", "kind", "retry_after", "words"),
    [c[1:] for c in CLASSIFY],
    ids=[c[0] for c in CLASSIFY],
)
def test_classify_table(
    status: int,
    text: str,
    headers: dict[str, str],
    kind: OutcomeKind,
    retry_after: float | None,
    words: str,
) -> None:
    """Each documented HTTP status and ErrorCode maps to its outcome (module docstring)."""
    outcome = classify(status, httpx.Headers(headers), text)
    assert outcome.kind == kind
    assert outcome.retry_after == retry_after
    assert words in outcome.detail
    if kind == OutcomeKind.DELIVERED:
        assert outcome.provider_message_id == "m-1"


@pytest.mark.parametrize(("status", "code"), [(200, 0), (422, 406)], ids=["200-0", "422-406"])
def test_classify_partly_inactive_is_delivered_naming_the_rejected(status: int, code: int) -> None:
    """'Message OK, but will not deliver to these inactive addresses' is delivered + rejected."""
    text = json.dumps(
        {
            "MessageID": "m-2",
            "ErrorCode": code,
            "Message": fake_postmark.MSG_SOME_INACTIVE.format(
                addresses="gone@example.org, spam.er@example.org"
            ),
        }
    )
    recipients = ("bob@example.org", "Gone@Example.org", "spam.er@example.org")
    outcome = classify(status, httpx.Headers(), text, recipients)
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == "m-2"
    assert outcome.rejected == ("Gone@Example.org", "spam.er@example.org")
    everyone = classify(status, httpx.Headers(), text, recipients[1:])
    assert everyone.kind == OutcomeKind.PERMANENT


def test_combine_outcomes_of_per_recipient_requests() -> None:
    """All delivered joins ids; none delivered retries if any may; some names the rest."""
    ok1 = Outcome.delivered("id-1", "HTTP 200")
    ok2 = Outcome.delivered("id-2", "HTTP 200")
    wait = Outcome.retry("HTTP 429: slow", 5)
    wait_longer = Outcome.retry("HTTP 503: down", 30)
    refused = Outcome.permanent("HTTP 422: ErrorCode 406")
    a, b, c = ("a@x.org",), ("b@x.org",), ("c@x.org",)
    assert combine([(a, ok1)]) is ok1
    both = combine([(a, ok1), (b, ok2)])
    assert (both.kind, both.provider_message_id, both.deferred, both.rejected) == (
        OutcomeKind.DELIVERED,
        "id-1,id-2",
        (),
        (),
    )
    none = combine([(a, wait), (b, refused), (c, wait_longer)])
    assert (none.kind, none.retry_after) == (OutcomeKind.RETRY, 30)
    assert "b@x.org: HTTP 422" in none.detail
    assert combine([(a, refused), (b, refused)]).kind == OutcomeKind.PERMANENT
    some = combine([(a, ok1), (b, wait), (c, refused)])
    assert (some.kind, some.provider_message_id) == (OutcomeKind.DELIVERED, "id-1")
    assert (some.deferred, some.rejected) == (b, c)
    assert some.detail.startswith("1 of 3 messages accepted")


# ---------------------------------------------------------------------------- provider settings


def test_type_declares_limits_settings_and_secret() -> None:
    """TYPE names postmark, its 50-recipient and 10 MB limits, and a required server token."""
    t = postmark.TYPE
    assert (t.name, t.max_recipients) == ("postmark", 50)
    assert (t.secret, t.secret_required) == ("server token", True)
    assert t.default_endpoint == "https://api.postmarkapp.com"
    assert set(t.settings) == {"message_stream", "timeout", "max_connections"}
    t.validate(spec(message_stream="outbound"))
    with pytest.raises(ProviderConfigError, match="no setting 'region'"):
        t.validate(spec(region="eu"))
    with pytest.raises(ProviderConfigError, match="no server token stored"):
        t.validate(spec(secret=None))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"message_stream": " "}, "'message_stream' is empty"),
        ({"timeout": "soon"}, "'timeout' must be a number"),
        ({"max_connections": 0}, "'max_connections' must be positive"),
    ],
    ids=["stream", "timeout", "pool"],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], words: str) -> None:
    """Unusable settings raise ProviderConfigError naming the setting."""
    with pytest.raises(ProviderConfigError, match=words):
        PostmarkProvider(spec(**settings))


def test_token_is_not_in_reprs() -> None:
    """Neither the spec's nor the provider's repr shows the server token."""
    s = spec()
    assert TOKEN not in repr(s)
    assert TOKEN not in repr(PostmarkProvider(s))


# ---------------------------------------------------------------------------- send() on a socket


async def test_send_delivers_with_token_json_headers_and_exact_fields() -> None:
    """send() posts what build_request() makes, with the token and JSON headers, in UTF-8."""
    m = message(subject="Grüße", cc="Carol <carol@example.org>", html="<p>Grüße</p>\n")
    m.add_attachment(BINARY, maintype="application", subtype="octet-stream", filename="b.dat")
    d = delivery(wire(m), "bob@example.org", "carol@example.org", "dave@example.org")
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(d)
    assert fake.errors == []
    [req] = fake.requests
    assert req.accepted
    assert (req.method, req.path) == ("POST", "/email")
    assert req.headers["x-postmark-server-token"] == TOKEN
    assert req.headers["accept"] == "application/json"
    assert req.headers["content-type"] == "application/json"
    assert "Grüße".encode() in req.raw
    [expected] = build_request(d)
    assert req.body == json.loads(json.dumps(expected.body))
    assert (req.body["To"], req.body["Cc"], req.body["Bcc"]) == (
        "Bob <bob@example.org>",
        "Carol <carol@example.org>",
        "dave@example.org",
    )
    assert base64.b64decode(req.body["Attachments"][0]["Content"]) == BINARY
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == req.response["MessageID"]


async def test_send_hidden_recipients_one_request_each_and_ids_combined() -> None:
    """Two Bcc-only recipients: two requests, each To one of them, both ids recorded."""
    d = delivery(wire(message(to="list@example.org")), "dave@example.org", "erin@example.org")
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(d)
    assert sorted(r.body["To"] for r in fake.accepted) == ["dave@example.org", "erin@example.org"]
    assert outcome.kind == OutcomeKind.DELIVERED
    ids = {r.response["MessageID"] for r in fake.requests}
    assert set((outcome.provider_message_id or "").split(",")) == ids


async def test_send_hidden_recipient_inactive_is_rejected_others_delivered() -> None:
    """One of two hidden recipients suppressed: delivered, naming it as rejected."""
    d = delivery(wire(message(to="list@example.org")), "dave@example.org", "erin@example.org")
    with FakePostmark(TOKEN, inactive=("erin@example.org",)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(d)
    assert sorted(r.status for r in fake.requests) == [200, 422]
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.rejected == ("erin@example.org",)
    assert "ErrorCode 406" in outcome.detail


async def test_send_partly_inactive_is_delivered_with_rejected() -> None:
    """Postmark's "Message OK, but will not deliver to ..." is delivered, naming them."""
    d = delivery(wire(message()), "bob@example.org", "Gone@example.org")
    with FakePostmark(TOKEN, inactive=("gone@example.org",)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(d)
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.rejected == ("Gone@example.org",)
    assert outcome.provider_message_id == fake.requests[0].response["MessageID"]


async def test_send_all_inactive_is_permanent_406() -> None:
    """Every recipient suppressed: permanent, with Postmark's ErrorCode 406 message."""
    with FakePostmark(TOKEN, inactive=("bob@example.org",)) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "ErrorCode 406" in outcome.detail
    assert "Found inactive addresses: bob@example.org" in outcome.detail
    assert [r.status for r in fake.requests] == [422]


async def test_send_with_wrong_token_is_permanent_401_without_the_token() -> None:
    """A token Postmark does not know: permanent, ErrorCode 10, and no token in the detail."""
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url, secret="wrong-secret-token") as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("HTTP 401: ErrorCode 10")
    assert fake_postmark.MSG_AUTH_INVALID in outcome.detail
    assert "wrong-secret-token" not in outcome.detail
    assert [r.status for r in fake.requests] == [401]


async def test_send_unknown_message_stream_is_permanent() -> None:
    """A message_stream the server lacks: permanent, ErrorCode 1235."""
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url, message_stream="broadcasts") as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "ErrorCode 1235" in outcome.detail
    assert fake.requests[0].body["MessageStream"] == "broadcasts"


@pytest.mark.parametrize(
    ("status", "body", "headers", "retry_after"),
    [
        (429, {"ErrorCode": 429, "Message": "Rate limit exceeded"}, {"Retry-After": "7"}, 7),
        (500, {"ErrorCode": 0, "Message": "Internal Server Error"}, {}, None),
        (503, "Service Unavailable", {}, None),
    ],
    ids=["429", "500", "503"],
)
async def test_send_scripted_transient_answers_are_retried(
    status: int, body: object, headers: dict[str, str], retry_after: float | None
) -> None:
    """429 (with Retry-After), 500 and 503 are retries, and the next send goes through."""
    with FakePostmark(TOKEN) as fake:
        fake.respond_with(status, body, headers)
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                first = await p.send(delivery(wire(message())))
                second = await p.send(delivery(wire(message())))
    assert (first.kind, first.retry_after) == (OutcomeKind.RETRY, retry_after)
    assert first.detail.startswith(f"HTTP {status}")
    assert second.kind == OutcomeKind.DELIVERED
    assert [r.status for r in fake.requests] == [status, 200]


async def test_send_scripted_422_300_is_permanent() -> None:
    """A 422 with ErrorCode 300 is permanent and carries Postmark's message."""
    with FakePostmark(TOKEN) as fake:
        fake.respond_with(422, {"ErrorCode": 300, "Message": "Invalid 'To' address: 'x'."})
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message())))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail == (
        "HTTP 422: ErrorCode 300 (invalid email request): Invalid 'To' address: 'x'."
    )


async def test_send_to_closed_port_is_retry_connection_error() -> None:
    """Nothing listening: a retry with "connection error"."""
    with FakePostmark(TOKEN) as gone:
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


async def test_send_more_than_50_recipients_is_permanent_without_request() -> None:
    """51 recipients fail permanently and Postmark is never called."""
    recipients = [f"r{i}@example.org" for i in range(51)]
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(10):
                outcome = await p.send(delivery(wire(message()), *recipients))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "more than 50 recipients" in outcome.detail
    assert fake.requests == []


async def test_send_over_10_mb_is_permanent_without_request() -> None:
    """A message whose request would pass Postmark's 10 MB fails without a request."""
    m = message()
    m.add_attachment(
        os.urandom(8 * 1024 * 1024), maintype="application", subtype="zip", filename="big.zip"
    )
    with FakePostmark(TOKEN) as fake:
        async with provider(fake.url) as p:
            with trio.fail_after(30):
                outcome = await p.send(delivery(wire(m)))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "10 MB" in outcome.detail
    assert fake.requests == []
