"""The msgraph provider for Microsoft 365 as devices and apps use it, against the Graph
test server (tests/support/fake_graph.py): large messages as a draft with an upload
session, which mailbox sends (send_as, allowed_senders), the From display names
Exchange refuses, certificate credentials, tokens shared per app registration, and
the pace each sending mailbox declares."""

from __future__ import annotations

import datetime
import email.policy
import os
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from smtpproxy.delivery import providers
from smtpproxy.delivery.providers.base import ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.msgraph import GraphProvider
from smtpproxy.models import OutcomeKind
from tests.support import deliveries
from tests.support.deliveries import opened, wire
from tests.support.fake_graph import FakeGraph

A, B = "a@contoso.example", "b@contoso.example"
MAILBOXES = (A, B, "sender@contoso.example")


def spec(fake: FakeGraph, secret: str | None = None, **settings: Any) -> ProviderSpec:
    base = {
        "tenant_id": fake.tenant_id,
        "client_id": fake.client_id,
        "user": "sender@contoso.example",
        "login_endpoint": fake.url,
    }
    return ProviderSpec(
        name=settings.pop("name", "m365"),
        type="msgraph",
        endpoint=fake.url,
        secret=fake.client_secret if secret is None else secret,
        settings={**base, **settings},
    )


def scan(size: int, *, sender: str = f"Scanner <{A}>") -> tuple[bytes, bytes, bytes]:
    """A printer's scan: a short text, an inline logo with a Content-ID, and a PDF of
    about `size` bytes. (the message, the PDF, the logo)"""
    pdf = b"%PDF-1.4\n" + os.urandom(size)
    logo = os.urandom(40_000)
    m = EmailMessage()
    m["From"] = sender
    m["To"] = "Bob <bob@example.org>"
    m["Subject"] = "Scan from MFP-3"
    m["Message-ID"] = "<scan-1@mfp.example>"
    m["X-Mailer"] = "MFP firmware 4.2"
    m.set_content("Scanned document attached.\n")
    m.add_alternative('<p>Scanned document attached.<img src="cid:logo@mfp"></p>', subtype="html")
    html = m.get_payload()[1]
    html.add_related(logo, maintype="image", subtype="png", cid="<logo@mfp>")
    m.add_attachment(pdf, maintype="application", subtype="pdf", filename="scan 0042.pdf")
    return wire(m), pdf, logo


def delivery(body: bytes, *recipients: str, mail_from: str = A) -> Any:
    return deliveries.delivery(body, *(recipients or ("bob@example.org",)), mail_from=mail_from)


# ---------------------------------------------------------------------------- large messages


