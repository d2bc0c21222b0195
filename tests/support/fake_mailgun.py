"""A local fake of Mailgun's raw-MIME send (POST /v3/{domain}/messages.mime) for tests.

FakeMailgun is a real HTTP/1.1 server on 127.0.0.1 (the harness of
tests/support/fakehttp.py). It checks every request the way Mailgun documents it,
answers refused requests the way Mailgun does, records every request (valid or not) in
``requests`` with the exact bytes of its ``message`` part and its ``to`` fields, and
collects every reason it refused one in ``errors``. A valid request gets the next
answer queued with ``respond_with()``, or by default ``200`` with
``{"id": "<...@domain>", "message": "Queued. Thank you."}`` and a fresh id.

    with FakeMailgun(api_key="key-test", domains=("mg.example.com",)) as fake:
        ...  # POST to fake.url + "/v3/mg.example.com/messages.mime"
        assert fake.requests[0].message == raw

``validate(fields, files)`` is the pure part: the problems Mailgun would report for the
form fields and file parts of a request (empty when Mailgun would take it).

Source (under tests/provider_specs/):
  SPEC  mailgun_messages.openapi.json - Mailgun's published OpenAPI 3.1, messages.mime
Error texts SPEC gives are read from it at import time (``_spec_example``), so a text
SPEC does not hold fails loudly instead of drifting.

What is checked, in this order, and where each rule comes from:
  HTTP
  - request body at most 25 MiB, else 413 with nginx's HTML page, before anything else
    is looked at ("Mailgun supports maximum messages size of 25MB", Mailgun's user
    manual; 413 Request Entity Too Large: mailgun/documentation#324/#325,
    mailgun/mailgun-js-boland#67). The fake takes the larger reading, 25 MiB.
  - path /v3/<domain>/messages.mime (SPEC paths), else 404 {"message": "Not Found"};
    any method but POST there: 405 (texts ours)
  - HTTP Basic auth, user "api" and the API key (SPEC securitySchemes.basicAuth:
    "HTTP Basic auth using api:YOUR_API_KEY"), else 401 with the body ``Forbidden``
    (SPEC responses.401 example; sent as text/plain, as Mailgun does)
  - a domain the fake knows (the ``domain_name`` path parameter, SPEC), else 404
    {"message": "Domain not found: <domain>"} (status as Mailgun answers for a domain
    the account lacks; the text is ours)
  - Content-Type multipart/form-data with a boundary (SPEC requestBody.content), and a
    well-formed multipart body with UTF-8 form fields: 400 otherwise (texts ours)
  Fields (``validate``; each problem is a 400 {"message": ...})
  - ``message`` present (SPEC schema required), exactly once, as a file upload ("Make
    sure to use multipart/form-data content type to send this as a file upload", SPEC
    message description), not empty
  - at least one ``to`` (SPEC schema required): "'to' parameter is missing" (Mailgun's
    answer, Bogardo/Mailgun-Magento2#15)
  - every ``to`` value a comma-separated list of valid addresses (SPEC to description:
    "Use commas to separate multiple recipients"): SPEC's 400 example "to parameter is
    not a valid address. please check documentation."
  - at most 1000 distinct recipients ("Duplicate addresses are automatically ignored",
    SPEC): "Too many recipients, max is 1000" (Mailgun's answer, mailgun/mailgun-ruby#87,
    mailgun/mailgun-js-boland#97)
  - the SPEC schema itself, JSON Schema Draft 2020-12 (types: one value for string
    fields, enums such as o:tracking in {yes, no, true, false, htmlonly}, ...)
  - send options (o:, h:, v:, t:) at most 16 KB together (SPEC operation description);
    SPEC's 400 example text "Send options (parameters starting with o:, h:, or v:) are
    limited to 16KB total"
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import json
import re
import uuid
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator

from tests.support import fakehttp
from tests.support.fakehttp import Answer, FakeHTTP, Refused

SPECS = Path(__file__).resolve().parent.parent / "provider_specs"
SPEC_PATH = SPECS / "mailgun_messages.openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
OPERATION: dict[str, Any] = SPEC["paths"]["/v3/{domain_name}/messages.mime"]["post"]
REQUEST_SCHEMA: dict[str, Any] = SPEC["components"]["schemas"][
    "POST-v3-domain_name-messages-mime-multipart-form-data-RequestBody"
]

PATH = re.compile(r"/v3/(?P<domain>[^/?#]+)/messages\.mime")
MAX_REQUEST_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000
MAX_OPTIONS_BYTES = 16 * 1024  # "limited to 16KB total"
OPTION_PREFIXES = ("o:", "h:", "v:", "t:")
ARRAY_FIELDS = frozenset(
    name for name, prop in REQUEST_SCHEMA["properties"].items() if prop.get("type") == "array"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"[^@\s\"(),:;<>\[\\\]]+@{_LABEL}(?:\.{_LABEL})+")


def _spec_example(status: str) -> Any:
    content = OPERATION["responses"][status]["content"]["application/json"]
    return next(iter(content["examples"].values()))["value"]


def _spec_400(start: str) -> str:
    """The 400 example text of SPEC that begins with start, up to its closing quote."""
    text = str(_spec_example("400")["message"])
    at = text.find(start)
    if at < 0:
        raise LookupError(f"Mailgun's SPEC gives no 400 example starting {start!r}")
    return text[at:].split("'", 1)[0]


MSG_FORBIDDEN = str(_spec_example("401"))
MSG_QUEUED = str(_spec_example("200")["message"])
MSG_TO_INVALID = _spec_400("to parameter is not a valid address")
MSG_OPTIONS_TOO_LARGE = _spec_400("Send options (parameters starting with")
MSG_TO_MISSING = "'to' parameter is missing"
MSG_TOO_MANY_RECIPIENTS = f"Too many recipients, max is {MAX_RECIPIENTS}"
MSG_MESSAGE_MISSING = "'message' parameter is missing"  # ours, worded as for 'to'
MSG_MESSAGE_NOT_FILE = "'message' must be sent as a file upload (multipart/form-data)"
MSG_MESSAGE_TWICE = "'message' parameter must be given once"
MSG_MESSAGE_EMPTY = "'message' parameter is empty"
MSG_NOT_MULTIPART = "messages.mime takes multipart/form-data"
MSG_BAD_MULTIPART = "malformed multipart/form-data body"
MSG_NOT_FOUND = "Not Found"
MSG_METHOD_NOT_ALLOWED = "Method Not Allowed"
NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

SCHEMA_VALIDATOR = Draft202012Validator(REQUEST_SCHEMA)


class Part(NamedTuple):
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


# ---------------------------------------------------------------------------- multipart


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data (RFC 7578, RFC 2046 5.1.1)."""


