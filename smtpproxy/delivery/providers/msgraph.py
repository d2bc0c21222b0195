"""Microsoft Graph: Microsoft 365 mailboxes send the mail (sendMail with MIME content, or
a draft and its attachments for large messages).

Small mail takes one request, Graph's documented way to send a MIME message: POST
/v1.0/users/{mailbox}/sendMail with the whole message base64-encoded, Content-Type
text/plain (learn.microsoft.com/graph/api/user-sendmail). Success is 202 with no body:
the answer's request-id (else the client-request-id sent with every request) names it.

Large mail (setting large_messages, which needs Mail.ReadWrite besides Mail.Send): a
request carries at most 4 MB, so a bigger message becomes a draft created from its
MIME without its largest attachments (POST /users/{mailbox}/messages), those
attachments are added to it, under 3 MB each in one request (POST .../attachments) and
larger ones through an upload session (POST .../attachments/createUploadSession, then
ranged PUTs of at most 4 MB to the pre-authenticated upload URL), and the draft is sent
(POST .../messages/{id}/send). A draft left by a failure on the way is deleted.

Which mailbox sends (send_as): the `user` setting always (`user`, the default), or the
envelope sender (`sender`, else the header From) or the header From (`from`, else the
envelope sender) when it is allowed by `allowed_senders` (addresses, `*@domain` or
domains); a sender it does not allow is sent as `user` when that is set, else refused.
Exchange's ErrorSendAsDenied and an unknown mailbox are permanent failures that say
what to grant.

Pacing: Exchange Online lets a mailbox send 30 messages a minute and 10,000 recipients a
day, and an application make 4 requests at once per mailbox. pace() names the sending
mailbox and these limits (settings messages_per_minute, recipients_per_day,
concurrent_requests) and delivery/pacing.py keeps every mailbox to them; a 429 for a
mailbox (MailboxConcurrency, ApplicationThrottled) holds that mailbox alone for its
Retry-After.

Credentials (graphauth.py): the client secret, or a certificate (auth = certificate,
the secret then holding the PEM private key and certificate), tokens cached per app
registration. When Graph answers 401 the token is fetched again once and the request
sent once more; a second 401 is a transient failure, so a route's fallback provider
takes the message.

save_to_sent_items: Graph's MIME sendMail and send both keep a copy in the mailbox's
Sent Items and have no way to say otherwise (microsoftgraph/microsoft-graph-docs issue
18698); false is therefore a configuration error rather than a promise Graph would
not keep.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from smtpproxy.delivery.pacing import Pace
from smtpproxy.delivery.providers import graphauth, graphmime, http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.delivery.providers.graphauth import classify_token, parse_token
from smtpproxy.delivery.providers.graphmime import (
    MAX_RECIPIENTS,
    MAX_REQUEST_BYTES,
    RequestError,
    build_request,
    prepare_mime,
)
from smtpproxy.mail.domains import domain_of
from smtpproxy.models import Outcome, OutcomeKind

__all__ = [  # what tests and the registry read here
    "MAX_REQUEST_BYTES",
    "TYPE",
    "GraphProvider",
    "RequestError",
    "build_request",
    "classify",
    "classify_token",
    "message_id",
    "parse_token",
    "prepare_mime",
]

GRAPH_ENDPOINT = "https://graph.microsoft.com"
LOGIN_ENDPOINT = "https://login.microsoftonline.com"
UPLOAD_CHUNK = 10 * 320 * 1024  # bytes per PUT: a multiple of 320 KiB under 4 MB
UPLOAD_MAX = 150 * 1024 * 1024  # an attachment through an upload session
EXCHANGE_MESSAGE_MAX = 35 * 1024 * 1024  # Exchange Online's default message size limit
SEND_AS = ("user", "sender", "from")
# Exchange errors that say "later", whatever the status that carries them
TRANSIENT_CODES = frozenset(
    {
        "ApplicationThrottled",
        "MailboxConcurrency",
        "ErrorServerBusy",
        "ErrorTooManyObjectsOpened",
        "ErrorSubmissionQuotaExceeded",
        "ErrorMailboxStoreUnavailable",
        "ErrorConnectionFailed",
        "ErrorTimeoutExpired",
        "ErrorInternalServerTransientError",
        "activityLimitReached",
    }
)
# what to do about a refusal that names the mailbox
SEND_AS_DENIED = (
    "Exchange refused to send as {mailbox} (ErrorSendAsDenied): give the app access to "
    "this mailbox (include it in the app's application access policy; for a shared "
    "mailbox, grant Send As), or send as another mailbox"
)
NO_MAILBOX = (
    "no mailbox {mailbox} in the Microsoft 365 tenant ({detail}): check the provider's "
    "user and send_as settings, and that the sender is a mailbox (not an alias)"
)
ACCESS_DENIED = (
    "Microsoft Graph denied the app access to {mailbox} ({detail}): grant admin consent "
    "for Mail.Send (and Mail.ReadWrite with large_messages), and include this mailbox in "
    "the app's application access policy"
)


# ---------------------------------------------------------------------------- answers


def _graph_error(text: str) -> tuple[str, str]:
    """(code, message) of Graph's {"error": {"code", "message"}} body."""
    error = http.json_object(text).get("error")
    if not isinstance(error, dict):
        return "", http.short(text)
    return str(error.get("code") or ""), http.short(str(error.get("message") or ""))


