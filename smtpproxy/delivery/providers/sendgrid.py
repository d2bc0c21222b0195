"""SendGrid v3 Mail Send (POST /v3/mail/send, Bearer API key).

SendGrid takes no raw MIME, so build_request() rebuilds the message from its parts
(delivery/mime.py): From with display name, Reply-To, To and Cc as in the headers but
only for addresses that are envelope recipients (SendGrid delivers to every address in
a personalization), the remaining envelope recipients as Bcc, the decoded subject, text
then HTML content, attachments and inline parts with their Content-ID, and every other
header except the ones SendGrid reserves. When no To address of the header is an
envelope recipient, each recipient gets a personalization of its own, so nobody sees
another's address. Limits from SendGrid's documentation: 1,000 recipients per request
(the consumer splits larger groups), 30 MB per request.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from smtpproxy.delivery import mime
from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome

ENDPOINTS = {"global": "https://api.sendgrid.com", "eu": "https://api.eu.sendgrid.com"}
PATH = "/v3/mail/send"
MAX_RECIPIENTS = 1000
# calls in flight by default: SendGrid publishes no concurrency limit, and at a 200 ms
# round trip, the 2,000 messages a second one process can deliver need 400 (429s halve
# it: delivery/breaker.py)
MAX_CONNECTIONS = 512
MAX_REQUEST_BYTES = 30 * 1000 * 1000
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)
NO_SUBJECT = "(no subject)"


class RequestError(ValueError):
    """The message cannot be expressed as a SendGrid request (a permanent failure)."""


def _addr(a: mime.Address, *, recipient: bool = False) -> dict[str, str]:
    out = {"email": a.email}
    name = a.name
    if recipient:  # SendGrid rejects ';' and ',' in to/cc/bcc names
        name = " ".join(name.replace(";", " ").replace(",", " ").split())
    if name:
        out["name"] = name
    return out


def _personalizations(
    parsed: mime.ParsedMessage, recipients: tuple[str, ...]
) -> list[dict[str, Any]]:
    envelope = {r.lower(): r for r in recipients}
    used: set[str] = set()

    def take(addrs: tuple[mime.Address, ...]) -> list[dict[str, str]]:
        out = []
        for a in addrs:
            key = a.email.lower()
            if key in envelope and key not in used:
                used.add(key)
                out.append(_addr(a, recipient=True))
        return out

    to = take(parsed.to)
    if not to:
        return [{"to": [{"email": r}]} for r in dict.fromkeys(envelope.values())]
    cc = take(parsed.cc)
    bcc = [{"email": r} for key, r in envelope.items() if key not in used]
    p: dict[str, Any] = {"to": to}
    if cc:
        p["cc"] = cc
    if bcc:
        p["bcc"] = bcc
    return [p]


def _headers(parsed: mime.ParsedMessage) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in parsed.headers:
        key = name.lower()
        if key in RESERVED_HEADERS or not name.isascii() or " " in name or key in seen:
            continue  # SendGrid refuses duplicate keys (in any case); keep the first
        seen.add(key)
        out[name] = value
    return out


def build_request(delivery: Delivery) -> dict[str, Any]:
    """The JSON body for one delivery. Raises RequestError when SendGrid cannot take it."""
    parsed = mime.parse(delivery.body)
    if len({r.lower() for r in delivery.recipients}) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one request")
    sender = parsed.from_ or (mime.Address(delivery.mail_from) if delivery.mail_from else None)
    if sender is None:
        raise RequestError("the message has no From address")
    if not sender.email.isascii():
        raise RequestError("SendGrid does not accept a non-ASCII From address")
    body: dict[str, Any] = {
        "personalizations": _personalizations(parsed, delivery.recipients),
        "from": _addr(sender),
        "subject": parsed.subject or NO_SUBJECT,
    }
    reply_to = list({a.email.lower(): a for a in reversed(parsed.reply_to)}.values())[::-1]
    if len(reply_to) == 1:
        body["reply_to"] = _addr(reply_to[0])
    elif reply_to:  # SendGrid wants each address once
        body["reply_to_list"] = [_addr(a) for a in reply_to]
    content = []
    if parsed.text:
        content.append({"type": "text/plain", "value": parsed.text})
    if parsed.html:
        content.append({"type": "text/html", "value": parsed.html})
    if not content:
        # SendGrid requires one non-empty content block
        content.append({"type": "text/plain", "value": " "})
    body["content"] = content
    attachments = [
        {
            "content": base64.b64encode(a.content).decode("ascii"),
            "type": a.content_type,
            "filename": a.filename.replace("\r", "").replace("\n", ""),
            "disposition": "inline" if a.inline else "attachment",
            **({"content_id": a.content_id} if a.content_id else {}),
        }
        for a in parsed.attachments
        if a.content  # SendGrid refuses empty content
    ]
    if attachments:
        body["attachments"] = attachments
    headers = _headers(parsed)
    if headers:
        body["headers"] = headers
    body["custom_args"] = {"smtpproxy_id": delivery.message_id}
    return body


def _error_detail(text: str) -> str:
    errors = http.json_object(text).get("errors") or []
    msgs = [str(e.get("message", "")) for e in errors if isinstance(e, dict)]
    if msgs:
        return "; ".join(m for m in msgs if m)
    return http.short(text)


def classify(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """202 is delivered (X-Message-Id); 429 waits for X-RateLimit-Reset or Retry-After."""
    if status in {200, 202}:
        return Outcome.delivered(headers.get("x-message-id"), detail=f"HTTP {status}")
    outcome = http.classify_status(status, headers, _error_detail(text))
    if status == 429 and outcome.retry_after is None:
        reset = headers.get("x-ratelimit-reset")
        if reset and reset.isdigit():
            wait = max(0.0, int(reset) - time.time())
            return Outcome.retry(outcome.detail, wait)
    return outcome


class SendGridProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        region = spec.setting("region", "global")
        if region not in ENDPOINTS:
            raise ProviderConfigError(f"provider {spec.name}: region must be 'global' or 'eu'")
        self._key = spec.require_secret("API key")
        self._headers = [
            ("Authorization", f"Bearer {self._key}"),
            ("Content-Type", "application/json"),
        ]
        self._client = http.open_client(
            spec.endpoint or ENDPOINTS[region],
            timeout=spec.positive("timeout", http.DEFAULT_TIMEOUT),
            max_connections=spec.positive_int("max_connections", MAX_CONNECTIONS),
        )

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            payload = json.dumps(build_request(delivery), ensure_ascii=False).encode("utf-8")
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        if len(payload) > MAX_REQUEST_BYTES:
            return Outcome.permanent("message too large for SendGrid (30 MB per request)")
        try:
            resp = await self._client.post(PATH, payload, self._headers)
        except http.TransportError as exc:
            return http.transport_failure(exc)
        return classify(resp.status, resp.headers, resp.text)

    async def aclose(self) -> None:
        await self._client.aclose()


TYPE = ProviderType(
    name="sendgrid",
    factory=SendGridProvider,
    settings={
        "region": SettingInfo("'global' (api.sendgrid.com) or 'eu' (api.eu.sendgrid.com)"),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo(
            f"calls in flight and connections kept (default {MAX_CONNECTIONS})"
        ),
    },
    secret="API key",  # noqa: S106 - names what the secret is, not a secret
    secret_required=True,
    default_endpoint=ENDPOINTS["global"],
    max_recipients=MAX_RECIPIENTS,
    max_connections=MAX_CONNECTIONS,
    # 30 MB per JSON request; attachments grow by a third in base64
    max_message_bytes=MAX_REQUEST_BYTES * 3 // 4 - 64 * 1024,
)
