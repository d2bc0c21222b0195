"""Postmark Email API (POST /email, X-Postmark-Server-Token).

Postmark takes no raw MIME, so build_request() rebuilds the message from its parts
(delivery/mime.py):

- From with its display name, RFC 5322 formatted by email.utils.formataddr: a name
  with specials is quoted, a non-ASCII name is an RFC 2047 encoded word; IDN domains go
  out in punycode. Postmark checks addresses against ASCII patterns (its ErrorCode 300
  article), so a non-ASCII local part is refused here.
- To and Cc as in the headers (names kept) but only the addresses that are envelope
  recipients (Postmark delivers to every address it is given); the remaining envelope
  recipients as Bcc, so a Bcc recipient never shows in To or Cc. All three are
  comma-separated strings.
- Postmark requires To. When no To address of the header is an envelope recipient, the
  Cc ones move to To (everybody saw them already); when none of those is one either
  (only hidden recipients, such as Bcc copies routed apart), each recipient gets a
  request of its own with To set to it, so nobody sees another's address. The results
  are combined by combine(): a request per recipient can succeed for some and fail for
  others, and the delivered outcome then names the others as deferred or rejected.
- Subject (decoded), TextBody and HtmlBody (Postmark requires one: a message with
  neither gets a TextBody of one space), ReplyTo, Attachments (base64 Content, Name,
  ContentType; inline parts with a Content-ID get ContentID "cid:<id>", as Postmark's
  inline-image docs show), MessageStream (setting ``message_stream``, default
  "outbound") and Metadata {"smtpproxy_id": <message id>}.
- Headers: every other header as {"Name", "Value"}, in order, except the ones Postmark
  writes itself from the fields above (From, To, Cc, Bcc, Subject, Reply-To,
  Content-Type, Content-Transfer-Encoding, MIME-Version) and Date: Postmark composes the
  message and stamps it with its own Date when it sends, and RFC 5322 3.6 allows one
  Date field only. Trace and signature fields (Received, Return-Path, DKIM-Signature,
  ARC-*) are dropped too: they describe or sign the original message, which Postmark
  does not send, and a stale DKIM signature fails verification. Message-ID, In-Reply-To,
  References, List-* and X-* headers are passed on, so threads stay threads.
- Header text sent as raw UTF-8 (RFC 6532: names, IDN addresses) is read as UTF-8;
  mime.parse() leaves such bytes of address headers as surrogate escapes.

Limits from Postmark's documentation: 50 recipients per message, To, Cc and Bcc
together (ErrorCode 300 article); TextBody and HtmlBody up to 5 MB each and 10 MB per
message, counted on the request with attachments in base64 (size-limits article,
HTTP 413 in the API overview). All are refused here, permanently, before any request.

Classification (codes from Postmark's API overview, "HTTP response codes" and "API
error codes"):
- 2xx with ErrorCode 0 (or none): delivered, MessageID as the provider message id.
  Its Message may say "Message OK, but will not deliver to these inactive addresses:
  ..." (some recipients are suppressed after a hard bounce or complaint): delivered,
  with those named as rejected. The same text with ErrorCode 406 is read the same way:
  the message went to the others, and failing or retrying it would misreport that.
- 401 (ErrorCode 10, bad or missing server token): permanent.
- 408, 429 (ErrorCode 429, rate limit exceeded), 500 (internal error) and 503
  (ErrorCode 100, maintenance) and any other 5xx: retry, honouring Retry-After.
- 422 by ErrorCode, retried: 100 maintenance; 405 not allowed to send (the account has
  run out of credits: a quota, like a rate limit, that buying credits lifts without any
  change to the request); 429 rate limit exceeded.
- 422 by ErrorCode, permanent, since the same request will fail the same way: 300
  invalid email request (validation: addresses, recipients, bodies, sizes); 400 sender
  signature not found; 401 sender signature not confirmed; 402 invalid JSON; 403
  invalid request field(s); 406 inactive recipient (every recipient suppressed);
  409 JSON required; 411 forbidden attachment type; 412 account pending (may only send
  to its own domain); 413 account may not send; 1235/1236 unknown message stream or
  one that cannot send; any other code.
- 404, 413 (payload too large), 415 (Accept/Content-Type not JSON) and any other 4xx:
  permanent. Transport errors and timeouts: retry.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from smtpproxy.delivery import mime
from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome, OutcomeKind

ENDPOINT = "https://api.postmarkapp.com"
PATH = "/email"
DEFAULT_STREAM = "outbound"
MAX_RECIPIENTS = 50
MAX_REQUEST_BYTES = 10 * 1024 * 1024
MAX_CONNECTIONS = 256  # calls in flight by default (429s halve it: delivery/breaker.py)
MAX_BODY_BYTES = 5 * 1024 * 1024  # TextBody and HtmlBody, each
EMPTY_BODY = " "
# written by Postmark from the request's fields, or stamped by Postmark when it sends
BUILT_BY_POSTMARK = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
        "date",
    }
)
# trace and signature fields of the original message, wrong on the one Postmark sends
NOT_PASSED_ON = frozenset(
    {
        "received",
        "return-path",
        "dkim-signature",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
    }
)
ERROR_CODES: Mapping[int, str] = {
    10: "bad or missing API token",
    100: "maintenance",
    300: "invalid email request",
    400: "sender signature not found",
    401: "sender signature not confirmed",
    402: "invalid JSON",
    403: "invalid request field(s)",
    405: "not allowed to send (out of credits)",
    406: "inactive recipient",
    409: "JSON required",
    411: "forbidden attachment type",
    412: "account is pending",
    413: "account may not send",
    429: "rate limit exceeded",
    1235: "message stream not found",
    1236: "message stream cannot send",
}
RETRY_ERROR_CODES = frozenset({100, 405, 429})
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_PARTLY_INACTIVE = re.compile(
    r"will not deliver to these inactive addresses:\s*(.+?)\.?\s*(?:Inactive recipients.*)?$",
    re.IGNORECASE | re.DOTALL,
)


class RequestError(ValueError):
    """The message cannot be expressed as a Postmark request (a permanent failure)."""


@attrs.frozen
class PostmarkRequest:
    """One POST /email: the JSON body and the envelope recipients it delivers to."""

    recipients: tuple[str, ...]
    body: dict[str, Any] = attrs.field(repr=False)


def _text(value: str) -> str:
    """value with raw 8-bit header bytes read as UTF-8 (RFC 6532).

    The email parser keeps such bytes as surrogate escapes, which cannot be encoded;
    bytes that are not UTF-8 become U+FFFD.
    """
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return value.encode("utf-8", "replace").decode("utf-8")


def _addr_spec(address: str) -> str:
    local, at, domain = _text(address).rpartition("@")
    if not at or not local or not domain:
        raise RequestError(f"not an email address: {address!r}")
    if not local.isascii():
        raise RequestError("Postmark does not accept a non-ASCII local part")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise RequestError(f"not a valid domain: {domain!r}") from None
    return f"{local}@{domain}"


def format_address(address: mime.Address) -> str:
    """An address as Postmark takes it: 'Name <a@b>', quoted or RFC 2047 encoded."""
    spec = _addr_spec(address.email)
    name = " ".join(_text(address.name).split())  # no CR, LF or tabs in a name
    return email.utils.formataddr((name, spec)) if name else spec


def _join(addresses: Sequence[mime.Address]) -> str:
    return ", ".join(format_address(a) for a in addresses)


def _headers(parsed: mime.ParsedMessage) -> list[dict[str, str]]:
    out = []
    for name, value in parsed.headers:
        key = name.lower()
        if key in BUILT_BY_POSTMARK or key in NOT_PASSED_ON or not _HEADER_NAME.fullmatch(name):
            continue
        out.append({"Name": name, "Value": " ".join(_text(value).splitlines())})
    return out


def _attachments(parsed: mime.ParsedMessage) -> list[dict[str, str]]:
    out = []
    for a in parsed.attachments:
        item = {
            "Name": _text(a.filename).replace("\r", "").replace("\n", ""),
            "Content": base64.b64encode(a.content).decode("ascii"),
            "ContentType": a.content_type,
        }
        if a.inline and a.content_id:
            item["ContentID"] = f"cid:{a.content_id}"
        out.append(item)
    return out


def _common(delivery: Delivery, parsed: mime.ParsedMessage, stream: str) -> dict[str, Any]:
    """The fields every request of a delivery shares (all but To, Cc and Bcc)."""
    sender = parsed.from_ or (mime.Address(delivery.mail_from) if delivery.mail_from else None)
    if sender is None:
        raise RequestError("the message has no From address")
    body: dict[str, Any] = {"From": format_address(sender)}
    if parsed.subject:
        body["Subject"] = _text(parsed.subject)
    for key, text in (("TextBody", parsed.text), ("HtmlBody", parsed.html)):
        if text:
            if len(text.encode("utf-8")) > MAX_BODY_BYTES:
                raise RequestError(f"{key} larger than Postmark's 5 MB")
            body[key] = text
    if "TextBody" not in body and "HtmlBody" not in body:
        body["TextBody"] = EMPTY_BODY  # Postmark requires a body
    if parsed.reply_to:
        body["ReplyTo"] = _join(parsed.reply_to)
    headers = _headers(parsed)
    if headers:
        body["Headers"] = headers
    attachments = _attachments(parsed)
    if attachments:
        body["Attachments"] = attachments
    body["MessageStream"] = stream
    body["Metadata"] = {"smtpproxy_id": delivery.message_id}
    return body


def build_request(
    delivery: Delivery, *, message_stream: str = DEFAULT_STREAM
) -> tuple[PostmarkRequest, ...]:
    """The requests for one delivery (one, unless only hidden recipients; see above).

    Raises RequestError when Postmark cannot take the message.
    """
    envelope: dict[str, str] = {}  # each address once, as first spelled, in order
    for r in delivery.recipients:
        envelope.setdefault(r.lower(), r)
    if not envelope:
        raise RequestError("no recipients")
    if len(envelope) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one message")
    parsed = mime.parse(delivery.body)
    common = _common(delivery, parsed, message_stream)
    used: set[str] = set()

    def take(addresses: tuple[mime.Address, ...]) -> list[mime.Address]:
        out = []
        for a in addresses:
            key = _text(a.email).lower()
            if key in envelope and key not in used:
                used.add(key)
                out.append(a)
        return out

    to, cc = take(parsed.to), take(parsed.cc)
    if not to:
        to, cc = cc, []  # Cc addresses were visible to every recipient anyway
    if not to:
        return tuple(
            PostmarkRequest((r,), {**common, "To": _addr_spec(r)}) for r in envelope.values()
        )
    body = {**common, "To": _join(to)}
    if cc:
        body["Cc"] = _join(cc)
    bcc = [r for key, r in envelope.items() if key not in used]
    if bcc:
        body["Bcc"] = ", ".join(_addr_spec(r) for r in bcc)
    return (PostmarkRequest(tuple(envelope.values()), body),)


def encode(body: Mapping[str, Any]) -> bytes:
    """The request body as sent; RequestError when over Postmark's 10 MB."""
    # "replace": a stray surrogate must not stop the message (it becomes "?")
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestError("message too large for Postmark (10 MB per message)")
    return payload