def message_id(headers: Mapping[str, str]) -> str | None:
    """Graph's name for the request: request-id, else client-request-id."""
    return headers.get("request-id") or headers.get("client-request-id") or None


def _advice(status: int, code: str) -> str | None:
    """What to grant or check for a refusal that is about the mailbox or the app's rights."""
    if code == "ErrorSendAsDenied":
        return SEND_AS_DENIED
    if status == 403 and code in ("ErrorAccessDenied", "AccessDenied"):
        return ACCESS_DENIED
    if code in ("ErrorInvalidUser", "MailboxNotEnabledForRESTAPI", "ResourceNotFound"):
        return NO_MAILBOX
    if status == 404 and code == "ErrorItemNotFound":
        return NO_MAILBOX
    return None


def classify(status: int, headers: Mapping[str, str], text: str, mailbox: str = "") -> Outcome:
    """An answer of Graph: 2xx delivered; a 429 throttles the mailbox (paced, after
    Retry-After); 5xx and Exchange's "later" codes retry; ErrorSendAsDenied, access
    denied and an unknown mailbox are permanent and say what to grant; other 4xx
    (invalid recipients, MIME, 401, 413) are permanent."""
    if 200 <= status < 300:
        return Outcome.delivered(message_id(headers), detail=f"HTTP {status}")
    code, message = _graph_error(text)
    detail = f"{code}: {message}" if code and message else code or message
    wait = http.parse_retry_after(headers.get("retry-after"))
    if status == 429:
        return Outcome.paced(f"HTTP 429: {detail}", 60.0 if wait is None else wait)
    if code in TRANSIENT_CODES:
        return Outcome.retry(f"HTTP {status}: {detail}", wait)
    advice = _advice(status, code)
    if advice:
        return Outcome.permanent(
            advice.format(mailbox=mailbox or "this mailbox", detail=f"HTTP {status}: {detail}")
        )
    return http.classify_status(status, headers, detail)


# ---------------------------------------------------------------------------- settings