def boundary_of(content_type: str) -> str | None:
    """The boundary of a multipart/form-data Content-Type, None for any other type."""
    msg = Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        return None
    boundary = msg.get_param("boundary")
    return boundary if isinstance(boundary, str) and boundary else None


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """The parts of a multipart/form-data body, each part's bytes exactly as sent."""
    delimiter = b"--" + boundary.encode("ascii")
    if not body.startswith(delimiter + b"\r\n"):
        raise MultipartError("the body does not start with the boundary")
    end = body.rfind(b"\r\n" + delimiter + b"--")
    if end < 0 or body[end + len(delimiter) + 4 :] not in (b"", b"\r\n"):
        raise MultipartError("no closing boundary")
    chunks = body[len(delimiter) + 2 : end].split(b"\r\n" + delimiter + b"\r\n")
    parts = []
    for chunk in chunks:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a part has no header/body separator")
        headers = Message()
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("utf-8").partition(":")
            if not colon:
                raise MultipartError(f"bad part header line {line!r}")
            headers[name.strip()] = value.strip()
        if headers.get_content_disposition() != "form-data":
            raise MultipartError("a part without Content-Disposition: form-data")
        part_name = headers.get_param("name", header="content-disposition")
        if not isinstance(part_name, str) or not part_name:
            raise MultipartError("a part without a name")
        filename = headers.get_filename()
        parts.append(Part(part_name, filename, headers.get("Content-Type"), data))
    return parts


# ---------------------------------------------------------------------------- field rules


def _addresses(value: str) -> list[str] | None:
    """The addr-specs of a comma-separated `to` value, None when one is not valid."""
    pairs = email.utils.getaddresses([value])
    out = []
    for _, addr in pairs:
        if not _ADDRESS.fullmatch(addr):
            return None
        out.append(addr)
    return out or None


