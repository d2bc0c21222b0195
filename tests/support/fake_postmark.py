"""A local fake of Postmark's Email API (POST /email) for tests.

FakePostmark is a real HTTP/1.1 server on 127.0.0.1 (the harness of
tests/support/fakehttp.py). It checks every request the way Postmark documents it,
answers refused requests the way Postmark does ({"ErrorCode", "Message"}), records every
request (valid or not) in ``requests`` with its parsed JSON body, and collects every
reason it refused one in ``errors``. A valid request gets the next
answer queued with ``respond_with()``, or by default ``200`` with
{"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}.

    with FakePostmark(server_token="pm-test") as fake:
        ...  # POST to fake.url + "/email"
        assert fake.requests[0].accepted

Account state can be set up: ``inactive`` (suppressed recipients), ``senders``
(confirmed sender signatures, None for any) and ``streams`` (message streams).

``validate(body)`` is the pure part: the problems Postmark would report for a parsed
JSON body (empty when Postmark would take it). Tests use it to prove that a request
builder satisfies the documented API.

Sources:
  SCHEMA  tests/provider_specs/postmark_email.schema.json - JSON Schema for POST /email
          written from Postmark's API documentation; its ``_source`` lists the pages,
          its ``limits``, ``error_codes`` and ``auth_errors_observed`` are used here.
  ARTICLE postmarkapp.com/support/article/1180-what-does-errorcode-300-mean: ErrorCode
          300 cases (50 recipients, TextBody/HtmlBody required, address patterns)
  ANYMAIL django-anymail's Postmark backend and tests, for texts Postmark answers with
          (inactive recipients, address errors), captured from the live API
Texts marked "ours" are not documented; their ErrorCode and status are.

What is checked, in this order, and where each rule comes from:
  HTTP
  - request body at most 10 MiB (SCHEMA limits.max_request_bytes; API overview: 413
    "exceeded Postmark's size limit of 10 MB"), else 413 (text ours)
  - path /email, else 404; any method but POST there: 405 (texts ours)
  - X-Postmark-Server-Token (API overview; name and value case-insensitive): 401 with
    ErrorCode 10 and SCHEMA auth_errors_observed's "missing" / "invalid" message
  - Accept and Content-Type application/json (2023-11-28 validation update): 415,
    ErrorCode 409 "JSON required" (SCHEMA error_codes)
  - UTF-8 JSON object: 422, ErrorCode 402 "Invalid JSON" (2023-11-28 update)
  Body (``validate``; the first problem becomes the 422 answer)
  - SCHEMA (Draft 2020-12): missing From or To, or neither TextBody nor HtmlBody:
    ErrorCode 300 (ARTICLE); wrong types or values (Headers items, Attachments items
    without Name/Content/ContentType, TrackLinks, ...): ErrorCode 403 "Invalid request
    field(s)" (2023-11-28 update)
  - From, To, Cc, Bcc and ReplyTo: comma-separated addresses whose mailbox and domain
    match ARTICLE's patterns: ErrorCode 300 with ANYMAIL's texts ("Invalid 'To' address:
    '...'.", "Error parsing 'Cc': Illegal email domain '...' in address '...'.", "...
    It must contain the '@' symbol."); at least one recipient ("Zero recipients
    specified", ANYMAIL)
  - at most 50 recipients, To, Cc and Bcc together (SCHEMA limits, ARTICLE)
  - TextBody or HtmlBody not empty (ARTICLE: "The message body cannot be empty"); each
    at most 5 MiB (SCHEMA limits.max_body_bytes_each): ErrorCode 300 (texts ours)
  - Attachments Content that decodes as base64 (SCHEMA contentEncoding, which JSON
    Schema does not assert by itself): ErrorCode 300 (text ours)
  - Headers: Name a header field name (RFC 5322 2.2 ftext) and Value without CR/LF:
    ErrorCode 300 (text ours)
  - Metadata at most 10 fields, names up to 20 and values up to 80 characters
    (Postmark's custom metadata guide): ErrorCode 300 "Invalid metadata content." (the
    start of the text Postmark gives, ANYMAIL)
  Account
  - MessageStream one of ``streams`` (default "outbound" when absent): ErrorCode 1235
    (text ours)
  - From a confirmed sender when ``senders`` is set: ErrorCode 400 with Postmark's text
  - recipients in ``inactive``: all of them: 422, ErrorCode 406 and the postmark-gem
    fixture text; some: 200, ErrorCode 0, "Message OK, but will not deliver to these
    inactive addresses: ..." (ANYMAIL's capture of the live API)
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator

from tests.support import fakehttp
from tests.support.fakehttp import Answer, FakeHTTP, Refused

SPECS = Path(__file__).resolve().parent.parent / "provider_specs"
SCHEMA_PATH = SPECS / "postmark_email.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

PATH = "/email"
TOKEN_HEADER = "x-postmark-server-token"
MAX_REQUEST_BYTES: int = SCHEMA["limits"]["max_request_bytes"]
MAX_BODY_BYTES: int = SCHEMA["limits"]["max_body_bytes_each"]
MAX_RECIPIENTS: int = SCHEMA["limits"]["max_recipients_total"]
MAX_METADATA_FIELDS = 10
MAX_METADATA_NAME = 20
MAX_METADATA_VALUE = 80
ADDRESS_FIELDS = ("From", "To", "Cc", "Bcc", "ReplyTo")
RECIPIENT_FIELDS = ("To", "Cc", "Bcc")
# ARTICLE's patterns; the mailbox one is written in lower case, addresses are not
MAILBOX = re.compile(r"^[a-z0-9\.!#\$%&'`\*\+\-\/=\^_\{\}\|~]+$", re.IGNORECASE)
DOMAIN = re.compile(r"^((\.)?[a-zA-Z0-9\-])+$")
HEADER_NAME = re.compile(r"[!-9;-~]+")


def _code(code: int) -> str:
    """The name SCHEMA's error table gives an ErrorCode (a KeyError when undocumented)."""
    return str(SCHEMA["error_codes"][str(code)])