def _bool(spec: ProviderSpec, key: str, default: bool) -> bool:
    value = spec.setting(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ProviderConfigError(f"provider {spec.name}: {key} must be true or false")


def _senders(spec: ProviderSpec) -> tuple[str, ...]:
    value = spec.setting("allowed_senders", ())
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(str(v).strip().lower() for v in items if str(v).strip())


def sender_allowed(address: str, allowed: Sequence[str]) -> bool:
    """An address against allowed_senders: a whole address, `*@domain` or a domain."""
    address = address.strip().lower()
    domain = domain_of(address)
    return any(a == address or a in (f"*@{domain}", domain) for a in allowed)


def message_limit(spec: ProviderSpec) -> int:
    """The largest message this provider can send: one request's worth of MIME, or with
    large_messages Exchange's default message size limit (35 MB; an operator whose
    tenant allows more raises it with max_message_bytes, up to 150 MB)."""
    if not _bool(spec, "large_messages", False):
        return MAX_REQUEST_BYTES * 3 // 4 - 32 * 1024
    own = spec.settings.get("max_message_bytes")
    if isinstance(own, int) and own > 0:
        return min(own, UPLOAD_MAX)
    return EXCHANGE_MESSAGE_MAX


# ---------------------------------------------------------------------------- the provider


@attrs.frozen
class _Answer:
    response: http.Response
    request_id: str  # the client-request-id it was sent with

    def outcome(self, mailbox: str) -> Outcome:
        r = self.response
        return classify(r.status, r.headers, r.text, mailbox)


class GraphProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.tenant = str(spec.require("tenant_id"))
        client_id = str(spec.require("client_id"))
        self.send_as = str(spec.setting("send_as") or "user")
        if self.send_as not in SEND_AS:
            raise ProviderConfigError(
                f"provider {spec.name}: send_as must be one of {', '.join(SEND_AS)}"
            )
        self.user = str(spec.setting("user") or "").strip()
        if self.send_as == "user" and not self.user:
            raise ProviderConfigError(f"provider {spec.name}: setting 'user' is required")
        self.allowed = _senders(spec)
        if self.send_as != "user" and not self.allowed:
            raise ProviderConfigError(
                f"provider {spec.name}: send_as {self.send_as} needs allowed_senders "
                "(the addresses or domains that may send as themselves)"
            )
        if not _bool(spec, "save_to_sent_items", True):
            raise ProviderConfigError(
                f"provider {spec.name}: save_to_sent_items cannot be false: Graph's MIME "
                "sendMail always saves a copy in Sent Items"
            )
        self.large = _bool(spec, "large_messages", False)
        self.limits = (
            spec.positive_int("messages_per_minute", 30),
            spec.positive_int("recipients_per_day", 10_000),
            spec.positive_int("concurrent_requests", 4),
        )
        self.app = self._app(spec, client_id)
        self._tokens = graphauth.CACHE.tokens(self.app)
        timeout = spec.positive("timeout", http.DEFAULT_TIMEOUT)
        self._timeout = timeout
        self._graph = http.open_client(
            spec.endpoint or GRAPH_ENDPOINT,
            timeout=timeout,
            max_connections=spec.positive_int("max_connections", TYPE.max_connections),
        )
        self._login = http.open_client(self.app.login_endpoint, timeout=timeout, max_connections=2)
        self._uploads: dict[str, http.Client] = {}  # upload URLs' origins

    @staticmethod
    def _app(spec: ProviderSpec, client_id: str) -> graphauth.App:
        login = str(spec.setting("login_endpoint") or LOGIN_ENDPOINT)
        scope = str(spec.setting("scope") or graphauth.SCOPE)
        tenant = str(spec.require("tenant_id"))
        auth = str(spec.setting("auth") or "secret")
        if auth == "secret":
            secret = spec.require_secret("client secret")
            return graphauth.App.of(login, tenant, client_id, scope, secret=secret)
        if auth == "certificate":
            pem = spec.require_secret("PEM private key and certificate")
            try:
                cert = graphauth.Certificate.from_pem(pem)
            except graphauth.CredentialError as exc:
                raise ProviderConfigError(f"provider {spec.name}: {exc}") from None
            return graphauth.App.of(login, tenant, client_id, scope, certificate=cert)
        raise ProviderConfigError(f"provider {spec.name}: auth must be secret or certificate")

    def __repr__(self) -> str:
        return f"GraphProvider(name={self.spec.name!r}, user={self.user!r})"

    # -- who sends ---------------------------------------------------------------------
    def mailbox(self, delivery: Delivery) -> str | None:
        """The mailbox that sends this delivery; None when send_as names a sender that
        allowed_senders does not allow and there is no `user` to fall back to."""
        if self.send_as == "user":
            return self.user
        header = graphmime.header_from(delivery.body)
        order = [delivery.mail_from, header] if self.send_as == "sender" else [header]
        if self.send_as == "from":
            order.append(delivery.mail_from)
        for candidate in order:
            if candidate and sender_allowed(candidate, self.allowed):
                return candidate
        return self.user or None

    def pace(self, delivery: Delivery) -> Pace | None:
        mailbox = self.mailbox(delivery)
        if mailbox is None:
            return None
        per_minute, per_day, at_once = self.limits
        return Pace(
            key=f"graph:{self.tenant.lower()}:{mailbox.lower()}",
            label=mailbox,
            per_minute=per_minute,
            recipients_per_day=per_day,
            concurrency=at_once,
        )

    # -- sending -----------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> Outcome:
        mailbox = self.mailbox(delivery)
        if mailbox is None:
            sender = delivery.mail_from or graphmime.header_from(delivery.body) or "(none)"
            return Outcome.permanent(
                f"sender {sender} may not send through this provider (allowed_senders) "
                "and no user is set to send as instead"
            )
        try:
            mime = graphmime.sending_mime(delivery)
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        if graphmime.request_size(mime) <= MAX_REQUEST_BYTES:
            return await self._send_mail(mailbox, mime)
        if not self.large:
            return Outcome.permanent(
                f"message too large for Graph in one request ({graphmime.request_size(mime)} "
                f"bytes in base64, {MAX_REQUEST_BYTES} per request); set large_messages "
                "(needs Mail.ReadWrite) to send it as a draft with its attachments"
            )
        try:
            draft, detached = graphmime.split_large(mime)
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        return await self._send_draft(mailbox, draft, detached)

    def _user_path(self, mailbox: str) -> str:
        return f"/v1.0/users/{quote(mailbox, safe='@')}"

    async def _send_mail(self, mailbox: str, mime: bytes) -> Outcome:
        path = f"{self._user_path(mailbox)}/sendMail"
        answer = await self._request("POST", path, base64.b64encode(mime), "text/plain")
        if isinstance(answer, Outcome):
            return answer
        outcome = classify(
            answer.response.status, answer.response.headers, answer.response.text, mailbox
        )
        if outcome.kind is OutcomeKind.DELIVERED and outcome.provider_message_id is None:
            return Outcome.delivered(answer.request_id, detail=outcome.detail)
        return outcome

    async def _send_draft(
        self, mailbox: str, draft: bytes, detached: list[graphmime.Detached]
    ) -> Outcome:
        created = await self._create_draft(mailbox, draft)
        if isinstance(created, Outcome):
            return created
        path, internet_id = created
        for attachment in detached:
            if attachment.small:
                failure = await self._attach_small(path, attachment, mailbox)
            else:
                failure = await self._attach_large(path, attachment, mailbox)
            if failure is not None:
                await self._request("DELETE", path, b"", None)  # a best effort
                return failure
        answer = await self._request("POST", f"{path}/send", b"", None)
        outcome = answer if isinstance(answer, Outcome) else answer.outcome(mailbox)
        if outcome.kind is not OutcomeKind.DELIVERED:
            await self._request("DELETE", path, b"", None)
            return attrs.evolve(outcome, detail=f"sending the draft: {outcome.detail}")
        assert isinstance(answer, _Answer)
        return Outcome.delivered(
            internet_id or answer.request_id,
            detail=f"HTTP {answer.response.status} (a draft, {len(detached)} attached after)",
        )

    async def _create_draft(self, mailbox: str, draft: bytes) -> tuple[str, str] | Outcome:
        """The draft made from the MIME: (its path, its internetMessageId)."""
        base = f"{self._user_path(mailbox)}/messages"
        answer = await self._request("POST", base, base64.b64encode(draft), "text/plain")
        if isinstance(answer, Outcome):
            return answer
        if answer.response.status != 201:
            return self._step_failed("creating the draft", answer.response, mailbox)
        created = http.json_object(answer.response.text)
        draft_id = str(created.get("id") or "")
        if not draft_id:
            return Outcome.retry("creating the draft: HTTP 201 without a message id")
        return f"{base}/{quote(draft_id, safe='')}", str(created.get("internetMessageId") or "")

    def _step_failed(self, step: str, resp: http.Response, mailbox: str) -> Outcome:
        outcome = classify(resp.status, resp.headers, resp.text, mailbox)
        if outcome.kind is OutcomeKind.DELIVERED:  # a 2xx other than the one expected
            return Outcome.retry(f"{step}: unexpected HTTP {resp.status}")
        return attrs.evolve(outcome, detail=f"{step}: {outcome.detail}")

    @staticmethod
    def _item(attachment: graphmime.Detached) -> dict[str, Any]:
        item: dict[str, Any] = {
            "name": attachment.name,
            "contentType": attachment.content_type,
            "isInline": attachment.inline,
        }
        if attachment.content_id:
            item["contentId"] = attachment.content_id
        return item

    async def _attach_small(
        self, path: str, attachment: graphmime.Detached, mailbox: str
    ) -> Outcome | None:
        """An attachment under 3 MB, in one request; None when done."""
        body = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            **self._item(attachment),
            "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
        }
        answer = await self._request(
            "POST", f"{path}/attachments", json.dumps(body).encode(), "application/json"
        )
        if isinstance(answer, Outcome):
            return answer
        if answer.response.status != 201:
            return self._step_failed("adding an attachment", answer.response, mailbox)
        return None

    async def _attach_large(
        self, path: str, attachment: graphmime.Detached, mailbox: str
    ) -> Outcome | None:
        """An attachment of 3 MB or more, through an upload session; None when done."""
        item = {"attachmentType": "file", **self._item(attachment)}
        session = {"AttachmentItem": {**item, "size": len(attachment.content)}}
        answer = await self._request(
            "POST",
            f"{path}/attachments/createUploadSession",
            json.dumps(session).encode(),
            "application/json",
        )
        if isinstance(answer, Outcome):
            return answer
        if answer.response.status != 201:
            return self._step_failed("creating an upload session", answer.response, mailbox)
        upload_url = str(http.json_object(answer.response.text).get("uploadUrl") or "")
        if not upload_url.startswith(("https://", "http://")):
            return Outcome.retry("creating an upload session: no uploadUrl in the answer")
        return await self._upload(upload_url, attachment.content)

    async def _upload(self, url: str, content: bytes) -> Outcome | None:
        """PUT the content to a pre-authenticated upload URL in ranges, in order (no
        Authorization header: the URL carries its own)."""
        client = self._upload_client(url)
        total = len(content)
        for start in range(0, total, UPLOAD_CHUNK):
            chunk = content[start : start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            headers = [
                ("Content-Range", f"bytes {start}-{end}/{total}"),
                ("Content-Type", "application/octet-stream"),
            ]
            try:
                resp = await client.request("PUT", url, chunk, headers)
            except http.TransportError as exc:
                return http.transport_failure(exc)
            done = end + 1 == total
            if resp.status not in ((200, 201) if done else (200,)):
                return self._step_failed(f"uploading bytes {start}-{end}", resp, "")
        return None

    def _upload_client(self, url: str) -> http.Client:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        client = self._uploads.get(origin)
        if client is None:
            client = self._uploads[origin] = http.open_client(
                origin, timeout=self._timeout, max_connections=self.limits[2]
            )
        return client

    async def _request(
        self, method: str, path: str, body: bytes, content_type: str | None
    ) -> _Answer | Outcome:
        """A Graph request with the current token; after a 401, once more with a new
        token; a second 401 is a transient failure (a fallback provider may take it)."""
        token = await self._tokens.token(self._login)
        if isinstance(token, Outcome):
            return token
        answer = await self._post(method, path, body, content_type, token)
        if isinstance(answer, Outcome) or answer.response.status != 401:
            return answer
        token = await self._tokens.token(self._login, rejected=token)
        if isinstance(token, Outcome):
            return token
        answer = await self._post(method, path, body, content_type, token)
        if isinstance(answer, Outcome) or answer.response.status != 401:
            return answer
        code, message = _graph_error(answer.response.text)
        return Outcome.retry(f"HTTP 401: {code}: {message} (again with a new token)")

    async def _post(
        self, method: str, path: str, body: bytes, content_type: str | None, token: str
    ) -> _Answer | Outcome:
        request_id = str(uuid.uuid4())
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("client-request-id", request_id),
            ("return-client-request-id", "true"),
        ]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        try:
            resp = await self._graph.request(method, path, body, headers)
        except http.TransportError as exc:
            return http.transport_failure(exc)
        return _Answer(resp, request_id)

    async def aclose(self) -> None:
        await self._graph.aclose()
        await self._login.aclose()
        for client in self._uploads.values():
            await client.aclose()