def _schema_instance(fields: list[tuple[str, str]], files: list[Part]) -> dict[str, Any]:
    instance: dict[str, Any] = {}
    for name, value in [*fields, *((p.name, "<file>") for p in files)]:
        if name in ARRAY_FIELDS:
            instance.setdefault(name, []).append(value)
        elif name in instance:  # a string field given twice
            previous = instance[name]
            instance[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            instance[name] = value
    return instance


def _message_problem(fields: list[tuple[str, str]], files: list[Part]) -> str | None:
    messages = [p for p in files if p.name == "message"]
    if any(name == "message" for name, _ in fields):
        return MSG_MESSAGE_NOT_FILE
    if not messages:
        return MSG_MESSAGE_MISSING
    if len(messages) > 1:
        return MSG_MESSAGE_TWICE
    if not messages[0].data:
        return MSG_MESSAGE_EMPTY
    return None


def _to_problem(fields: list[tuple[str, str]]) -> str | None:
    to = [value for name, value in fields if name == "to"]
    if not to:
        return MSG_TO_MISSING
    recipients: set[str] = set()
    for value in to:
        found = _addresses(value)
        if found is None:
            return MSG_TO_INVALID
        recipients.update(a.lower() for a in found)
    if len(recipients) > MAX_RECIPIENTS:
        return MSG_TOO_MANY_RECIPIENTS
    return None


def validate(fields: list[tuple[str, str]], files: list[Part]) -> list[str]:
    """Why Mailgun would refuse these form fields and file parts; [] if it takes them."""
    first = _message_problem(fields, files) or _to_problem(fields)
    if first:
        return [first]
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message}"
        for e in SCHEMA_VALIDATOR.iter_errors(_schema_instance(fields, files))
    ]
    options = sum(
        len(name.encode()) + len(value.encode())
        for name, value in fields
        if name.startswith(OPTION_PREFIXES)
    )
    if options > MAX_OPTIONS_BYTES:
        problems.append(MSG_OPTIONS_TOO_LARGE)
    return problems


# ---------------------------------------------------------------------------- HTTP server


@dataclass
class ReceivedRequest(fakehttp.ReceivedRequest):
    """One request as the fake saw it, and how it answered."""

    domain: str | None = None
    fields: list[tuple[str, str]] = field(default_factory=list)  # non-file form fields
    files: list[Part] = field(default_factory=list)  # file parts

    @property
    def message(self) -> bytes | None:
        """The exact bytes of the ``message`` file part, None when there was none."""
        found = [p.data for p in self.files if p.name == "message"]
        return found[0] if found else None

    @property
    def to(self) -> list[str]:
        """The ``to`` fields, in order, as sent."""
        return [value for name, value in self.fields if name == "to"]


def _message_answer(status: int, message: str) -> Answer:
    return Answer.of(status, {"message": message})


def _message_refused(status: int, message: str, reason: str | None = None) -> Refused:
    return Refused(_message_answer(status, message), reason or message)


class FakeMailgun(FakeHTTP[ReceivedRequest]):
    """Mailgun's POST /v3/{domain}/messages.mime on 127.0.0.1, checking as Mailgun does."""

    server_version = "FakeMailgun/1"

    def __init__(
        self, api_key: str = "key-test", domains: tuple[str, ...] = ("mg.example.com",)
    ) -> None:
        super().__init__(ReceivedRequest)
        self.api_key = api_key
        self.domains = frozenset(d.lower() for d in domains)

    def _default_answer(self, domain: str) -> Answer:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
        message_id = f"<{stamp}.{uuid.uuid4().hex[:16]}@{domain}>"
        return Answer.of(200, {"id": message_id, "message": MSG_QUEUED})

    def _check_auth(self, record: ReceivedRequest) -> None:
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        try:
            user, _, key = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, key = "", ""
        if scheme.lower() != "basic" or user != "api" or key != self.api_key:
            answer = Answer(401, MSG_FORBIDDEN.encode(), {"Content-Type": "text/plain"})
            raise Refused(answer, MSG_FORBIDDEN)

    def _parse(self, record: ReceivedRequest) -> None:
        boundary = boundary_of(record.headers.get("content-type", ""))
        if boundary is None:
            raise _message_refused(400, MSG_NOT_MULTIPART)
        try:
            parts = parse_multipart(record.raw, boundary)
            for part in parts:
                if part.filename is None:
                    record.fields.append((part.name, part.data.decode("utf-8")))
                else:
                    record.files.append(part)
        except (MultipartError, UnicodeDecodeError) as exc:
            raise _message_refused(400, MSG_BAD_MULTIPART, f"{MSG_BAD_MULTIPART}: {exc}") from exc

    def _check_route(self, record: ReceivedRequest) -> str:
        """The domain of a request Mailgun would route; Refused otherwise."""
        if len(record.raw) > MAX_REQUEST_BYTES:  # nginx, before the API sees anything
            answer = Answer(413, NGINX_413, {"Content-Type": "text/html"})
            raise Refused(answer, "413 Request Entity Too Large")
        route = PATH.fullmatch(record.path.split("?", 1)[0])
        if route is None:
            raise _message_refused(404, MSG_NOT_FOUND)
        if record.method != "POST":
            raise _message_refused(405, MSG_METHOD_NOT_ALLOWED)
        self._check_auth(record)
        domain = route["domain"]
        if domain.lower() not in self.domains:
            raise _message_refused(404, f"Domain not found: {domain}")
        return domain

    def _answer(self, record: ReceivedRequest) -> Answer:
        domain = record.domain = self._check_route(record)
        self._parse(record)
        found = validate(record.fields, record.files)
        if found:
            record.errors = found
            return _message_answer(400, found[0])
        return self._scripted() or self._default_answer(domain)
