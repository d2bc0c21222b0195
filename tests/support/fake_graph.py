"""A local fake of Microsoft Graph's sendMail (MIME form) and the Microsoft identity
platform's client-credentials token endpoint, for tests.

FakeGraph is one real HTTP/1.1 server on 127.0.0.1 (the harness of
tests/support/fakehttp.py) that plays both hosts: point a provider's endpoint and login
endpoint at ``fake.url``. It checks every request the way the
documentation describes, answers refused requests with the documented error bodies,
records every request (valid or not) in ``requests`` and every reason it refused one
in ``errors``.

    with FakeGraph() as fake:
        ...  # POST fake.url + "/<tenant>/oauth2/v2.0/token", then
        ...  # POST fake.url + "/v1.0/users/<user>/sendMail" with the Bearer token
        assert fake.mime == [the exact MIME bytes Graph was given]

Mail (large messages, learn.microsoft.com "Attach large files to Outlook messages"):
  - POST /v1.0/users/{u}/messages, the MIME form (text/plain, base64, at most 4 MB):
    201 with the draft's id and internetMessageId
  - POST .../messages/{id}/attachments, a fileAttachment (JSON, contentBytes, under
    3 MB of content): 201
  - POST .../messages/{id}/attachments/createUploadSession with an AttachmentItem
    (attachmentType file, name, size from 3 MB to 150 MB): 201 with uploadUrl (on this
    server, pre-authenticated: a request to it with an Authorization header is refused)
    and nextExpectedRanges
  - PUT uploadUrl with Content-Range "bytes a-b/total", a the next expected byte, each
    range at most 4 MB and a multiple of 320 KiB but the last: 200 with the next
    expected ranges, 201 when complete (the attachment joins the draft)
  - POST .../messages/{id}/send: 202, the draft and its attachments are sent
  - DELETE .../messages/{id}: 204
  Every sent message is in ``sent`` (mailbox, MIME, attachments, how).
Exchange's behaviour the fake plays:
  - a mailbox in ``send_as_denied``, or a From display name containing "@", is refused
    with 403 ErrorSendAsDenied (observed: SMTP2Graph#28)
  - ``mailbox_concurrency``: more requests at once for one mailbox get 429
    MailboxConcurrency with Retry-After (``graph_delay`` makes requests overlap)
  - ``mailbox_per_minute``: more sends in 60 seconds from one mailbox get 429
    ApplicationThrottled with Retry-After
  - ``certificate``: the token endpoint also takes a client assertion (JWT, PS256 or
    RS256), checking its x5t#S256 or x5t against that certificate, its signature, aud
    (this server's token URL), iss and sub (the client id) and its lifetime; a bad one
    is 401 invalid_client AADSTS700027 (observed)

Scripting: ``respond_with()`` / ``respond_error()`` queue the answer to the next valid
sendMail request, ``respond_token_with()`` the next valid token request;
``token_lifetime`` is the expires_in of new tokens, ``expire_tokens()`` makes every
token issued so far expired, ``token_delay`` slows the token endpoint down (to make
concurrent sends meet).

Sources (under tests/provider_specs/):
  TOKEN   graph_oauth2_token.json   - MicrosoftDocs v2-oauth2-client-creds-grant-flow.md
  SEND    graph_sendmail.schema.json - msgraph-metadata CSDL + user-sendmail.md (limits,
                                       errors)
Error texts come from those files (``TOKEN_ERRORS``, ``SEND_ERRORS``) and are looked up
at import time; the few marked "observed" below are Graph's answers as seen in
practice but not in those files, and the ones marked "ours" are this fake's (the
status is the documented one, Graph documents no text).

Token endpoint, POST /{tenant}/oauth2/v2.0/token (TOKEN):
  - a form body (application/x-www-form-urlencoded); each of client_id, scope,
    client_secret, grant_type present and non-empty, else 400 invalid_request
    AADSTS900144 naming the first missing one (TOKEN errors_used_by_fake.missing_param)
  - grant_type client_credentials, else 400 unsupported_grant_type AADSTS70003
  - scope exactly "https://graph.microsoft.com/.default" (resource + "/.default"),
    else 400 invalid_scope AADSTS1002012
  - the tenant (path) is the fake's, else 400 invalid_request AADSTS90002 (observed)
  - client_id the fake's, else 400 unauthorized_client AADSTS700016
  - client_secret the fake's, else 401 invalid_client AADSTS7000215
  - success: 200 {"token_type": "Bearer", "expires_in", "ext_expires_in",
    "access_token"}; errors have TOKEN's error_shape (error, error_description with
    Trace ID / Correlation ID / Timestamp lines, error_codes, timestamp, trace_id,
    correlation_id)
Graph, POST /v1.0/users/{id | userPrincipalName}/sendMail (SEND), in this order:
  - other paths: 400 BadRequest "Resource not found for the segment '<s>'." (observed);
    other methods: 405 (ours)
  - Authorization: Bearer <token>: 401 InvalidAuthenticationToken "Access token is
    empty." when missing (SEND errors.no_token), "CompactToken parsing failed ..." for
    a token the fake never issued (errors.bad_token), "Lifetime validation failed, the
    token is expired." for an expired one (observed); with a WWW-Authenticate header
  - the user is one of the fake's mailboxes (id or UPN, case-insensitive), else 404
    ErrorInvalidUser "The requested user '<u>' is invalid." (observed)
  - a body of at most 4,194,304 bytes (SEND limits.max_request_bytes), else 413 (ours)
  - Content-Type text/plain, the MIME form (user-sendmail.md); anything else 415
    (ours: this fake does not serve the JSON form)
  - a body that is base64 (whitespace ignored, as .NET's decoder does), else 400
    ErrorMimeContentInvalidBase64String (errors.bad_mime_base64)
  - that decodes to a MIME message: header fields, then a blank line or the end
    (ours: ErrorMimeContentInvalid)
  - with at least one recipient in To/Cc/Bcc, else 400 ErrorInvalidRecipients
    (errors.no_recipients), each an address with a domain, else 400
    ErrorInvalidRecipients naming it (errors.bad_recipient)
  - success: 202 Accepted, no body, headers request-id (new) and client-request-id
    (the client's, else new); every answer carries both, and error bodies an
    innerError with them, as Graph's do
"""

