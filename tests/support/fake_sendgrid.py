"""A local fake of SendGrid's v3 Mail Send API (POST /v3/mail/send) for tests.

FakeSendGrid is a real HTTP/1.1 server on 127.0.0.1 (the harness of
tests/support/fakehttp.py). It checks every request the way SendGrid documents it,
answers refused requests the way SendGrid does, records every request (valid or not)
in ``requests``, and collects every reason it refused one in ``errors``.
A valid request gets the next answer queued with ``respond_with()``, or by default
``202 Accepted`` with an empty body and a fresh ``X-Message-Id`` header.

    with FakeSendGrid(api_key="SG.test") as fake:
        ...  # POST to fake.url + "/v3/mail/send"
        assert fake.requests[0].accepted

``validate(body)`` is the pure part: the list of problems SendGrid would report for a
parsed JSON body (empty when SendGrid would take it). Tests use it directly to prove
that a request builder satisfies the documented API.

Sources (both under tests/provider_specs/):
  SPEC  sendgrid_mail_send.openapi.json - twilio/sendgrid-oai tsg_mail_v3.json
  DOCS  sendgrid_mail_send_errors.json  - sendgrid/docs Mail Send errors and limitations
Every error message the fake gives for a documented rule is looked up in DOCS at import
time (``_doc``), so a text that is not documented fails loudly instead of drifting.

What is checked, in this order, and where each rule comes from:
  HTTP
  - path /v3/mail/send, else 404 "not found" (SPEC responses.PostMailSend404); any
    method but POST there: 405 "method not allowed" (SPEC PostMailSend405)
  - ``Authorization: Bearer <api_key>`` (SPEC securitySchemes.BearerAuth): 401 with
    "authorization required" when missing or not a Bearer token, 401 with "The
    provided authorization grant is invalid, expired, or revoked" for another key
    (DOCS limitations.auth_errors_observed: missing / invalid)
  - request body under 30 MB: 413 "content too large" (DOCS limitations.max_total_size,
    SPEC PostMailSend413)
  - Content-Type application/json (SPEC requestBodies.PostMailSend.content), optional
    ``Content-Encoding: gzip`` (SPEC parameters.MailBodyCompression): 415 otherwise
    (the status is HTTP's; the message texts are ours, SendGrid documents none)
  - UTF-8: 415 "Invalid UTF8 in request" (DOCS errors.Encoding)
  - valid JSON without duplicate object keys: 400 "Bad Request", the body SendGrid gives
    for unparseable requests (sendgrid/sendgrid-nodejs#288, sendgrid/sendgrid-ruby#123)
  Body (``validate``; each problem becomes ``{"message", "field", "help": null}`` in a
  400 answer, ``field`` a dotted path such as ``personalizations.0.to``)
  - JSON Schema Draft 2020-12 of SPEC components.requestBodies.PostMailSend (refs
    resolved against SPEC components, ``format: email`` asserted): required
    personalizations and from, ``to`` in each personalization, at most 1000
    personalizations, non-empty subject/content strings, attachment ``content`` and
    ``filename`` required, ``disposition`` in {inline, attachment}, reply_to_list items
    unique, at most 10 unique categories, ...
    One correction (SPEC_CORRECTIONS): SPEC types the top-level ``custom_args`` as a
    string, but SendGrid takes an object of strings and refuses a string with "Invalid
    type. Expected: object, given: string." (field custom_args; Stack Exchange question
    by higgmp), and every official helper library sends an object.
  - at least one personalization, each with a non-empty ``to`` (DOCS personalizations)
  - at most 1000 recipients, to + cc + bcc over all personalizations (DOCS
    limitations.max_recipients, errors.personalizations)
  - each address at most once in the whole request, compared case-insensitively
    (DOCS errors.personalizations)
  - addresses at most 320 characters (DOCS personalizations.to/cc/bcc, from, reply_to)
  - to/cc/bcc names without ';' or ',' (DOCS limitations.name_forbidden_chars)
  - an ASCII from address (DOCS limitations.from_unicode)
  - reply_to or reply_to_list, not both (SPEC reply_to_list description)
  - a subject at the top level or in every personalization, unless a template_id is
    given (DOCS errors.subject)
  - content present and non-empty unless a template_id is given (DOCS errors.content);
    text/plain first, then text/html, then anything else (DOCS errors.content.value);
    content types without ';' or CR/LF (DOCS errors.content.type)
  - headers, top level and per personalization: string values, ASCII keys without
    spaces, no reserved key (DOCS limitations.reserved_headers, case-insensitive), no
    duplicate key (header names are case-insensitive, RFC 5322 section 1.2.2)
    (DOCS errors.headers, errors.personalizations.headers)
  - attachments: content that decodes as base64 (DOCS attachments.content); filename
    and content_id without CR/LF, type without ';' or CR/LF (DOCS attachments.*)
  - custom_args, top level and per personalization: non-empty, string values, at most
    10,000 bytes together (DOCS personalizations.custom_args, limitations)
  - categories in ASCII (DOCS errors.categories)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import gzip
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator

from tests.support import fakehttp
from tests.support.fakehttp import Answer, FakeHTTP, Refused

SPECS = Path(__file__).resolve().parent.parent / "provider_specs"
SPEC_PATH = SPECS / "sendgrid_mail_send.openapi.json"
DOCS_PATH = SPECS / "sendgrid_mail_send_errors.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
DOCS: dict[str, Any] = json.loads(DOCS_PATH.read_text(encoding="utf-8"))

PATH = "/v3/mail/send"
MAX_BODY_BYTES = 30 * 1000 * 1000  # "must be less than 30MB"
MAX_RECIPIENTS = 1000
MAX_ADDRESS_LENGTH = 320
MAX_CUSTOM_ARGS_BYTES = DOCS["limitations"]["custom_args_max_bytes"]
RESERVED_HEADERS = frozenset(h.lower() for h in DOCS["limitations"]["reserved_headers"])
REQUEST_SCHEMA_POINTER = "#/components/requestBodies/PostMailSend/content/application~1json/schema"

# Where SPEC disagrees with what the live API does (see the module docstring).
SPEC_CORRECTIONS: Mapping[str, Any] = {
    "custom_args": {"type": "object"},
}


def _doc(fld: str, start: str) -> str:
    """The documented error message of DOCS errors[fld] that begins with start."""
    for message in DOCS["errors"][fld]["messages"]:
        if message.startswith(start):
            return str(message)
    raise LookupError(f"SendGrid documents no {fld!r} error starting {start!r}")


def _limit(key: str) -> str:
    return str(DOCS["limitations"][key])


MSG_NO_PERSONALIZATION = _doc("personalizations", "You must have at least one")
MSG_TO_REQUIRED = _doc("personalizations", "The to parameter is required")
MSG_TOO_MANY_RECIPIENTS = _doc("personalizations", "There is a limit of 1000 total")
MSG_DUPLICATE_ADDRESS = _doc("personalizations", "Each unique email address in the")
MSG_ADDRESS_TOO_LONG = {
    "to": _doc("personalizations.to", "The To email exceeds"),
    "cc": _doc("personalizations.cc", "The CC email exceeds"),
    "bcc": _doc("personalizations.bcc", "The BCC email exceeds"),
    "from": _doc("from", "The From email exceeds"),
    "reply_to": _doc("reply_to", "The Reply-To email exceeds"),
}
MSG_NAME_CHARS = _limit("name_forbidden_chars")
MSG_FROM_UNICODE = _limit("from_unicode")
MSG_REPLY_TO_BOTH = (  # SPEC reply_to_list description
    "You can use either the reply_to property or reply_to_list property but not both."
)
MSG_SUBJECT_REQUIRED = _doc("subject", "The subject is required")
MSG_CONTENT_REQUIRED = _doc("content", "The content param is required")
MSG_CONTENT_EMPTY = _doc("content", "There must be at least one defined content block")
MSG_CONTENT_ORDER = _doc("content.value", "Following RFC 1341")
MSG_CONTENT_TYPE_CHARS = _doc("content.type", "Cannot contain ';'")
MSG_HEADERS = {  # top level, then per personalization
    "headers": {
        "value": _doc("headers", "The header values must be strings"),
        "duplicate": _doc("headers", "The headers cannot contain duplicate keys"),
        "key": _doc("headers", "Header keys cannot contain"),
        "reserved": _doc("headers", "Header can not be one of the reserved keys"),
    },
    "personalizations.headers": {
        "value": _doc("personalizations.headers", "All values of the headers object"),
        "duplicate": _doc("personalizations.headers", "The headers cannot contain duplicate"),
        "key": _doc("personalizations.headers", "Header keys cannot contain"),
        "reserved": _doc("personalizations.headers", "Header cannot be one of the reserved"),
    },
}
MSG_ATTACHMENT_BASE64 = _doc("attachments.content", "The attachment content must be base64")
MSG_FILENAME_CRLF = _doc("attachments.filename", "The filename of your attachment cannot")
MSG_ATTACHMENT_TYPE_CHARS = _doc("attachments.type", "The type cannot contain")
MSG_CONTENT_ID_CRLF = _doc("attachments.content_id", "The content ID of your attachment cannot")
MSG_CUSTOM_ARGS_STRINGS = _doc("personalizations.custom_args", "All values of custom arguments")
MSG_CUSTOM_ARGS_EMPTY = _doc("personalizations.custom_args", "custom_args cannot be empty")
MSG_CUSTOM_ARGS_SIZE = _doc("personalizations.custom_args", "The combined size")
MSG_CATEGORIES_ASCII = _doc("categories", "Categories can not contain non-ASCII")
MSG_INVALID_UTF8 = _doc("Encoding", "Invalid UTF8")
MSG_AUTH_MISSING = DOCS["limitations"]["auth_errors_observed"]["missing"]["errors"][0]["message"]
MSG_AUTH_INVALID = DOCS["limitations"]["auth_errors_observed"]["invalid"]["errors"][0]["message"]


def _spec_example(response: str) -> str:
    content = SPEC["components"]["responses"][response]["content"]["application/json"]
    return str(next(iter(content["examples"].values()))["value"]["errors"][0]["message"])


MSG_NOT_FOUND = _spec_example("PostMailSend404")
MSG_METHOD_NOT_ALLOWED = _spec_example("PostMailSend405")
MSG_TOO_LARGE = _spec_example("PostMailSend413")
MSG_BAD_REQUEST = "Bad Request"


def _request_schema_root() -> dict[str, Any]:
    """A root schema holding SPEC's components and a $ref to the request body schema."""
    components = copy.deepcopy(SPEC["components"])
    body = components["requestBodies"]["PostMailSend"]["content"]["application/json"]["schema"]
    for prop, schema in SPEC_CORRECTIONS.items():
        body["properties"][prop] = {**body["properties"][prop], **schema}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": components,
        "$ref": REQUEST_SCHEMA_POINTER,
    }