def _answer(text: str) -> tuple[int | None, str, Mapping[str, Any]]:
    """ErrorCode, Message and the whole object of a Postmark JSON answer."""
    try:
        data = json.loads(text)
    except ValueError:
        return None, http.short(text), {}
    if not isinstance(data, dict):
        return None, http.short(text), {}
    code = data.get("ErrorCode")
    message = data.get("Message")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        http.short(message) if isinstance(message, str) else "",
        data,
    )


def _inactive(message: str, recipients: Sequence[str]) -> tuple[str, ...]:
    """The recipients a "Message OK, but will not deliver to ..." answer names."""
    found = _PARTLY_INACTIVE.search(message)
    if not found:
        return ()
    spelled = {r.lower(): r for r in recipients}
    named = [a.strip() for a in found.group(1).split(",") if a.strip()]
    return tuple(spelled.get(a.lower(), a) for a in named)


def classify(
    status: int, headers: Mapping[str, str], text: str, recipients: Sequence[str] = ()
) -> Outcome:
    """The outcome of Postmark's answer (table in the module docstring).

    recipients: the envelope recipients of the request, to name the inactive ones in
    the envelope's own spelling.
    """
    code, message, data = _answer(text)
    rejected = _inactive(message, recipients)
    if rejected and code in (0, 406, None) and status < 500:
        if recipients and {r.lower() for r in rejected} >= {r.lower() for r in recipients}:
            return Outcome.permanent(f"HTTP {status}: every recipient is inactive: {message}")
        message_id = data.get("MessageID")
        return Outcome(
            OutcomeKind.DELIVERED,
            f"HTTP {status}: {message}",
            message_id if isinstance(message_id, str) else None,
            rejected=rejected,
        )
    if 200 <= status < 300 and not code:
        message_id = data.get("MessageID")
        return Outcome.delivered(
            message_id if isinstance(message_id, str) and message_id else None,
            detail=f"HTTP {status}",
        )
    if code is not None:
        name = ERROR_CODES.get(code, "error")
        detail = f"ErrorCode {code} ({name}): {message}" if message else f"ErrorCode {code}"
    else:
        detail = message
    if code in RETRY_ERROR_CODES:
        text_ = f"HTTP {status}: {detail}"
        return Outcome.retry(text_, http.parse_retry_after(headers.get("retry-after")))
    if 200 <= status < 300:  # a 2xx answer that names an error
        return Outcome.permanent(f"HTTP {status}: {detail}")
    return http.classify_status(status, headers, detail)