from __future__ import annotations

import base64
import binascii
import collections
import email.policy
import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.support import fakehttp
from tests.support.fakehttp import Answer, FakeHTTP, Refused

SPECS = Path(__file__).resolve().parent.parent / "provider_specs"
TOKEN_DOC: dict[str, Any] = json.loads(
    (SPECS / "graph_oauth2_token.json").read_text(encoding="utf-8")
)
SEND_DOC: dict[str, Any] = json.loads(
    (SPECS / "graph_sendmail.schema.json").read_text(encoding="utf-8")
)
TOKEN_ERRORS: dict[str, dict[str, Any]] = TOKEN_DOC["errors_used_by_fake"]
SEND_ERRORS: dict[str, dict[str, Any]] = SEND_DOC["errors"]
TOKEN_PARAMS = tuple(TOKEN_DOC["request_params"])  # client_id, scope, client_secret, grant_type
MAX_REQUEST_BYTES: int = SEND_DOC["limits"]["max_request_bytes"]
RESOURCE = "https://graph.microsoft.com"
SCOPE = RESOURCE + "/.default"
TOKEN_PATH = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
SEND_PATH = re.compile(r"^/v1\.0/users/(?P<user>[^/]+)/sendMail$", re.IGNORECASE)
MESSAGES_PATH = re.compile(r"^/v1\.0/users/(?P<user>[^/]+)/messages$", re.IGNORECASE)
MESSAGE_PATH = re.compile(
    r"^/v1\.0/users/(?P<user>[^/]+)/messages/(?P<id>[^/]+)"
    r"(?P<rest>/send|/attachments|/attachments/createUploadSession)?$",
    re.IGNORECASE,
)
UPLOAD_PATH = re.compile(r"^/upload/(?P<session>[0-9a-f]+)$")
SMALL_LIMIT = 3 * 1000 * 1000  # fileAttachment content through POST
UPLOAD_MIN, UPLOAD_MAX = 3 * 1000 * 1000, 150 * 1024 * 1024
RANGE_UNIT = 320 * 1024
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