SCHEMA_VALIDATOR = Draft202012Validator(
    _request_schema_root(), format_checker=Draft202012Validator.FORMAT_CHECKER
)


class Problem(NamedTuple):
    """One entry of SendGrid's error list: the field (dotted path) and the message."""

    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def as_json(self) -> dict[str, Any]:
        return {"message": self.message, "field": self.field, "help": None}


# ---------------------------------------------------------------------------- body rules


def _path(*parts: object) -> str:
    return ".".join(str(p) for p in parts)


def _dicts(value: object) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, item) for the object items of a list; the schema reports the rest."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield i, item


def _schema_problems(body: object) -> list[Problem]:
    return [
        Problem(_path(*e.absolute_path) or None, e.message)
        for e in sorted(SCHEMA_VALIDATOR.iter_errors(body), key=lambda e: list(map(str, e.path)))
    ]


def _address_problems(obj: dict[str, Any], fld: str, kind: str) -> list[Problem]:
    email = obj.get("email")
    if isinstance(email, str) and len(email) > MAX_ADDRESS_LENGTH:
        return [Problem(_path(fld, "email"), MSG_ADDRESS_TOO_LONG[kind])]
    return []


def _personalization_problems(body: dict[str, Any]) -> list[Problem]:
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list):
        return []  # missing or of the wrong type: the schema says so
    if not personalizations:
        return [Problem("personalizations", MSG_NO_PERSONALIZATION)]
    out: list[Problem] = []
    seen: set[str] = set()
    reported: set[str] = set()
    total = 0
    for i, p in _dicts(personalizations):
        if isinstance(p.get("to"), list) and not p["to"]:
            out.append(Problem(_path("personalizations", i, "to"), MSG_TO_REQUIRED))
        for kind in ("to", "cc", "bcc"):
            for j, rcpt in _dicts(p.get(kind)):
                total += 1
                fld = _path("personalizations", i, kind, j)
                out += _address_problems(rcpt, fld, kind)
                name = rcpt.get("name")
                if isinstance(name, str) and (";" in name or "," in name):
                    out.append(Problem(_path(fld, "name"), MSG_NAME_CHARS))
                email = rcpt.get("email")
                if not isinstance(email, str):
                    continue
                key = email.lower()
                if key in seen and key not in reported:
                    reported.add(key)
                    message = MSG_DUPLICATE_ADDRESS.replace("[email address]", email)
                    out.append(Problem("personalizations", message))
                seen.add(key)
        out += _from_problems(p.get("from"), _path("personalizations", i, "from"))
        out += _header_problems(p.get("headers"), _path("personalizations", i, "headers"))
    if total > MAX_RECIPIENTS:
        out.append(Problem("personalizations", MSG_TOO_MANY_RECIPIENTS))
    return out


