"""Microsoft Graph provider: the fake's own checks (tests/support/fake_graph.py), the MIME
preparation (recipients the header must name), the classifiers, and send() over a real
socket: token caching, refresh before expiry and after a 401, one token fetch for many
concurrent sends, Graph's and the token endpoint's failures, size limit, transport.
"""

from __future__ import annotations

import base64
import email.policy
import functools
import json
import uuid
from contextlib import AbstractAsyncContextManager
from email.parser import BytesParser
from email.policy import SMTPUTF8
from typing import Any

import httpx
import pytest
import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.msgraph import (
    MAX_REQUEST_BYTES,
    TYPE,
    GraphProvider,
    RequestError,
    build_request,
    classify,
    classify_token,
    message_id,
    prepare_mime,
)
from smtpproxy.models import OutcomeKind
from tests.support import deliveries, fake_graph
from tests.support.deliveries import opened, wire
from tests.support.fake_graph import FakeGraph
from tests.support.net import closed_port, silent_server

USER = "sender@contoso.example"
DELIVERED = OutcomeKind.DELIVERED
RETRY = OutcomeKind.RETRY
PERMANENT = OutcomeKind.PERMANENT
PACED = OutcomeKind.PACED


# ---------------------------------------------------------------------------- helpers


message = functools.partial(deliveries.message, sender=f"Sender <{USER}>", subject="Grüße")


def delivery(body: bytes | None = None, *recipients: str) -> Delivery:
    return deliveries.delivery(
        body if body is not None else wire(message()), *recipients, mail_from=USER
    )


def spec(fake: FakeGraph, secret: str | None = None, **settings: Any) -> ProviderSpec:
    base = {
        "tenant_id": fake.tenant_id,
        "client_id": fake.client_id,
        "user": USER,
        "login_endpoint": fake.url,
    }
    return ProviderSpec(
        name="graph1",
        type="msgraph",
        endpoint=settings.pop("endpoint", fake.url),
        secret=fake.client_secret if secret is None else secret,
        settings={**base, **settings},
    )


def graph(fake: FakeGraph, **kwargs: Any) -> AbstractAsyncContextManager[GraphProvider]:
    return opened(GraphProvider(spec(fake, **kwargs)))