MSG_AUTH_MISSING = str(SCHEMA["auth_errors_observed"]["missing"]["Message"])
MSG_AUTH_INVALID = str(SCHEMA["auth_errors_observed"]["invalid"]["Message"])
MSG_JSON_REQUIRED = _code(409)
MSG_INVALID_JSON = _code(402)
MSG_INVALID_FIELDS = _code(403)
MSG_ZERO_RECIPIENTS = "Zero recipients specified"
MSG_TOO_MANY_RECIPIENTS = "Maximum of 50 recipients allowed per email message"
MSG_NO_BODY = "Provide either email TextBody or HtmlBody or both."
MSG_METADATA = "Invalid metadata content."
MSG_TOO_LARGE = "The request exceeded Postmark's size limit of 10 MB for the Email API."
MSG_NOT_FOUND = "Not Found"
MSG_METHOD_NOT_ALLOWED = "Method Not Allowed"
MSG_OK = "OK"
MSG_ALL_INACTIVE = (
    "You tried to send to recipient(s) that have been marked as inactive. Found inactive "
    "addresses: {addresses}. Inactive recipients are ones that have generated a hard "
    "bounce, a spam complaint, or a manual suppression."
)
MSG_SOME_INACTIVE = (
    "Message OK, but will not deliver to these inactive addresses: {addresses}. Inactive "
    "recipients are ones that have generated a hard bounce or a spam complaint."
)
MSG_NOT_A_SENDER = (
    "The 'From' address you supplied ({address}) is not a Sender Signature on your "
    "account. Please add and confirm this address in order to be able to use it in the "
    "'From' field of your messages."
)

SCHEMA_VALIDATOR = Draft202012Validator(
    {k: v for k, v in SCHEMA.items() if k not in ("limits", "error_codes")}
)


class Problem(NamedTuple):
    """One reason Postmark refuses a body: its ErrorCode and Message."""

    code: int
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# ---------------------------------------------------------------------------- body rules


def _schema_problems(body: object) -> list[Problem]:
    out = []
    for e in sorted(SCHEMA_VALIDATOR.iter_errors(body), key=lambda e: list(map(str, e.path))):
        where = ".".join(map(str, e.absolute_path))
        if e.validator == "anyOf" and not where:
            out.append(Problem(300, MSG_NO_BODY))
        elif e.validator == "required" and not where:
            out.append(Problem(300, e.message))
        else:
            out.append(Problem(403, f"{MSG_INVALID_FIELDS}: {where or 'body'}: {e.message}"))
    return out