def _from_problems(sender: object, fld: str) -> list[Problem]:
    if not isinstance(sender, dict):
        return []
    out = _address_problems(sender, fld, "from")
    email = sender.get("email")
    if isinstance(email, str) and not email.isascii():
        out.append(Problem(_path(fld, "email"), MSG_FROM_UNICODE))
    return out


def _header_problems(headers: object, fld: str) -> list[Problem]:
    if not isinstance(headers, dict):
        return []
    messages = MSG_HEADERS["headers" if fld == "headers" else "personalizations.headers"]
    out: list[Problem] = []
    seen: set[str] = set()
    for key, value in headers.items():
        where = _path(fld, key)
        if not isinstance(value, str):
            out.append(Problem(where, messages["value"]))
        if not key or not key.isascii() or any(c.isspace() for c in key):
            out.append(Problem(where, messages["key"]))
        if key.lower() in RESERVED_HEADERS:
            out.append(Problem(where, messages["reserved"]))
        if key.lower() in seen:
            out.append(Problem(where, messages["duplicate"]))
        seen.add(key.lower())
    return out


def _subject_problems(body: dict[str, Any]) -> list[Problem]:
    if "template_id" in body or "subject" in body:
        return []  # an empty or non-string subject is the schema's to report
    personalizations = body.get("personalizations")
    if (
        isinstance(personalizations, list)
        and personalizations
        and all(isinstance(p, dict) and "subject" in p for p in personalizations)
    ):
        return []
    return [Problem("subject", MSG_SUBJECT_REQUIRED)]