def sized(size: int) -> bytes:
    """A message of exactly size bytes (padding lines in the body)."""
    head = wire(message(text="pad\n"))
    pad = size - len(head)
    lines = [b"x" * 76 + b"\r\n"] * (pad // 78)
    tail = b"y" * (pad - 78 * len(lines))
    body = head + b"".join(lines) + tail
    assert len(body) == size
    return body


# ---------------------------------------------------------------------------- the fake itself


def token_form(fake: FakeGraph, **changes: str | None) -> dict[str, str]:
    form = {
        "client_id": fake.client_id,
        "scope": "https://graph.microsoft.com/.default",
        "client_secret": fake.client_secret,
        "grant_type": "client_credentials",
    }
    for key, value in changes.items():
        if value is None:
            form.pop(key)
        else:
            form[key] = value
    return form


def test_fake_issues_bearer_token_for_documented_form() -> None:
    """A form with the four documented fields gets a Bearer token with expires_in."""
    with FakeGraph() as fake:
        resp = httpx.post(f"{fake.url}/{fake.tenant_id}/oauth2/v2.0/token", data=token_form(fake))
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599
    assert fake.issued == [body["access_token"]]


@pytest.mark.parametrize(
    ("changes", "tenant", "status", "error", "text"),
    [
        ({"client_secret": None}, None, 400, "invalid_request", "parameter: 'client_secret'"),
        ({"grant_type": "password"}, None, 400, "unsupported_grant_type", "AADSTS70003"),
        ({"scope": "Mail.Send"}, None, 400, "invalid_scope", "AADSTS1002012"),
        ({}, "other-tenant", 400, "invalid_request", "AADSTS90002: Tenant 'other-tenant'"),
        ({"client_id": "nobody"}, None, 400, "unauthorized_client", "AADSTS700016"),
        ({"client_secret": "wrong"}, None, 401, "invalid_client", "AADSTS7000215"),
    ],
    ids=[
        "missing-secret",
        "bad-grant",
        "bad-scope",
        "unknown-tenant",
        "unknown-client",
        "bad-secret",
    ],
)
def test_fake_token_errors_are_documented(
    changes: dict[str, str | None], tenant: str | None, status: int, error: str, text: str
) -> None:
    """Each invalid token request gets the identity platform's status, error and AADSTS text."""
    with FakeGraph() as fake:
        resp = httpx.post(
            f"{fake.url}/{tenant or fake.tenant_id}/oauth2/v2.0/token",
            data=token_form(fake, **changes),
        )
    assert resp.status_code == status
    body = resp.json()
    assert body["error"] == error
    assert text in body["error_description"]
    assert "\r\nTrace ID: " in body["error_description"]
    assert isinstance(body["error_codes"][0], int)
    assert fake.issued == []


def test_fake_token_endpoint_wants_a_form_body() -> None:
    """The same fields as JSON are not a form: the first parameter is reported missing."""
    with FakeGraph() as fake:
        resp = httpx.post(f"{fake.url}/{fake.tenant_id}/oauth2/v2.0/token", json=token_form(fake))
    assert resp.status_code == 400
    assert "AADSTS900144" in resp.json()["error_description"]


def _fake_token(fake: FakeGraph) -> str:
    resp = httpx.post(f"{fake.url}/{fake.tenant_id}/oauth2/v2.0/token", data=token_form(fake))
    return str(resp.json()["access_token"])


def _sendmail(
    fake: FakeGraph,
    body: bytes,
    *,
    token: str | None,
    user: str = USER,
    content_type: str = "text/plain",
) -> httpx.Response:
    headers = {
        "Content-Type": content_type,
        "client-request-id": "c0ffee00-0000-4000-8000-000000000000",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{fake.url}/v1.0/users/{user}/sendMail", content=body, headers=headers)


def test_fake_accepts_base64_mime_with_202_and_records_it() -> None:
    """A valid MIME sendMail is 202 with request-id and the echoed client-request-id."""
    mime = wire(message())
    with FakeGraph() as fake:
        resp = _sendmail(fake, base64.b64encode(mime), token=_fake_token(fake))
    assert resp.status_code == 202
    assert resp.content == b""
    assert resp.headers["client-request-id"] == "c0ffee00-0000-4000-8000-000000000000"
    assert uuid.UUID(resp.headers["request-id"])
    assert fake.mime == [mime]
    assert fake.errors == []


@pytest.mark.parametrize(
    ("case", "status", "code", "text"),
    [
        ("no-token", 401, "InvalidAuthenticationToken", "Access token is empty."),
        ("unknown-token", 401, "InvalidAuthenticationToken", "CompactToken parsing failed"),
        ("expired-token", 401, "InvalidAuthenticationToken", "the token is expired"),
        ("unknown-user", 404, "ErrorInvalidUser", "'nobody@contoso.example' is invalid"),
        ("json-body", 415, "UnsupportedMediaType", "text/plain"),
        ("not-base64", 400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string"),
        ("no-recipients", 400, "ErrorInvalidRecipients", "contains no recipients"),
        ("no-domain", 400, "ErrorInvalidRecipients", "Recipient 'bob' isn't resolved"),
        ("over-4mb", 413, "RequestEntityTooLarge", "larger than 4194304 bytes"),
    ],
)
def test_fake_refuses_sendmail_as_graph_does(case: str, status: int, code: str, text: str) -> None:
    """Each invalid sendMail request gets Graph's status and {"error": {"code", "message"}}."""
    mime = base64.b64encode(wire(message()))
    with FakeGraph() as fake:
        token: str | None = _fake_token(fake)
        user, content_type = USER, "text/plain"
        if case == "no-token":
            token = None
        elif case == "unknown-token":
            token = "not-issued"
        elif case == "expired-token":
            fake.expire_tokens()
        elif case == "unknown-user":
            user = "nobody@contoso.example"
        elif case == "json-body":
            content_type = "application/json"
        elif case == "not-base64":
            mime = b"this is not base64!"
        elif case == "no-recipients":
            mime = base64.b64encode(wire(message(to=None)))
        elif case == "no-domain":
            mime = base64.b64encode(wire(message(to="bob")))
        elif case == "over-4mb":
            mime = b"A" * (MAX_REQUEST_BYTES + 4)
        resp = _sendmail(fake, mime, token=token, user=user, content_type=content_type)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["code"] == code
    assert text in error["message"]
    assert fake.mime == []
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")


# ---------------------------------------------------------------------------- prepare_mime


def test_mime_unchanged_when_header_names_exactly_the_envelope() -> None:
    """To, Cc and Bcc naming every envelope recipient (any case): the bytes go as they are."""
    body = wire(message(cc="carol@example.net", bcc="dave@example.net"))
    d = delivery(body, "BOB@example.org", "carol@example.net", "dave@EXAMPLE.net")
    assert prepare_mime(d) is body


def test_envelope_only_recipient_becomes_a_bcc_field_on_top() -> None:
    """A recipient only in the envelope is added as one Bcc field; the rest is unchanged."""
    body = wire(message())
    prepared = prepare_mime(delivery(body, "bob@example.org", "hidden@example.net"))
    assert prepared == b"Bcc: hidden@example.net\r\n" + body


def test_bcc_field_uses_the_message_line_ends() -> None:
    """A message with LF line ends gets its Bcc field with an LF."""
    body = wire(message()).replace(b"\r\n", b"\n")
    prepared = prepare_mime(delivery(body, "bob@example.org", "hidden@example.net"))
    assert prepared == b"Bcc: hidden@example.net\n" + body


def test_existing_bcc_field_is_merged_into_one() -> None:
    """A message with a Bcc field keeps one Bcc field: its addresses, then the missing ones."""
    body = wire(message(bcc="old@example.net"))
    prepared = prepare_mime(delivery(body, "bob@example.org", "old@example.net", "new@example.net"))
    assert prepared == b"Bcc: old@example.net, new@example.net\r\n" + body.replace(
        b"Bcc: old@example.net\r\n", b""
    )


def test_header_naming_a_non_recipient_is_refused() -> None:
    """A split delivery (carol went to another route) cannot go: Graph would mail carol too."""
    body = wire(message(to="bob@example.org, carol@example.net"))
    with pytest.raises(RequestError, match=r"not in this delivery's envelope.*carol@example\.net"):
        prepare_mime(delivery(body, "bob@example.org"))


def test_resent_to_naming_a_non_recipient_is_refused() -> None:
    """Resent-To counts as an addressing field too."""
    body = wire(message(headers=(("Resent-To", "eve@example.net"),)))
    with pytest.raises(RequestError, match=r"eve@example\.net"):
        prepare_mime(delivery(body, "bob@example.org"))


def test_undisclosed_recipients_get_a_folded_bcc_with_every_address() -> None:
    """An empty group in To and 40 envelope recipients: one folded Bcc field naming all 40."""
    recipients = [f"person{i:02d}@example.org" for i in range(40)]
    body = wire(message(to="undisclosed-recipients:;"))
    prepared = prepare_mime(delivery(body, *recipients))
    added = prepared[: len(prepared) - len(body)]
    assert prepared.endswith(body)
    assert all(len(line) <= 80 for line in added.split(b"\r\n"))
    parsed = BytesParser(policy=email.policy.default).parsebytes(prepared)
    assert [a.addr_spec for a in parsed["Bcc"].addresses] == recipients


def test_international_domain_matches_its_punycode_form() -> None:
    """A header address with a Unicode domain is the envelope's Punycode address."""
    body = message(to="bob@bücher.example").as_bytes(policy=SMTPUTF8)
    assert prepare_mime(delivery(body, "bob@xn--bcher-kva.example")) is body


def test_500_recipients_fit_and_501_are_refused() -> None:
    """Exchange Online's default: 500 recipients per message."""
    body = wire(message(to="undisclosed-recipients:;"))
    many = [f"r{i}@example.org" for i in range(501)]
    assert prepare_mime(delivery(body, *many[:500])).endswith(body)
    with pytest.raises(RequestError, match="more than 500 recipients"):
        prepare_mime(delivery(body, *many))


def test_build_request_is_one_line_of_base64_up_to_4_mb() -> None:
    """The body is the base64 of the MIME; 4,194,304 base64 bytes fit, 3 raw bytes more do not."""
    at_limit = sized(MAX_REQUEST_BYTES * 3 // 4)
    payload = build_request(delivery(at_limit))
    assert len(payload) == MAX_REQUEST_BYTES
    assert base64.b64decode(payload, validate=True) == at_limit
    with pytest.raises(RequestError, match="too large for Graph"):
        build_request(delivery(sized(MAX_REQUEST_BYTES * 3 // 4 + 1)))


def test_type_declares_graph_limits_and_settings() -> None:
    """msgraph: 500 recipients, about 3 MB of MIME (35 MB with large_messages), a required
    secret; `user` is required by the constructor unless send_as names the sender."""
    assert TYPE.name == "msgraph"
    assert TYPE.max_recipients == 500
    assert TYPE.max_message_bytes is not None
    assert len(base64.b64encode(b"x" * (TYPE.max_message_bytes + 16 * 1024))) <= MAX_REQUEST_BYTES
    assert TYPE.secret_required
    assert {k for k, v in TYPE.settings.items() if v.required} == {"tenant_id", "client_id"}
    plain = ProviderSpec(name="g", type="msgraph")
    large = ProviderSpec(name="g", type="msgraph", settings={"large_messages": True})
    assert TYPE.message_limit(plain) == TYPE.max_message_bytes
    assert TYPE.message_limit(large) == 35 * 1024 * 1024


# ---------------------------------------------------------------------------- classify


def graph_error(code: str, text: str = "what Graph said") -> str:
    return json.dumps({"error": {"code": code, "message": text}})


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "ErrorInvalidRecipients", PERMANENT),
        (400, "ErrorMimeContentInvalidBase64String", PERMANENT),
        (401, "InvalidAuthenticationToken", PERMANENT),
        (403, "ErrorQuotaExceeded", PERMANENT),
        (413, "RequestEntityTooLarge", PERMANENT),
        (500, "InternalServerError", RETRY),
        (503, "ServiceNotAvailable", RETRY),
        (504, "GatewayTimeout", RETRY),
        (400, "ErrorServerBusy", RETRY),
    ],
)
def test_classify_graph_errors(status: int, code: str, kind: OutcomeKind) -> None:
    """Graph's answers by status and error code: the detail names both and the message."""
    outcome = classify(status, httpx.Headers(), graph_error(code))
    assert outcome.kind == kind
    assert outcome.detail == f"HTTP {status}: {code}: what Graph said"


@pytest.mark.parametrize("code", ["ApplicationThrottled", "MailboxConcurrency", "TooManyRequests"])
def test_classify_429_paces_the_mailbox(code: str) -> None:
    """A 429 is about the sending mailbox: paced (not a failed attempt), after its
    Retry-After, or a minute when it gives none."""
    outcome = classify(429, httpx.Headers({"Retry-After": "7"}), graph_error(code))
    assert (outcome.kind, outcome.retry_after) == (PACED, 7)
    assert outcome.detail == f"HTTP 429: {code}: what Graph said"
    assert classify(429, httpx.Headers(), graph_error(code)).retry_after == 60


@pytest.mark.parametrize(
    ("status", "code", "says"),
    [
        (403, "ErrorSendAsDenied", "application access policy"),
        (404, "ErrorInvalidUser", "no mailbox a@contoso.example"),
        (404, "MailboxNotEnabledForRESTAPI", "no mailbox a@contoso.example"),
        (403, "ErrorAccessDenied", "admin consent for Mail.Send"),
        (403, "ErrorAccessDenied", "application access policy"),
    ],
)
def test_classify_mailbox_refusals_say_what_to_grant(status: int, code: str, says: str) -> None:
    """Send As denied and an unknown mailbox are permanent and say what to do."""
    outcome = classify(status, httpx.Headers(), graph_error(code), "a@contoso.example")
    assert outcome.kind == PERMANENT
    assert says in outcome.detail and "a@contoso.example" in outcome.detail


def test_classify_202_is_delivered_with_request_id() -> None:
    """202 is delivered; Graph's request-id (else client-request-id) names the message."""
    headers = httpx.Headers({"request-id": "r-1", "client-request-id": "c-1"})
    assert classify(202, headers, "").provider_message_id == "r-1"
    assert message_id(httpx.Headers({"client-request-id": "c-1"})) == "c-1"
    assert classify(202, httpx.Headers(), "").kind == DELIVERED


@pytest.mark.parametrize("status", [503, 504])
def test_classify_retry_honours_retry_after(status: int) -> None:
    """503 and 504 with Retry-After wait that long."""
    outcome = classify(status, httpx.Headers({"Retry-After": "7"}), graph_error("Busy"))
    assert outcome.kind == RETRY
    assert outcome.retry_after == 7


def aad_error(error: str, text: str) -> str:
    return json.dumps(
        {
            "error": error,
            "error_description": f"{text}\r\nTrace ID: t\r\nCorrelation ID: c\r\nTimestamp: x",
            "error_codes": [1],
        }
    )


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, "invalid_request", PERMANENT),
        (400, "unauthorized_client", PERMANENT),
        (400, "invalid_scope", PERMANENT),
        (401, "invalid_client", PERMANENT),
        (400, "temporarily_unavailable", RETRY),
        (500, "server_error", RETRY),
        (503, "", RETRY),
        (429, "", RETRY),
    ],
)
def test_classify_token_errors(status: int, error: str, kind: OutcomeKind) -> None:
    """Token endpoint: identity errors are permanent, the service's own failures retry."""
    outcome = classify_token(
        status, httpx.Headers({"Retry-After": "3"}), aad_error(error, "AADSTS1: no.")
    )
    assert outcome.kind == kind
    assert outcome.detail.startswith(f"token request: HTTP {status}")
    assert "AADSTS1: no." in outcome.detail
    assert "Trace ID" not in outcome.detail
    if kind == RETRY:
        assert outcome.retry_after == 3


# ---------------------------------------------------------------------------- configuration


def test_save_to_sent_items_cannot_be_false() -> None:
    """MIME sendMail always saves to Sent Items: false is refused, true is accepted."""
    with FakeGraph() as fake:
        with pytest.raises(ProviderConfigError, match="always saves a copy in Sent Items"):
            GraphProvider(spec(fake, save_to_sent_items=False))
        with pytest.raises(ProviderConfigError, match="always saves"):
            GraphProvider(spec(fake, save_to_sent_items="false"))
        with pytest.raises(ProviderConfigError, match="true or false"):
            GraphProvider(spec(fake, save_to_sent_items="maybe"))
        TYPE.validate(spec(fake, save_to_sent_items=True))


def test_required_settings_and_secret() -> None:
    """tenant_id, client_id, user (with send_as user) and the client secret are required."""
    with FakeGraph() as fake:
        for key in ("tenant_id", "client_id"):
            with pytest.raises(ProviderConfigError, match=f"'{key}' is required"):
                TYPE.validate(spec(fake, **{key: ""}))
        with pytest.raises(ProviderConfigError, match="'user' is required"):
            GraphProvider(spec(fake, user=""))
        with pytest.raises(ProviderConfigError, match="no client secret"):
            GraphProvider(spec(fake, secret=""))


async def test_repr_shows_no_secret_or_token() -> None:
    """The provider's repr names the mailbox, never the client secret or a token."""
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                await provider.send(delivery())
            text = repr(provider)
    assert USER in text
    assert fake.client_secret not in text
    assert fake.issued[0] not in text


# ---------------------------------------------------------------------------- send()


async def test_send_delivers_exact_mime_with_token_and_ids() -> None:
    """Graph receives the exact bytes, base64 as text/plain, with the issued Bearer token."""
    m = message(cc="carol@example.net", text="Grüße\n.dot line\n")
    m.add_attachment(bytes(range(256)) * 4, maintype="application", subtype="octet-stream")
    body = wire(m)
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(
                    delivery(body, "bob@example.org", "carol@example.net")
                )
    assert fake.errors == []
    assert fake.mime == [body]
    [tok] = fake.token_requests
    assert tok.path == f"/{fake.tenant_id}/oauth2/v2.0/token"
    assert tok.headers["content-type"] == "application/x-www-form-urlencoded"
    assert tok.form == token_form(fake)
    [req] = fake.sendmail_requests
    assert (req.method, req.path) == ("POST", f"/v1.0/users/{USER}/sendMail")
    assert req.headers["content-type"] == "text/plain"
    assert req.headers["authorization"] == f"Bearer {fake.issued[0]}"
    assert req.raw == base64.b64encode(body)
    assert uuid.UUID(req.headers["client-request-id"])
    assert outcome.kind == DELIVERED
    assert outcome.provider_message_id == req.response_headers["request-id"]
    assert fake.client_secret not in outcome.detail


async def test_send_adds_bcc_for_envelope_only_recipient() -> None:
    """Graph gets the message with one added Bcc field for the envelope-only recipient."""
    body = wire(message())
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(
                    delivery(body, "bob@example.org", "hidden@example.net")
                )
    assert outcome.kind == DELIVERED
    assert fake.mime == [b"Bcc: hidden@example.net\r\n" + body]


async def test_send_split_delivery_is_permanent_without_any_request() -> None:
    """Headers naming a recipient outside this delivery: permanent, no token, no sendMail."""
    body = wire(message(to="bob@example.org, carol@example.net"))
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery(body, "carol@example.net"))
    assert outcome.kind == PERMANENT
    assert "bob@example.org" in outcome.detail
    assert fake.requests == []