def _address_problem(fld: str, addr: str) -> Problem | None:
    local, at, domain = addr.rpartition("@")
    if not at:
        return Problem(
            300,
            f"Error parsing '{fld}': Illegal email address '{addr}'. "
            "It must contain the '@' symbol.",
        )
    if not DOMAIN.fullmatch(domain):
        return Problem(
            300, f"Error parsing '{fld}': Illegal email domain '{domain}' in address '{addr}'."
        )
    if not MAILBOX.fullmatch(local):
        return Problem(300, f"Invalid '{fld}' address: '{addr}'.")
    return None


def addresses(value: object) -> list[str]:
    """The addr-specs of a comma-separated address field ([] for anything else)."""
    if not isinstance(value, str) or not value.strip():
        return []
    return [addr for _, addr in email.utils.getaddresses([value])]


def _address_problems(body: dict[str, Any]) -> list[Problem]:
    out = []
    for fld in ADDRESS_FIELDS:
        for addr in addresses(body.get(fld)):
            problem = _address_problem(fld, addr)
            if problem:
                out.append(problem)
    count = sum(len(addresses(body.get(fld))) for fld in RECIPIENT_FIELDS)
    if count == 0 and isinstance(body.get("To"), str):
        out.append(Problem(300, MSG_ZERO_RECIPIENTS))
    if count > MAX_RECIPIENTS:
        out.append(Problem(300, MSG_TOO_MANY_RECIPIENTS))
    return out