MSG_EXPIRED = "Lifetime validation failed, the token is expired."  # observed
MSG_TENANT = (  # observed (AADSTS90002)
    "AADSTS90002: Tenant '<tenant>' not found. Check to make sure you have the correct "
    "tenant ID and are signing into the correct cloud."
)
WWW_AUTHENTICATE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/'
    'oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"'
)


def _send_error(which: str, /, **fill: str) -> tuple[int, str, str]:
    """(status, code, message) of SEND errors[which], placeholders filled in."""
    doc = SEND_ERRORS[which]
    message = str(doc["body"]["error"]["message"])
    for key, value in fill.items():
        message = message.replace(f"<{key}>", value)
    return int(doc["status"]), str(doc["body"]["error"]["code"]), message


def _token_error(which: str, /, **fill: str) -> tuple[int, str, int, str]:
    """(status, error, AADSTS code, text) of TOKEN errors_used_by_fake[which]."""
    doc = TOKEN_ERRORS[which]
    text = str(doc["text"])
    for key, value in fill.items():
        text = text.replace(f"<{key}>", value)
    return int(doc["status"]), str(doc["error"]), int(doc["code"]), text


# fail at import when the documents lose what the fake relies on
for _name in ("no_token", "bad_token", "no_recipients", "bad_recipient", "bad_mime_base64"):
    _send_error(_name)
for _name in ("missing_param", "bad_grant", "bad_scope", "unknown_client", "bad_secret"):
    _token_error(_name)


@dataclass
class Attached:
    name: str
    content_type: str
    content: bytes
    inline: bool
    content_id: str
    via: str  # "request" or "upload"


@dataclass
class Sent:
    """A message the fake sent: sendMail's MIME, or a draft's MIME and attachments."""

    user: str
    mime: bytes
    attachments: list[Attached]
    via: str  # "sendMail" or "draft"
    at: float  # time.monotonic()


@dataclass
class _Draft:
    user: str
    mime: bytes
    attachments: list[Attached] = field(default_factory=list)


@dataclass
class _Upload:
    draft: str
    item: dict[str, Any]
    size: int
    data: bytearray = field(default_factory=bytearray)


@dataclass
class ReceivedRequest(fakehttp.ReceivedRequest):
    """One request as the fake saw it, and how it answered."""

    kind: str = "other"  # "token", "sendmail" or "other"
    form: dict[str, str] = field(default_factory=dict)  # a token request's fields
    token: str | None = None  # the Bearer token of a sendMail request
    user: str | None = None  # the user segment of a sendMail path, decoded
    mime: bytes | None = None  # a sendMail body, decoded from base64

    @property
    def json(self) -> Any:
        return json.loads(self.response_body) if self.response_body else None