async def test_send_mailbox_with_hash_in_upn_is_path_encoded() -> None:
    """A guest UPN with '#' is sent percent-encoded in the path and found by Graph."""
    guest = "bob_example.org#EXT#@contoso.example"
    with FakeGraph(users=(guest,)) as fake:
        async with graph(fake, user=guest) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == DELIVERED
    assert (
        fake.sendmail_requests[0].path
        == "/v1.0/users/bob_example.org%23EXT%23@contoso.example/sendMail"
    )


async def test_token_is_cached_across_sends() -> None:
    """Three sends, one token request: every sendMail carries the same token."""
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcomes = [await provider.send(delivery()) for _ in range(3)]
    assert [o.kind for o in outcomes] == [DELIVERED] * 3
    assert len(fake.token_requests) == 1
    assert {r.token for r in fake.sendmail_requests} == {fake.issued[0]}


async def test_token_is_refreshed_shortly_before_expiry() -> None:
    """A 2 s token is replaced after half its life, before Graph would refuse it."""
    with FakeGraph(token_lifetime=2) as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                await provider.send(delivery())
                await provider.send(delivery())
                await trio.sleep(1.2)
                await provider.send(delivery())
    t1, t2 = fake.issued
    assert [r.token for r in fake.sendmail_requests] == [t1, t1, t2]
    assert [r.status for r in fake.sendmail_requests] == [202, 202, 202]