async def test_a_25_mb_scan_arrives_through_an_upload_session() -> None:
    """A 25 MB scan: a draft from the message without its PDF, the PDF through an upload
    session in 320 KiB-multiple ranges, then send. Everything arrives: the PDF byte for
    byte with its name, the inline logo with its Content-ID, the headers, and the Bcc
    recipient only in the Bcc field."""
    body, pdf, logo = scan(25 * 1000 * 1000)
    with FakeGraph(users=MAILBOXES) as fake:
        async with opened(GraphProvider(spec(fake, large_messages=True))) as provider:
            with trio.fail_after(120):
                outcome = await provider.send(
                    delivery(body, "bob@example.org", "hidden@example.net")
                )
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    assert outcome.provider_message_id == "<scan-1@mfp.example>"
    [sent] = fake.sent
    assert sent.via == "draft" and sent.user == "sender@contoso.example"
    [attached] = sent.attachments
    assert (attached.name, attached.content_type, attached.via) == (
        "scan 0042.pdf",
        "application/pdf",
        "upload",
    )
    assert attached.content == pdf
    draft = BytesParser(policy=email.policy.default).parsebytes(sent.mime)
    assert draft["Subject"] == "Scan from MFP-3" and draft["X-Mailer"] == "MFP firmware 4.2"
    assert draft["Bcc"] == "hidden@example.net"
    assert "hidden@example.net" not in str(draft["To"])
    [image] = [p for p in draft.walk() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == "<logo@mfp>" and image.get_content() == logo
    assert fake.errors == []
    assert not fake.drafts  # sent, not left behind


async def test_attachments_under_3_mb_go_in_one_request_each() -> None:
    """A 5 MB message of two 2 MB attachments: the draft takes what fits, the rest are
    posted as fileAttachments (no upload session)."""
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = A, "bob@example.org", "two files"
    m.set_content("two files\n")
    files = [os.urandom(2_000_000) for _ in range(2)]
    for n, content in enumerate(files):
        m.add_attachment(content, maintype="application", subtype="zip", filename=f"f{n}.zip")
    with FakeGraph(users=MAILBOXES) as fake:
        async with opened(GraphProvider(spec(fake, large_messages=True))) as provider:
            with trio.fail_after(60):
                outcome = await provider.send(delivery(wire(m)))
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    [sent] = fake.sent
    draft = BytesParser(policy=email.policy.default).parsebytes(sent.mime)
    in_draft = [p.get_content() for p in draft.iter_attachments()]
    posted = [a.content for a in sent.attachments]
    assert sorted(in_draft + posted) == sorted(files)
    assert {a.via for a in sent.attachments} == {"request"}
    assert fake.errors == []


async def test_large_mail_without_the_setting_is_refused_before_any_request() -> None:
    body, _, _ = scan(6 * 1000 * 1000)
    with FakeGraph(users=MAILBOXES) as fake:
        async with opened(GraphProvider(spec(fake))) as provider:
            with trio.fail_after(30):
                outcome = await provider.send(delivery(body))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "large_messages" in outcome.detail and "Mail.ReadWrite" in outcome.detail
    assert fake.requests == []


async def test_a_draft_is_deleted_when_sending_it_fails() -> None:
    """Send As denied at send: permanent, with what to grant; the draft is deleted."""
    body, _, _ = scan(5 * 1000 * 1000)
    with FakeGraph(users=MAILBOXES, send_as_denied=("sender@contoso.example",)) as fake:
        async with opened(GraphProvider(spec(fake, large_messages=True))) as provider:
            with trio.fail_after(60):
                outcome = await provider.send(delivery(body))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "application access policy" in outcome.detail
    assert fake.sent == [] and not fake.drafts and len(fake.deleted) == 1


# ---------------------------------------------------------------------------- who sends


async def test_send_as_the_sender_when_allowed_else_the_user() -> None:
    """send_as sender: an allowed envelope sender's own mailbox sends (else an allowed
    header From's); a sender outside allowed_senders is sent as `user`; without a
    `user` it is refused, saying why."""
    plain = wire(deliveries.message(sender="App <app@elsewhere.example>"))
    with FakeGraph(users=MAILBOXES) as fake:
        settings = {"send_as": "sender", "allowed_senders": "*@contoso.example"}
        async with opened(GraphProvider(spec(fake, **settings))) as provider:
            with trio.fail_after(30):
                own = await provider.send(delivery(plain, mail_from=B))
                other = await provider.send(delivery(plain, mail_from="app@elsewhere.example"))
        no_user = GraphProvider(spec(fake, user="", **settings))
        async with opened(no_user):
            refused = await no_user.send(delivery(plain, mail_from="app@elsewhere.example"))
    assert (own.kind, other.kind) == (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED)
    assert [s.user for s in fake.sent] == [B, "sender@contoso.example"]
    assert refused.kind == OutcomeKind.PERMANENT
    assert "app@elsewhere.example may not send" in refused.detail


async def test_send_as_from_uses_the_header_from() -> None:
    body = wire(deliveries.message(sender=f"Front desk <{B}>"))
    with FakeGraph(users=MAILBOXES) as fake:
        provider = GraphProvider(spec(fake, send_as="from", allowed_senders=[B]))
        async with opened(provider):
            with trio.fail_after(30):
                outcome = await provider.send(delivery(body, mail_from=A))
    assert outcome.kind == OutcomeKind.DELIVERED
    assert [s.user for s in fake.sent] == [B]


async def test_a_from_display_name_with_an_at_sign_is_dropped() -> None:
    """Scanners write `"scanner@corp" <scanner@corp>`; Exchange refuses it as if Send As
    were denied. The display name is dropped, the address kept, nothing else changes."""
    body = wire(deliveries.message(sender=f'"{A}" <{A}>'))
    with FakeGraph(users=MAILBOXES) as fake:
        async with opened(GraphProvider(spec(fake, user=A))) as provider:
            with trio.fail_after(30):
                outcome = await provider.send(delivery(body))
    assert outcome.kind == OutcomeKind.DELIVERED, outcome
    [sent] = fake.sent
    head, _, rest = sent.mime.partition(b"\r\n\r\n")
    assert f"From: {A}".encode() in head.split(b"\r\n")
    assert rest == body.partition(b"\r\n\r\n")[2]


async def test_unknown_mailbox_says_what_to_check() -> None:
    plain = wire(deliveries.message(sender=A))
    with FakeGraph(users=MAILBOXES) as fake:
        settings = {"send_as": "sender", "allowed_senders": "contoso.example"}
        async with opened(GraphProvider(spec(fake, **settings))) as provider:
            with trio.fail_after(30):
                outcome = await provider.send(delivery(plain, mail_from="nobody@contoso.example"))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("no mailbox nobody@contoso.example")


def test_pace_is_per_mailbox_with_exchanges_limits() -> None:
    with FakeGraph(users=MAILBOXES) as fake:
        provider = GraphProvider(spec(fake, send_as="sender", allowed_senders="contoso.example"))
        pace_a = provider.pace(delivery(b"From: x@y\r\n\r\nhi\r\n", mail_from=A))
        pace_b = provider.pace(delivery(b"From: x@y\r\n\r\nhi\r\n", mail_from=B))
        slow = GraphProvider(spec(fake, name="slow", messages_per_minute=5, user=A))
        pace_slow = slow.pace(delivery(b"From: x@y\r\n\r\nhi\r\n"))
    assert pace_a is not None and pace_b is not None and pace_slow is not None
    assert pace_a.key != pace_b.key and pace_a.label == A
    assert (pace_a.per_minute, pace_a.recipients_per_day, pace_a.concurrency) == (30, 10000, 4)
    assert pace_slow.per_minute == 5 and pace_slow.key == pace_a.key  # the same mailbox


# ---------------------------------------------------------------------------- credentials


def certificate_pem() -> tuple[str, bytes]:
    """An RSA key and a self-signed certificate as one PEM text, and the certificate's
    DER (what the app registration holds)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtpproxy test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return pem.decode(), cert.public_bytes(serialization.Encoding.DER)


async def test_certificate_credentials_sign_a_client_assertion() -> None:
    """auth = certificate: the token request carries a PS256 client assertion the
    identity platform checks against the registered certificate; another certificate
    is refused (invalid_client), permanently."""
    pem, der = certificate_pem()
    other_pem, _ = certificate_pem()
    plain = wire(deliveries.message(sender=A))
    with FakeGraph(users=MAILBOXES, certificate=der) as fake:
        async with opened(GraphProvider(spec(fake, secret=pem, auth="certificate"))) as good:
            with trio.fail_after(30):
                sent = await good.send(delivery(plain))
        bad = GraphProvider(spec(fake, name="other", secret=other_pem, auth="certificate"))
        async with opened(bad):
            refused = await bad.send(delivery(plain))
    assert sent.kind == OutcomeKind.DELIVERED
    first = fake.token_requests[0].form
    assert "client_secret" not in first and first["client_assertion"].count(".") == 2
    assert refused.kind == OutcomeKind.PERMANENT
    assert "invalid_client" in refused.detail and "AADSTS700027" in refused.detail


def test_a_wrong_certificate_secret_is_refused_when_the_provider_is_built() -> None:
    """`provider add` builds the provider: a key that is not the certificate's, a
    missing certificate or key, are refused then with what is wrong."""
    pem, _ = certificate_pem()
    other, _ = certificate_pem()
    key_part, cert_part = pem.split("-----BEGIN CERTIFICATE-----")
    other_cert = "-----BEGIN CERTIFICATE-----" + other.split("-----BEGIN CERTIFICATE-----")[1]
    cases = {
        key_part + other_cert: "does not belong to the certificate",
        key_part: "no PEM certificate",
        "-----BEGIN CERTIFICATE-----" + cert_part: "no unencrypted PEM private key",
    }
    with FakeGraph() as fake:
        for secret, says in cases.items():
            with pytest.raises(ProviderConfigError, match=says):
                providers.build(spec(fake, secret=secret, auth="certificate"))


async def test_one_token_per_app_registration() -> None:
    """Two providers of one app registration (one per mailbox, say) share a token."""
    plain = wire(deliveries.message(sender=A))
    with FakeGraph(users=MAILBOXES) as fake:
        first = GraphProvider(spec(fake, name="first", user=A))
        second = GraphProvider(spec(fake, name="second", user=B))
        async with opened(first), opened(second):
            with trio.fail_after(30):
                await first.send(delivery(plain))
                await second.send(delivery(plain))
    assert len(fake.token_requests) == 1
    assert [s.user for s in fake.sent] == [A, B]