def _dicts(value: object) -> Iterator[tuple[int, dict[str, Any]]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield i, item


def _content_problems(body: dict[str, Any]) -> list[Problem]:
    out = []
    texts = [body.get(k) for k in ("TextBody", "HtmlBody")]
    if any(isinstance(t, str) for t in texts) and not any(isinstance(t, str) and t for t in texts):
        out.append(Problem(300, MSG_NO_BODY))
    for key, text in zip(("TextBody", "HtmlBody"), texts, strict=True):
        if isinstance(text, str) and len(text.encode("utf-8")) > MAX_BODY_BYTES:
            out.append(Problem(300, f"{key} is larger than 5 MB."))
    for i, att in _dicts(body.get("Attachments")):
        content = att.get("Content")
        if isinstance(content, str):
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                out.append(Problem(300, f"Attachments.{i}.Content is not valid base64."))
    for i, header in _dicts(body.get("Headers")):
        name, value = header.get("Name"), header.get("Value")
        if isinstance(name, str) and not HEADER_NAME.fullmatch(name):
            out.append(Problem(300, f"Headers.{i}.Name {name!r} is not a header name."))
        if isinstance(value, str) and ("\r" in value or "\n" in value):
            out.append(Problem(300, f"Headers.{i}.Value must not contain line breaks."))
    return out


def _metadata_problems(body: dict[str, Any]) -> list[Problem]:
    metadata = body.get("Metadata")
    if not isinstance(metadata, dict):
        return []
    if len(metadata) > MAX_METADATA_FIELDS or any(
        len(k) > MAX_METADATA_NAME or (isinstance(v, str) and len(v) > MAX_METADATA_VALUE)
        for k, v in metadata.items()
    ):
        return [
            Problem(
                300,
                f"{MSG_METADATA} At most 10 fields, names up to 20 and values up to 80 characters.",
            )
        ]
    return []


def problems(body: object) -> list[Problem]:
    """Every problem Postmark would report for this parsed JSON body, in order."""
    out = _schema_problems(body)
    if not isinstance(body, dict):
        return out
    out += _address_problems(body)
    out += _content_problems(body)
    out += _metadata_problems(body)
    return out


def validate(body: object) -> list[str]:
    """Why Postmark would refuse this parsed JSON body ("code: message"); [] if valid."""
    return [str(p) for p in problems(body)]


# ---------------------------------------------------------------------------- HTTP server


@dataclass
class ReceivedRequest(fakehttp.ReceivedRequest):
    """One request as the fake saw it, and how it answered."""

    body: Any = None  # the parsed JSON body, None when it was not JSON

    @property
    def response(self) -> Any:
        """The answer's parsed JSON."""
        return json.loads(self.response_body)


def _error(status: int, code: int | None, message: str) -> Answer:
    """Postmark's error body; code None for HTTP-level answers without an ErrorCode."""
    data: dict[str, Any] = {"Message": message} if code is None else {"ErrorCode": code}
    data["Message"] = message
    return Answer.of(status, data)


def _refused(status: int, code: int | None, message: str) -> Refused:
    reason = f"{code}: {message}" if code is not None else f"HTTP {status}: {message}"
    return Refused(_error(status, code, message), reason)


def _media_type(value: str) -> str:
    return value.partition(";")[0].strip().lower()


class FakePostmark(FakeHTTP[ReceivedRequest]):
    """Postmark's POST /email on 127.0.0.1, checking requests as Postmark does."""

    server_version = "FakePostmark/1"

    def __init__(
        self,
        server_token: str = "pm-test",
        *,
        inactive: tuple[str, ...] = (),
        senders: tuple[str, ...] | None = None,
        streams: tuple[str, ...] = ("outbound",),
    ) -> None:
        super().__init__(ReceivedRequest)
        self.server_token = server_token
        self.inactive = frozenset(a.lower() for a in inactive)
        # confirmed sender signatures: addresses, or "@domain" for a whole domain
        self.senders = None if senders is None else frozenset(s.lower() for s in senders)
        self.streams = frozenset(streams)

    def _check_http(self, record: ReceivedRequest) -> None:
        if len(record.raw) > MAX_REQUEST_BYTES:
            raise _refused(413, 300, MSG_TOO_LARGE)
        if record.path.split("?", 1)[0] != PATH:
            raise _refused(404, None, MSG_NOT_FOUND)
        if record.method != "POST":
            raise _refused(405, None, MSG_METHOD_NOT_ALLOWED)
        token = record.headers.get(TOKEN_HEADER, "").strip()
        if not token:
            raise _refused(401, 10, MSG_AUTH_MISSING)
        if token.lower() != self.server_token.lower():  # "header name and value are case
            raise _refused(401, 10, MSG_AUTH_INVALID)  # insensitive" (API overview)
        for name in ("accept", "content-type"):
            if _media_type(record.headers.get(name, "")) != "application/json":
                raise _refused(415, 409, MSG_JSON_REQUIRED)

    def _decode(self, record: ReceivedRequest) -> dict[str, Any]:
        try:
            body = json.loads(record.raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _refused(422, 402, MSG_INVALID_JSON) from exc
        record.body = body
        if not isinstance(body, dict):
            raise _refused(422, 402, MSG_INVALID_JSON)
        return body

    def _check_account(self, body: dict[str, Any]) -> list[str]:
        """The inactive recipients of a valid body; Refused for account refusals."""
        stream = body.get("MessageStream", "outbound")
        if stream not in self.streams:
            message = f"The message stream '{stream}' does not exist on this server."
            raise _refused(422, 1235, message)
        sender = (addresses(body.get("From")) or [""])[0].lower()
        if self.senders is not None and not (
            sender in self.senders or "@" + sender.rpartition("@")[2] in self.senders
        ):
            raise _refused(422, 400, MSG_NOT_A_SENDER.format(address=body["From"]))
        recipients = [a for f in RECIPIENT_FIELDS for a in addresses(body.get(f))]
        inactive = [a for a in recipients if a.lower() in self.inactive]
        if inactive and len(inactive) == len(recipients):
            message = MSG_ALL_INACTIVE.format(addresses=", ".join(a.lower() for a in inactive))
            raise _refused(422, 406, message)
        return inactive

    def _answer(self, record: ReceivedRequest) -> Answer:
        self._check_http(record)
        body = self._decode(record)
        found = problems(body)
        if found:
            record.errors = [str(p) for p in found]
            return _error(422, found[0].code, found[0].message)
        inactive = self._check_account(body)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        message = MSG_OK
        if inactive:
            message = MSG_SOME_INACTIVE.format(addresses=", ".join(a.lower() for a in inactive))
        submitted = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        answer = {
            "To": body["To"],
            "SubmittedAt": submitted,
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": message,
        }
        return Answer.of(200, answer)