async def test_expired_token_401_refreshes_once_and_retries_once() -> None:
    """Graph's 401 for an expired token: one new token, one more request, delivered."""
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                await provider.send(delivery())
                fake.expire_tokens()
                outcome = await provider.send(delivery())
    assert outcome.kind == DELIVERED
    t1, t2 = fake.issued
    assert [(r.status, r.token) for r in fake.sendmail_requests] == [
        (202, t1),
        (401, t1),
        (202, t2),
    ]
    assert fake.mime[1] == fake.mime[0]


async def test_concurrent_401s_refresh_the_token_once() -> None:
    """Five sends rejected with the same expired token share one refresh."""
    with FakeGraph(token_delay=0.2) as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                await provider.send(delivery())
                fake.expire_tokens()
                outcomes = []

                async def one() -> None:
                    outcomes.append(await provider.send(delivery()))

                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(one)
    assert [o.kind for o in outcomes] == [DELIVERED] * 5
    t1, t2 = fake.issued
    assert fake.sendmail_requests[0].token == t1
    statuses = sorted((r.status, r.token == t2) for r in fake.sendmail_requests[1:])
    assert statuses == [(202, True)] * 5 + [(401, False)] * 5


async def test_old_token_is_used_while_the_token_endpoint_fails() -> None:
    """Past its refresh time but not its expiry, the old token still sends when AAD is down."""
    with FakeGraph(token_lifetime=4) as fake:
        async with graph(fake) as provider:
            with trio.fail_after(10):
                await provider.send(delivery())
                await trio.sleep(2.2)  # past the refresh time (half of 4 s), before expiry
                fake.respond_token_with(503, "Service Unavailable")
                outcome = await provider.send(delivery())
    assert outcome.kind == DELIVERED
    [t1] = fake.issued
    assert [r.status for r in fake.token_requests] == [200, 503]
    assert [(r.status, r.token) for r in fake.sendmail_requests] == [(202, t1), (202, t1)]