def combine(results: Sequence[tuple[tuple[str, ...], Outcome]]) -> Outcome:
    """One outcome for several requests of one delivery, each (its recipients, outcome).

    All delivered: delivered (message ids comma-separated). None delivered: retry when
    any failure is transient (waiting the longest Retry-After asked), else permanent.
    Some delivered: delivered, naming the recipients of the failed requests as deferred
    (transient) or rejected (permanent), so only they are tried again.
    """
    if len(results) == 1:
        return results[0][1]
    done = [(r, o) for r, o in results if o.kind == OutcomeKind.DELIVERED]
    failed = [(r, o) for r, o in results if o.kind != OutcomeKind.DELIVERED]
    retry = [(r, o) for r, o in failed if o.kind == OutcomeKind.RETRY]
    permanent = [(r, o) for r, o in failed if o.kind == OutcomeKind.PERMANENT]
    details = "; ".join(f"{', '.join(r)}: {o.detail}" for r, o in failed)
    if not done:
        if retry:
            waits = [o.retry_after for _, o in retry if o.retry_after is not None]
            return Outcome.retry(details, max(waits) if waits else None)
        return Outcome.permanent(details)
    ids = [o.provider_message_id for _, o in done if o.provider_message_id]
    summary = f"{len(done)} of {len(results)} messages accepted"
    return Outcome(
        OutcomeKind.DELIVERED,
        f"{summary}; {details}" if details else summary,
        ",".join(ids) or None,
        deferred=tuple(x for r, _ in retry for x in r),
        rejected=tuple(
            [x for r, _ in permanent for x in r] + [x for _, o in done for x in o.rejected]
        ),
    )


class PostmarkProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        stream = spec.setting("message_stream", DEFAULT_STREAM)
        if not isinstance(stream, str) or not stream.strip():
            raise ProviderConfigError(f"provider {spec.name}: setting 'message_stream' is empty")
        self._stream = stream.strip()
        self._token = spec.require_secret("server token")
        self._headers = [
            ("X-Postmark-Server-Token", self._token),
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
        ]
        self._client = http.open_client(
            spec.endpoint or ENDPOINT,
            timeout=spec.positive("timeout", http.DEFAULT_TIMEOUT),
            max_connections=spec.positive_int("max_connections", MAX_CONNECTIONS),
        )

    async def _post(self, recipients: tuple[str, ...], payload: bytes) -> Outcome:
        try:
            resp = await self._client.post(PATH, payload, self._headers)
        except http.TransportError as exc:
            return http.transport_failure(exc)
        outcome = classify(resp.status, resp.headers, resp.text, recipients)
        if self._token in outcome.detail:  # should an answer ever echo the token
            outcome = attrs.evolve(outcome, detail=outcome.detail.replace(self._token, "[secret]"))
        return outcome

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            requests = build_request(delivery, message_stream=self._stream)
            payloads = [(r.recipients, encode(r.body)) for r in requests]
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        if len(payloads) == 1:
            return await self._post(*payloads[0])
        outcomes: list[Outcome] = [Outcome.retry("not sent")] * len(payloads)

        async def post_one(i: int) -> None:
            outcomes[i] = await self._post(*payloads[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(payloads)):
                nursery.start_soon(post_one, i)
        return combine([(r, o) for (r, _), o in zip(payloads, outcomes, strict=True)])

    async def aclose(self) -> None:
        await self._client.aclose()


TYPE = ProviderType(
    name="postmark",
    factory=PostmarkProvider,
    settings={
        "message_stream": SettingInfo("the message stream to send through (default outbound)"),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo(
            f"calls in flight and connections kept (default {MAX_CONNECTIONS})"
        ),
    },
    secret="server token",  # noqa: S106 - names what the secret is, not a secret
    secret_required=True,
    default_endpoint=ENDPOINT,
    max_recipients=MAX_RECIPIENTS,
    max_connections=MAX_CONNECTIONS,
    # the raw message becomes base64 attachments and JSON text: about 4/3 of it
    max_message_bytes=MAX_REQUEST_BYTES * 3 // 4 - 32 * 1024,
)