TYPE = ProviderType(
    name="msgraph",
    factory=GraphProvider,
    settings={
        "tenant_id": SettingInfo("Entra ID tenant (directory) id or domain", True),
        "client_id": SettingInfo("application (client) id of the app registration", True),
        "user": SettingInfo(
            "mailbox to send as (user id or user principal name); with send_as sender or "
            "from, the mailbox for senders allowed_senders does not allow"
        ),
        "send_as": SettingInfo(
            "user (default): always `user`; sender: the envelope sender, else the header "
            "From; from: the header From, else the envelope sender (allowed_senders decide)"
        ),
        "allowed_senders": SettingInfo(
            "addresses, *@domain or domains that may send as themselves (send_as sender/from)"
        ),
        "auth": SettingInfo(
            "secret (default: the secret is the client secret) or certificate (the secret is "
            "the PEM private key and certificate)"
        ),
        "large_messages": SettingInfo(
            "true: messages over one request's 4 MB go as a draft with its attachments "
            "(needs Mail.ReadWrite); admits up to 35 MB, or max_message_bytes"
        ),
        "messages_per_minute": SettingInfo("per sending mailbox (default 30, Exchange's)"),
        "recipients_per_day": SettingInfo("per sending mailbox (default 10000, Exchange's)"),
        "concurrent_requests": SettingInfo("per sending mailbox (default 4, Exchange's)"),
        "save_to_sent_items": SettingInfo(
            "true (default and only value): Graph always saves a copy to Sent Items"
        ),
        "login_endpoint": SettingInfo(f"identity platform base URL (default {LOGIN_ENDPOINT})"),
        "scope": SettingInfo(f"token scope (default {graphauth.SCOPE}; national clouds differ)"),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo("calls in flight and connections kept (default 64)"),
    },
    secret="client secret, or PEM private key and certificate",  # noqa: S106 - names it
    secret_required=True,
    default_endpoint=GRAPH_ENDPOINT,
    max_recipients=MAX_RECIPIENTS,
    max_message_bytes=MAX_REQUEST_BYTES * 3 // 4 - 32 * 1024,
    limit_for=message_limit,
    max_connections=64,
)