async def test_second_401_after_refresh_fails_over() -> None:
    """A 401 with the new token too is a transient failure (a route's fallback provider
    takes the message), after exactly one refresh and one retry."""
    with FakeGraph() as fake:
        for _ in range(2):
            fake.respond_error(
                401, "InvalidAuthenticationToken", "Access token validation failure."
            )
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == RETRY
    assert outcome.detail == (
        "HTTP 401: InvalidAuthenticationToken: Access token validation failure. "
        "(again with a new token)"
    )
    assert len(fake.token_requests) == 2
    assert [r.token for r in fake.sendmail_requests] == fake.issued


async def test_concurrent_sends_fetch_one_token() -> None:
    """Ten sends at once on a fresh provider wait for one (slow) token request."""
    with FakeGraph(token_delay=0.3) as fake:
        async with graph(fake) as provider:
            outcomes = []

            async def one() -> None:
                outcomes.append(await provider.send(delivery()))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(one)
    assert [o.kind for o in outcomes] == [DELIVERED] * 10
    assert len(fake.token_requests) == 1
    assert len(fake.mime) == 10


async def test_concurrent_sends_share_one_failed_token_request() -> None:
    """With a wrong secret, five concurrent sends make one token request and all fail."""
    with FakeGraph(token_delay=0.2) as fake:
        async with graph(fake, secret="wrong~secret") as provider:
            outcomes = []

            async def one() -> None:
                outcomes.append(await provider.send(delivery()))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(one)
    assert len(fake.token_requests) == 1
    assert fake.sendmail_requests == []
    assert [o.kind for o in outcomes] == [PERMANENT] * 5
    detail = outcomes[0].detail
    assert detail.startswith("token request: HTTP 401: invalid_client: AADSTS7000215")
    assert "wrong~secret" not in detail