def _content_problems(body: dict[str, Any]) -> list[Problem]:
    content = body.get("content")
    if "template_id" not in body:
        if content is None:
            return [Problem("content", MSG_CONTENT_REQUIRED)]
        if content == []:
            return [Problem("content", MSG_CONTENT_EMPTY)]
    out: list[Problem] = []
    types = []
    for i, block in _dicts(content):
        ctype = block.get("type")
        if not isinstance(ctype, str):
            continue
        types.append(ctype.strip().lower())
        if ";" in ctype or "\r" in ctype or "\n" in ctype:
            out.append(Problem(_path("content", i, "type"), MSG_CONTENT_TYPE_CHARS))
    # text/plain first, then text/html, then anything else
    leading = [t for t in types if t in ("text/plain", "text/html")]
    if types[: len(leading)] != sorted(leading, key=("text/plain", "text/html").index):
        out.append(Problem("content", MSG_CONTENT_ORDER))
    return out


def _attachment_problems(body: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    for i, att in _dicts(body.get("attachments")):
        content = att.get("content")
        if isinstance(content, str) and content:
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                out.append(Problem(_path("attachments", i, "content"), MSG_ATTACHMENT_BASE64))
        checks = (
            ("filename", "\r\n", MSG_FILENAME_CRLF),
            ("type", ";\r\n", MSG_ATTACHMENT_TYPE_CHARS),
            ("content_id", "\r\n", MSG_CONTENT_ID_CRLF),
        )
        for key, forbidden, message in checks:
            value = att.get(key)
            if isinstance(value, str) and any(c in value for c in forbidden):
                out.append(Problem(_path("attachments", i, key), message))
    return out


def _custom_args_size(args: object) -> int:
    if not isinstance(args, dict):
        return 0
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in args.items())