class FakeGraph(FakeHTTP[ReceivedRequest]):
    """Graph's sendMail and the identity platform's token endpoint on 127.0.0.1.

    respond_with() queues the answer to the next valid sendMail request (which gets
    Graph's request-id and client-request-id headers added).
    """

    server_version = "FakeGraph/1"

    def __init__(
        self,
        *,
        tenant_id: str = "contoso-tenant-id",
        client_id: str = "11111111-2222-3333-4444-555555555555",
        client_secret: str = "fake~client~secret",
        users: tuple[str, ...] = ("sender@contoso.example",),
        token_lifetime: float = 3599,
        token_delay: float = 0.0,
        certificate: bytes | None = None,  # DER of the app's certificate
        send_as_denied: tuple[str, ...] = (),
        mailbox_concurrency: int | None = None,
        mailbox_per_minute: int | None = None,
        graph_delay: float = 0.0,
    ) -> None:
        super().__init__(ReceivedRequest)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.users = users
        self.token_lifetime = token_lifetime
        self.token_delay = token_delay
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._token_answers: collections.deque[Answer] = collections.deque()
        self.certificate = certificate
        self.send_as_denied = {u.lower() for u in send_as_denied}
        self.mailbox_concurrency = mailbox_concurrency
        self.mailbox_per_minute = mailbox_per_minute
        self.graph_delay = graph_delay
        self.sent: list[Sent] = []
        self.drafts: dict[str, _Draft] = {}
        self.deleted: list[str] = []
        self._uploads: dict[str, _Upload] = {}
        self._busy: collections.Counter[str] = collections.Counter()  # requests in progress
        self.most_at_once: collections.Counter[str] = collections.Counter()

    # scripting

    def respond_error(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Queue a Graph error answer {"error": {"code", "message"}} for the next sendMail."""
        self.respond_with(status, {"error": {"code": code, "message": message}}, headers)

    def respond_token_with(
        self, status: int, body: object = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Queue the answer to the next valid token request."""
        answer = Answer.of(status, body, headers)
        with self._lock:
            self._token_answers.append(answer)

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on."""
        with self._lock:
            now = time.monotonic()
            self._tokens = dict.fromkeys(self._tokens, now)

    # what was seen

    @property
    def token_requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.kind == "token"]

    @property
    def sendmail_requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.kind == "sendmail"]

    @property
    def issued(self) -> list[str]:
        """The tokens issued, in order."""
        return [r.json["access_token"] for r in self.token_requests if r.status == 200]

    @property
    def mime(self) -> list[bytes]:
        """The decoded MIME of every accepted sendMail request, in order."""
        return [r.mime for r in self.sendmail_requests if r.accepted and r.mime is not None]

    # request handling (server threads)

    @property
    def throttled(self) -> list[ReceivedRequest]:
        """Requests answered 429."""
        with self._lock:
            return [r for r in self.requests if r.status == 429]

    def _answer(self, record: ReceivedRequest) -> Answer:
        path = urlsplit(record.path).path
        if match := TOKEN_PATH.match(path):
            record.kind = "token"
            return self._token(record, unquote(match["tenant"]))
        if match := UPLOAD_PATH.match(path):
            record.kind = "upload"
            return self._upload_range(record, match["session"])
        for pattern, kind in (
            (SEND_PATH, "sendmail"),
            (MESSAGES_PATH, "draft"),
            (MESSAGE_PATH, "message"),
        ):
            if match := pattern.match(path):
                record.kind = kind
                record.user = unquote(match["user"])
                return self._mailbox_request(record, match)
        segment = next((s for s in reversed(path.split("/")) if s), "")
        self._graph_refuse(
            record, 400, "BadRequest", f"Resource not found for the segment '{segment}'."
        )
        raise AssertionError("unreachable")

    # token endpoint

    def _token_refuse(self, which: str, /, **fill: str) -> None:
        status, error, code, text = _token_error(which, **fill)
        self._token_failure(status, error, code, text)

    def _token_failure(self, status: int, error: str, code: int, text: str) -> None:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        body = {
            "error": error,
            "error_description": (
                f"{text}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\n"
                f"Timestamp: {stamp}"
            ),
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
        }
        answer = Answer.of(
            status,
            body,
            {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"},
        )
        raise Refused(answer, f"token: {error}: {text}")

    def _token(self, record: ReceivedRequest, tenant: str) -> Answer:  # noqa: PLR0912 - each check of the documented request
        if self.token_delay:
            time.sleep(self.token_delay)
        if record.method != "POST":
            self._token_failure(405, "invalid_request", 900561, "AADSTS900561: use POST")  # ours
        media = record.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/x-www-form-urlencoded":
            try:
                pairs = parse_qsl(record.raw.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                pairs = []
            record.form = dict(pairs)
        assertion = record.form.get("client_assertion_type") == ASSERTION_TYPE
        for name in TOKEN_PARAMS:
            if name == "client_secret" and assertion:
                continue
            if not record.form.get(name):
                self._token_refuse("missing_param", name=name)
        form = record.form
        if form["grant_type"] != "client_credentials":
            self._token_refuse("bad_grant", g=form["grant_type"])
        if form["scope"] != SCOPE:
            self._token_refuse("bad_scope", s=form["scope"])
        if tenant != self.tenant_id:
            text = MSG_TENANT.replace("<tenant>", tenant)
            self._token_failure(400, "invalid_request", 90002, text)
        if form["client_id"] != self.client_id:
            self._token_refuse("unknown_client", id=form["client_id"], tenant=tenant)
        if assertion:
            self._check_assertion(form.get("client_assertion", ""), tenant)
        elif form["client_secret"] != self.client_secret:
            self._token_refuse("bad_secret", id=form["client_id"])
        with self._lock:
            if self._token_answers:
                return self._token_answers.popleft()
            token = "eyJ0eXAiOiJKV1Qi." + uuid.uuid4().hex + "." + uuid.uuid4().hex
            self._tokens[token] = time.monotonic() + self.token_lifetime
            lifetime = self.token_lifetime
        body = {
            "token_type": "Bearer",
            "expires_in": int(lifetime) if float(lifetime).is_integer() else lifetime,
            "ext_expires_in": int(lifetime),
            "access_token": token,
        }
        return Answer.of(
            200,
            body,
            {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"},
        )

    # Graph

    def _ids(self, record: ReceivedRequest) -> dict[str, str]:
        return {
            "request-id": str(uuid.uuid4()),
            "client-request-id": record.headers.get("client-request-id") or str(uuid.uuid4()),
        }

    def _graph_refuse(
        self,
        record: ReceivedRequest,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        ids = self._ids(record)
        inner = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), **ids}
        body = {"error": {"code": code, "message": message, "innerError": inner}}
        answer = Answer.of(
            status, body, {"Content-Type": "application/json", **ids, **(headers or {})}
        )
        raise Refused(answer, f"graph: {status} {code}: {message}")

    def _check_token(self, record: ReceivedRequest) -> None:
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": WWW_AUTHENTICATE}
        if scheme.lower() != "bearer" or not token.strip():
            self._graph_refuse(record, *_send_error("no_token"), challenge)
        record.token = token = token.strip()
        with self._lock:
            expires = self._tokens.get(token)
        if expires is None:
            self._graph_refuse(record, *_send_error("bad_token"), challenge)
        elif time.monotonic() >= expires:
            status, code, _ = _send_error("bad_token")
            self._graph_refuse(record, status, code, MSG_EXPIRED, challenge)

    def _decode_mime(self, record: ReceivedRequest) -> bytes:
        media = record.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/plain":
            self._graph_refuse(
                record, 415, "UnsupportedMediaType", "Content-Type must be text/plain (MIME)."
            )
        try:
            mime = base64.b64decode(b"".join(record.raw.split()), validate=True)
        except (binascii.Error, ValueError):
            mime = b""
        if not mime:
            self._graph_refuse(record, *_send_error("bad_mime_base64"))
        return mime

    def _check_mime(self, record: ReceivedRequest, mime: bytes) -> None:
        first = mime.split(b"\n", 1)[0]
        if not re.match(rb"^[!-9;-~]+:", first):
            self._graph_refuse(
                record, 400, "ErrorMimeContentInvalid", "The MIME content is not valid."
            )
        msg = BytesParser(policy=email.policy.default).parsebytes(mime)
        addresses: list[str] = []
        for name in ("to", "cc", "bcc"):
            for value in msg.get_all(name) or []:
                addresses += [a.addr_spec for a in getattr(value, "addresses", ())]
        if not addresses:
            self._graph_refuse(record, *_send_error("no_recipients"))
        for address in addresses:
            local, at, domain = address.rpartition("@")
            if not (local and at and domain):
                self._graph_refuse(record, *_send_error("bad_recipient", x=address))

    def _sendmail(self, record: ReceivedRequest) -> Answer:
        if len(record.raw) > MAX_REQUEST_BYTES:
            self._graph_refuse(
                record,
                413,
                "RequestEntityTooLarge",
                f"The request body is larger than {MAX_REQUEST_BYTES} bytes.",
            )
        mime = self._decode_mime(record)
        record.mime = mime
        self._check_mime(record, mime)
        self._check_send(record, mime)
        ids = self._ids(record)
        scripted = self._scripted()
        if scripted is not None:
            return Answer(scripted.status, scripted.body, {**ids, **scripted.headers})
        with self._lock:
            self.sent.append(Sent(record.user or "", mime, [], "sendMail", time.monotonic()))
        return Answer(202, b"", ids)

    # the mailbox: who may send, how fast, how many at once

    def _mailbox_request(self, record: ReceivedRequest, match: re.Match[str]) -> Answer:
        if record.kind == "sendmail" and record.method != "POST":
            self._graph_refuse(
                record, 405, "Request_BadRequest", "Specified HTTP method is not allowed."
            )
        self._check_token(record)
        known = {u.lower() for u in self.users}
        user = (record.user or "").lower()
        if user not in known:
            self._graph_refuse(
                record, 404, "ErrorInvalidUser", f"The requested user '{record.user}' is invalid."
            )
        with self._lock:
            self._busy[user] += 1
            busy = self._busy[user]
            self.most_at_once[user] = max(self.most_at_once[user], busy)
        try:
            if self.mailbox_concurrency is not None and busy > self.mailbox_concurrency:
                self._graph_refuse(
                    record,
                    429,
                    "MailboxConcurrency",
                    "Application is over its MailboxConcurrency limit.",
                    {"Retry-After": "1"},
                )
            if self.graph_delay:
                time.sleep(self.graph_delay)
            if record.kind == "sendmail":
                return self._sendmail(record)
            if record.kind == "draft":
                return self._create_draft(record)
            return self._on_draft(record, unquote(match["id"]), match["rest"] or "")
        finally:
            with self._lock:
                self._busy[user] -= 1

    def _check_send(self, record: ReceivedRequest, mime: bytes) -> None:
        """What Exchange checks when a mailbox sends: Send As, the From display name,
        and the mailbox's sending rate."""
        user = (record.user or "").lower()
        sender = BytesParser(policy=email.policy.default).parsebytes(mime, headersonly=True)
        names = [a.display_name for a in getattr(sender.get("from"), "addresses", ())]
        if user in self.send_as_denied or any("@" in n for n in names):
            self._graph_refuse(
                record,
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have "
                "the right to send mail on behalf of the specified sending account.",
            )
        if self.mailbox_per_minute is not None:
            now = time.monotonic()
            with self._lock:
                recent = [x for x in self.sent if x.user.lower() == user and now - x.at < 60]
            if len(recent) >= self.mailbox_per_minute:
                self._graph_refuse(
                    record,
                    429,
                    "ApplicationThrottled",
                    "Mailbox send rate exceeded.",
                    {"Retry-After": "60"},
                )

    # drafts, attachments, upload sessions

    def _create_draft(self, record: ReceivedRequest) -> Answer:
        if record.method != "POST":
            self._graph_refuse(
                record, 405, "Request_BadRequest", "Specified HTTP method is not allowed."
            )
        if len(record.raw) > MAX_REQUEST_BYTES:
            self._graph_refuse(
                record, 413, "RequestEntityTooLarge", "The request body is too large."
            )
        mime = self._decode_mime(record)
        record.mime = mime
        self._check_mime(record, mime)
        draft_id = "AAMk" + uuid.uuid4().hex
        header = BytesParser(policy=email.policy.default).parsebytes(mime, headersonly=True)
        internet_id = str(header.get("message-id") or f"<{uuid.uuid4().hex}@fake.graph>")
        with self._lock:
            self.drafts[draft_id] = _Draft(record.user or "", mime)
        body = {"id": draft_id, "internetMessageId": internet_id, "isDraft": True}
        return Answer.of(201, body, {"Content-Type": "application/json", **self._ids(record)})

    def _on_draft(self, record: ReceivedRequest, draft_id: str, rest: str) -> Answer:
        with self._lock:
            draft = self.drafts.get(draft_id)
        if draft is None or draft.user.lower() != (record.user or "").lower():
            self._graph_refuse(
                record, 404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        assert draft is not None
        ids = self._ids(record)
        if rest == "" and record.method == "DELETE":
            with self._lock:
                self.drafts.pop(draft_id, None)
                self.deleted.append(draft_id)
            return Answer(204, b"", ids)
        if record.method != "POST":
            self._graph_refuse(
                record, 405, "Request_BadRequest", "Specified HTTP method is not allowed."
            )
        if rest == "/send":
            record.mime = draft.mime
            self._check_send(record, draft.mime)
            with self._lock:
                self.drafts.pop(draft_id, None)
                self.sent.append(
                    Sent(draft.user, draft.mime, draft.attachments, "draft", time.monotonic())
                )
            return Answer(202, b"", ids)
        item = self._json_body(record)
        if rest == "/attachments":
            return self._attach(record, draft, item, ids)
        return self._create_upload(record, draft_id, item, ids)

    def _json_body(self, record: ReceivedRequest) -> dict[str, Any]:
        if record.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            self._graph_refuse(
                record, 415, "UnsupportedMediaType", "Content-Type must be application/json."
            )
        try:
            body = json.loads(record.raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._graph_refuse(record, 400, "BadRequest", "Invalid JSON.")
        assert isinstance(body, dict)
        return body

    def _attach(
        self, record: ReceivedRequest, draft: _Draft, item: dict[str, Any], ids: dict[str, str]
    ) -> Answer:
        if item.get("@odata.type") != "#microsoft.graph.fileAttachment" or not item.get("name"):
            self._graph_refuse(record, 400, "ErrorInvalidAttachment", "Not a fileAttachment.")
        if len(record.raw) > MAX_REQUEST_BYTES:
            self._graph_refuse(record, 413, "RequestEntityTooLarge", "Too large.")
        try:
            content = base64.b64decode(str(item.get("contentBytes", "")), validate=True)
        except (binascii.Error, ValueError):
            self._graph_refuse(record, 400, "ErrorInvalidAttachment", "Invalid contentBytes.")
            raise AssertionError("unreachable") from None
        if len(content) >= SMALL_LIMIT:
            self._graph_refuse(
                record, 413, "ErrorAttachmentSizeLimitExceeded", "Use an upload session."
            )
        with self._lock:
            draft.attachments.append(_attached(item, content, "request"))
        return Answer.of(201, {"id": uuid.uuid4().hex}, {"Content-Type": "application/json", **ids})

    def _create_upload(
        self, record: ReceivedRequest, draft_id: str, body: dict[str, Any], ids: dict[str, str]
    ) -> Answer:
        item = body.get("AttachmentItem")
        if not isinstance(item, dict) or item.get("attachmentType") != "file":
            self._graph_refuse(record, 400, "BadRequest", "AttachmentItem of type file needed.")
        assert isinstance(item, dict)
        size = item.get("size")
        if (
            not isinstance(size, int)
            or not UPLOAD_MIN <= size <= UPLOAD_MAX
            or not item.get("name")
        ):
            self._graph_refuse(
                record, 400, "ErrorAttachmentSizeLimitExceeded", "Size out of range (3-150 MB)."
            )
        assert isinstance(size, int)
        session = uuid.uuid4().hex
        with self._lock:
            self._uploads[session] = _Upload(draft_id, item, size)
        answer = {
            "uploadUrl": f"{self.url}/upload/{session}",
            "expirationDateTime": "2099-01-01T00:00:00Z",
            "nextExpectedRanges": ["0-"],
        }
        return Answer.of(201, answer, {"Content-Type": "application/json", **ids})

    def _upload_range(self, record: ReceivedRequest, session: str) -> Answer:
        if record.method != "PUT":
            self._graph_refuse(record, 405, "BadRequest", "PUT only.")
        if "authorization" in record.headers:
            # the upload URL is pre-authenticated; Graph documents that an Authorization
            # header makes the PUT fail
            self._graph_refuse(record, 401, "InvalidAuthenticationToken", "Do not authorize.")
        with self._lock:
            upload = self._uploads.get(session)
        if upload is None:
            self._graph_refuse(record, 404, "ItemNotFound", "No such upload session.")
        assert upload is not None
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", record.headers.get("content-range", ""))
        if m is None:
            self._graph_refuse(record, 400, "InvalidRange", "Content-Range bytes a-b/total.")
        assert m is not None
        start, end, total = (int(x) for x in m.groups())
        length = end - start + 1
        last = end + 1 == total
        problems = [
            total != upload.size and "total is not the session's size",
            start != len(upload.data) and f"expected byte {len(upload.data)} next",
            length != len(record.raw) and "range and body lengths differ",
            length > MAX_REQUEST_BYTES and "range over 4 MB",
            not last and length % RANGE_UNIT and "range not a multiple of 320 KiB",
        ]
        for problem in problems:
            if problem:
                self._graph_refuse(record, 416, "InvalidRange", str(problem))
        with self._lock:
            upload.data += record.raw
            if not last:
                return Answer.of(200, {"nextExpectedRanges": [f"{end + 1}-"]})
            self._uploads.pop(session, None)
            draft = self.drafts.get(upload.draft)
            if draft is not None:
                draft.attachments.append(_attached(upload.item, bytes(upload.data), "upload"))
        return Answer.of(201, {}, {"Location": f"{self.url}/attachments/{session}"})

    def _check_assertion(self, jwt: str, tenant: str) -> None:
        why = (
            "no certificate registered"
            if self.certificate is None
            else check_client_assertion(
                jwt, self.certificate, self.client_id, f"{self.url}/{tenant}/oauth2/v2.0/token"
            )
        )
        if why is not None:
            text = f"AADSTS700027: Client assertion failed signature validation ({why})."
            self._token_failure(401, "invalid_client", 700027, text)


def _attached(item: Mapping[str, Any], content: bytes, via: str) -> Attached:
    return Attached(
        name=str(item.get("name")),
        content_type=str(item.get("contentType") or ""),
        content=content,
        inline=bool(item.get("isInline")),
        content_id=str(item.get("contentId") or ""),
        via=via,
    )


# ---------------------------------------------------------------------------- assertions


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_client_assertion(  # noqa: PLR0911 - a reason for each way it can be wrong
    jwt: str, certificate_der: bytes, client_id: str, audience: str
) -> str | None:
    """Why a client assertion is not valid for this app (None: it is)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        head_b64, claims_b64, signature_b64 = jwt.split(".")
        header = json.loads(_unb64url(head_b64))
        claims = json.loads(_unb64url(claims_b64))
        signature = _unb64url(signature_b64)
    except ValueError:
        return "not a JWT"
    sha256 = base64.urlsafe_b64encode(hashlib.sha256(certificate_der).digest()).rstrip(b"=")
    sha1 = base64.urlsafe_b64encode(hashlib.sha1(certificate_der).digest()).rstrip(b"=")
    if header.get("x5t#S256", "").encode() != sha256 and header.get("x5t", "").encode() != sha1:
        return "unknown certificate thumbprint"
    key = x509.load_der_x509_certificate(certificate_der).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    signed = f"{head_b64}.{claims_b64}".encode()
    pad: padding.AsymmetricPadding
    if header.get("alg") == "PS256":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    elif header.get("alg") == "RS256":
        pad = padding.PKCS1v15()
    else:
        return f"alg {header.get('alg')!r}"
    try:
        key.verify(signature, signed, pad, hashes.SHA256())
    except InvalidSignature:
        return "bad signature"
    now = time.time()
    if claims.get("aud") != audience:
        return f"aud {claims.get('aud')!r}"
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return "iss/sub"
    if not claims.get("jti"):
        return "no jti"
    if not (claims.get("nbf", now + 1) <= now + 300 and claims.get("exp", 0) > now):
        return "lifetime"
    return None