async def test_unknown_client_is_permanent() -> None:
    """A client id the tenant does not know: permanent, with the AADSTS700016 text."""
    with FakeGraph() as fake:
        async with graph(fake, client_id="00000000-0000-0000-0000-000000000000") as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == PERMANENT
    assert "unauthorized_client: AADSTS700016" in outcome.detail


async def test_token_endpoint_503_is_retry_after() -> None:
    """A 503 from the token endpoint is a retry after its Retry-After; no sendMail is made."""
    with FakeGraph() as fake:
        fake.respond_token_with(503, "Service Unavailable", {"Retry-After": "5"})
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
                again = await provider.send(delivery())
    assert outcome.kind == RETRY
    assert outcome.retry_after == 5
    assert outcome.detail.startswith("token request: HTTP 503")
    assert again.kind == DELIVERED
    assert [r.status for r in fake.requests] == [503, 200, 202]


async def test_token_endpoint_timeout_is_retry() -> None:
    """A token endpoint slower than the timeout: retry, "timeout"."""
    with FakeGraph(token_delay=1.0) as fake:
        async with graph(fake, timeout=0.3) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == RETRY
    assert outcome.detail.startswith("token request: timeout: no answer within ")


async def test_login_endpoint_unreachable_is_retry() -> None:
    """Nothing listening at the login endpoint: retry, "connection error"."""
    with FakeGraph() as fake:
        login = f"http://127.0.0.1:{closed_port()}"
        async with graph(fake, login_endpoint=login) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == RETRY
    assert outcome.detail.startswith("token request: connection error: cannot connect to ")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("status", "code", "headers", "kind", "wait"),
    [
        (429, "ApplicationThrottled", {"Retry-After": "7"}, PACED, 7),
        (503, "ServiceNotAvailable", {"Retry-After": "2"}, RETRY, 2),
        (504, "GatewayTimeout", {}, RETRY, None),
        (403, "ErrorAccessDenied", {}, PERMANENT, None),
        (400, "ErrorInvalidRecipients", {}, PERMANENT, None),
        (413, "RequestEntityTooLarge", {}, PERMANENT, None),
    ],
)
async def test_send_scripted_graph_answers(
    status: int, code: str, headers: dict[str, str], kind: OutcomeKind, wait: float | None
) -> None:
    """Graph's throttling and server errors retry (Retry-After); refusals are permanent."""
    with FakeGraph() as fake:
        fake.respond_error(status, code, "scripted", headers)
        async with graph(fake) as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
                after = await provider.send(delivery())
    assert outcome.kind == kind
    assert outcome.retry_after == wait
    assert f"HTTP {status}: {code}: scripted" in outcome.detail
    assert after.kind == DELIVERED
    assert len(fake.token_requests) == 1