def _custom_args_problems(body: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    places: list[tuple[str, object]] = [("custom_args", body.get("custom_args"))]
    places += [
        (_path("personalizations", i, "custom_args"), p.get("custom_args"))
        for i, p in _dicts(body.get("personalizations"))
    ]
    for fld, args in places:
        if not isinstance(args, dict):
            continue  # absent, or the schema reports the type
        if not args:
            out.append(Problem(fld, MSG_CUSTOM_ARGS_EMPTY))
        if any(not isinstance(v, str) for v in args.values()):
            out.append(Problem(fld, MSG_CUSTOM_ARGS_STRINGS))
    top = _custom_args_size(body.get("custom_args"))
    for i, p in _dicts(body.get("personalizations")):
        if top + _custom_args_size(p.get("custom_args")) > MAX_CUSTOM_ARGS_BYTES:
            out.append(Problem(_path("personalizations", i, "custom_args"), MSG_CUSTOM_ARGS_SIZE))
    if not isinstance(body.get("personalizations"), list) and top > MAX_CUSTOM_ARGS_BYTES:
        out.append(Problem("custom_args", MSG_CUSTOM_ARGS_SIZE))
    return out


def problems(body: object) -> list[Problem]:
    """Every problem SendGrid would report for this parsed JSON body, as (field, message)."""
    out = _schema_problems(body)
    if not isinstance(body, dict):
        return out
    out += _personalization_problems(body)
    out += _from_problems(body.get("from"), "from")
    if isinstance(body.get("reply_to"), dict):
        out += _address_problems(body["reply_to"], "reply_to", "reply_to")
    if "reply_to" in body and "reply_to_list" in body:
        out.append(Problem("reply_to_list", MSG_REPLY_TO_BOTH))
    for i, rcpt in _dicts(body.get("reply_to_list")):
        out += _address_problems(rcpt, _path("reply_to_list", i), "reply_to")
    out += _subject_problems(body)
    out += _content_problems(body)
    out += _header_problems(body.get("headers"), "headers")
    out += _attachment_problems(body)
    out += _custom_args_problems(body)
    categories = body.get("categories")
    if isinstance(categories, list) and any(
        isinstance(c, str) and not c.isascii() for c in categories
    ):
        out.append(Problem("categories", MSG_CATEGORIES_ASCII))
    return out


def validate(body: object) -> list[str]:
    """Why SendGrid would refuse this parsed JSON body ("field: message"); [] if it is valid."""
    return [str(p) for p in problems(body)]


# ---------------------------------------------------------------------------- HTTP server


@dataclass
class ReceivedRequest(fakehttp.ReceivedRequest):
    """One request as the fake saw it (raw is b"" when it was too large), and how it
    answered."""

    body: Any = None  # the parsed JSON body, None when it was not JSON


def _errors_answer(
    status: int, found: list[Problem], headers: Mapping[str, str] | None = None
) -> Answer:
    return Answer.of(status, {"errors": [p.as_json() for p in found]}, headers)


def _refused(status: int, message: str, headers: Mapping[str, str] | None = None) -> Refused:
    """A request SendGrid refuses before it reads the body's fields."""
    return Refused(_errors_answer(status, [Problem(None, message)], headers), message)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _decode_json(headers: Mapping[str, str], raw: bytes | None) -> Any:
    """The parsed JSON body, or Refused as SendGrid would answer (size, type, encoding)."""
    if raw is None:
        raise _refused(413, MSG_TOO_LARGE)
    media_type, _, params = headers.get("content-type", "").partition(";")
    charset = params.strip().lower().removeprefix("charset=").strip('"')
    if media_type.strip().lower() != "application/json" or charset not in ("", "utf-8"):
        raise _refused(415, "Content-Type should be application/json (UTF-8).")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise _refused(400, MSG_BAD_REQUEST) from exc
        if len(raw) >= MAX_BODY_BYTES:
            raise _refused(413, MSG_TOO_LARGE)
    elif encoding != "identity":
        raise _refused(415, "Content-Encoding must be gzip when given.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refused(415, MSG_INVALID_UTF8) from exc
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:
        raise _refused(400, MSG_BAD_REQUEST) from exc


class FakeSendGrid(FakeHTTP[ReceivedRequest]):
    """SendGrid's POST /v3/mail/send on 127.0.0.1, checking requests as SendGrid does.

    Answers queued with respond_with() are sent as given (no X-Message-Id is added).
    """

    server_version = "FakeSendGrid/1"

    def __init__(self, api_key: str = "SG.test") -> None:
        super().__init__(ReceivedRequest)
        self.api_key = api_key

    def _check_route_and_auth(self, record: ReceivedRequest) -> None:
        if record.path.split("?", 1)[0] != PATH:
            raise _refused(404, MSG_NOT_FOUND)
        if record.method != "POST":
            raise _refused(405, MSG_METHOD_NOT_ALLOWED, {"Allow": "POST"})
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused(401, MSG_AUTH_MISSING)
        if token.strip() != self.api_key:
            raise _refused(401, MSG_AUTH_INVALID)

    def _answer(self, record: ReceivedRequest) -> Answer:
        # a body as large as SendGrid refuses is read (so the client gets the answer)
        # but not kept
        raw = None if len(record.raw) >= MAX_BODY_BYTES else record.raw
        record.raw = raw or b""
        try:
            self._check_route_and_auth(record)
            record.body = _decode_json(record.headers, raw)
        except Refused:
            with contextlib.suppress(ValueError):  # still record what was sent
                record.body = json.loads(raw or b"")
            raise
        found = problems(record.body)
        if found:
            record.errors = [str(p) for p in found]
            return _errors_answer(400, found)
        return self._scripted() or Answer(202, b"", {"X-Message-Id": uuid.uuid4().hex})
