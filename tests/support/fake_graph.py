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

    def _answer(self, record: ReceivedRequest) -> Answer:
        path = urlsplit(record.path).path
        if match := TOKEN_PATH.match(path):
            record.kind = "token"
            return self._token(record, unquote(match["tenant"]))
        if match := SEND_PATH.match(path):
            record.kind = "sendmail"
            record.user = unquote(match["user"])
            return self._sendmail(record)
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

    def _token(self, record: ReceivedRequest, tenant: str) -> Answer:
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
        for name in TOKEN_PARAMS:
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
        if form["client_secret"] != self.client_secret:
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
        if record.method != "POST":
            self._graph_refuse(
                record, 405, "Request_BadRequest", "Specified HTTP method is not allowed."
            )
        self._check_token(record)
        known = {u.lower() for u in self.users}
        if (record.user or "").lower() not in known:
            self._graph_refuse(
                record, 404, "ErrorInvalidUser", f"The requested user '{record.user}' is invalid."
            )
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
        ids = self._ids(record)
        scripted = self._scripted()
        if scripted is not None:
            return Answer(scripted.status, scripted.body, {**ids, **scripted.headers})
        return Answer(202, b"", ids)