async def test_unknown_mailbox_is_permanent() -> None:
    """A user setting Graph does not know: 404 ErrorInvalidUser, permanent."""
    with FakeGraph() as fake:
        async with graph(fake, user="nobody@contoso.example") as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == PERMANENT
    assert outcome.detail.startswith("no mailbox nobody@contoso.example in the Microsoft 365")
    assert "HTTP 404: ErrorInvalidUser" in outcome.detail


async def test_send_at_4_mb_is_delivered_and_over_is_permanent_without_request() -> None:
    """A message whose base64 is exactly 4 MB goes; one byte more never reaches Graph."""
    limit = MAX_REQUEST_BYTES * 3 // 4
    with FakeGraph() as fake:
        async with graph(fake) as provider:
            with trio.fail_after(30):
                fits = await provider.send(delivery(sized(limit)))
                over = await provider.send(delivery(sized(limit + 1)))
    assert fits.kind == DELIVERED
    assert fake.mime == [sized(limit)]
    assert over.kind == PERMANENT
    assert "too large for Graph" in over.detail
    assert len(fake.sendmail_requests) == 1


async def test_graph_unreachable_is_retry() -> None:
    """Nothing listening at the Graph endpoint: retry, "connection error"."""
    with FakeGraph() as fake:
        async with graph(fake, endpoint=f"http://127.0.0.1:{closed_port()}") as provider:
            with trio.fail_after(10):
                outcome = await provider.send(delivery())
    assert outcome.kind == RETRY
    assert outcome.detail.startswith("connection error: cannot connect to 127.0.0.1:")


async def test_silent_graph_times_out_as_retry() -> None:
    """A Graph endpoint that accepts the connection and never answers: retry, "timeout"."""
    with FakeGraph() as fake:
        async with (
            silent_server() as (url, held),
            graph(fake, endpoint=url, timeout=0.5) as provider,
        ):
            with trio.fail_after(5):
                outcome = await provider.send(delivery())
    assert held
    assert outcome.kind == RETRY
    assert outcome.detail.startswith("timeout: no answer within ")


def test_fake_error_texts_come_from_the_documents() -> None:
    """The fake's documented answers are the texts in tests/provider_specs."""
    assert fake_graph.TOKEN_PARAMS == ("client_id", "scope", "client_secret", "grant_type")
    assert fake_graph.MAX_REQUEST_BYTES == MAX_REQUEST_BYTES
    status, code, text = fake_graph._send_error("bad_recipient", x="bob")
    assert (status, code) == (400, "ErrorInvalidRecipients")
    assert "Recipient 'bob' isn't resolved" in text
