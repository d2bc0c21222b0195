"""SES provider: the request builder and its JSON body against botocore's SendEmail model
and serializer, the SigV4 signer against botocore's signer and AWS's published examples,
the error classifier on SES's HTTP answers, and send() over real sockets: to moto's SES
in server mode (what SES recorded), to a scripted SES endpoint in this module (the exact
request on the wire, its signature checked by botocore, throttling and server errors),
and to ports that refuse or stall.

Every AWS setting in the environment is replaced by dummies and AWS_ENDPOINT_URL points
at a closed port, so no test can reach a real AWS endpoint.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hmac
import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.utils
import pytest
import trio
from botocore.model import ServiceModel
from botocore.serialize import create_serializer
from botocore.validate import ParamValidator
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.ses.models import ses_backends

from smtpproxy.delivery.providers import sigv4
from smtpproxy.delivery.providers.base import Delivery, ProviderConfigError, ProviderSpec
from smtpproxy.delivery.providers.ses import (
    MAX_MESSAGE_BYTES,
    MAX_RECIPIENTS,
    PATH,
    TYPE,
    RequestError,
    SesProvider,
    build_request,
    classify,
    request_body,
)
from smtpproxy.models import OutcomeKind
from tests.support import deliveries
from tests.support.aws import MotoServer, no_real_aws
from tests.support.deliveries import opened, wire
from tests.support.fakehttp import Answer, FakeHTTP, ReceivedRequest, Refused
from tests.support.net import closed_port_url, silent_server

REGION = "us-east-1"
ACCESS_KEY = "AKIATESTINGSMTPPROXY"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"  # a dummy; moto takes any
SENDER = "alice@example.com"
SPEC_PATH = (
    Path(__file__).resolve().parent.parent / "provider_specs" / "sesv2_send_email.botocore.json"
)
SES_MODEL = ServiceModel(json.loads(SPEC_PATH.read_text(encoding="utf-8")), "sesv2")


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_real_aws(monkeypatch, tmp_path)


# ---------------------------------------------------------------------------- messages


message = functools.partial(
    deliveries.message, sender=f"Alice <{SENDER}>", subject="Grüße from smtpproxy", text="Hi\n"
)


def rich_body() -> bytes:
    """CRLF, 8-bit UTF-8 text, a leading dot, trailing spaces and a binary attachment."""
    m = message(text="Grüße, Bob\n.leading dot\ntrailing spaces   \n")
    m.replace_header("Content-Transfer-Encoding", "8bit")
    m.add_attachment(bytes(range(256)) * 8, maintype="application", subtype="octet-stream")
    body = wire(m)
    assert b"\r\n" in body
    assert "Grüße".encode() in body
    return body


def delivery(body: bytes | None = None, *recipients: str, mail_from: str = SENDER) -> Delivery:
    return deliveries.delivery(
        body if body is not None else wire(message()), *recipients, mail_from=mail_from
    )


def spec(endpoint: str | None, *, secret: str | None = SECRET_KEY, **settings: Any) -> ProviderSpec:
    settings.setdefault("region", REGION)
    if secret is not None:
        settings.setdefault("access_key_id", ACCESS_KEY)
    return ProviderSpec(
        name="ses1", type="ses", endpoint=endpoint, secret=secret, settings=settings
    )


def ses(endpoint: str | None, **kwargs: Any) -> AbstractAsyncContextManager[SesProvider]:
    return opened(SesProvider(spec(endpoint, **kwargs)))


def model_problems(params: dict[str, Any]) -> str:
    """botocore's report on params against SendEmail's input shape ("" when valid)."""
    shape = SES_MODEL.operation_model("SendEmail").input_shape
    assert shape is not None
    report = ParamValidator().validate(params, shape)
    return str(report.generate_report()) if report.has_errors() else ""


# ---------------------------------------------------------------------------- moto


class MotoSES(MotoServer):
    """moto's SES v2 in server mode on 127.0.0.1, with SENDER verified."""

    service = "sesv2"
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    config = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})

    def start(self) -> Self:
        super().start()
        try:
            self.shared.create_email_identity(EmailIdentity=SENDER)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def sent() -> list[Any]:
        """Every message moto's SES backend accepted (shared by the moto servers in this
        process, so tests look theirs up by message id)."""
        return list(ses_backends[DEFAULT_ACCOUNT_ID][REGION].sent_messages)

    def sent_by_id(self, message_id: str | None) -> Any:
        [found] = [m for m in self.sent() if m.id == message_id]
        return found


@pytest.fixture(scope="module")
def moto_ses() -> Iterator[MotoSES]:
    with MotoSES() as server:
        yield server


# ---------------------------------------------------------------------------- signatures

# the secret of every access key a test signs with: the provider's, and the one
# no_real_aws puts in the environment for the credential chain
KNOWN_KEYS = {ACCESS_KEY: SECRET_KEY, "testing": "testing"}
AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


def botocore_signature(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: botocore.credentials.Credentials,
    region: str,
    service: str,
    stamp: str,
) -> str:
    """The signature botocore's SigV4Auth computes for this request at this time
    (YYYYMMDDTHHMMSSZ), signing exactly the headers given."""
    request = botocore.awsrequest.AWSRequest(
        method=method, url=url, headers=dict(headers), data=body
    )
    request.context["timestamp"] = stamp
    signer = botocore.auth.SigV4Auth(credentials, service, region)
    canonical = signer.canonical_request(request)
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


def signature_problem(
    method: str, path: str, headers: Mapping[str, str], body: bytes, keys: Mapping[str, str]
) -> tuple[str, str]:
    """(error code, why) when the request's SigV4 signature is not SES's for the known
    keys, ("", "") when it is: recomputed by botocore from what was received."""
    found = AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if found is None:
        return "IncompleteSignature", "no SigV4 Authorization header"
    key = found["key"]
    if key not in keys:
        return "UnrecognizedClientException", f"unknown access key {key}"
    signed = found["signed"].split(";")
    if problem := scope_problem(found, signed, headers):
        return problem
    expected = botocore_signature(
        method,
        f"http://{headers['host']}{path}",
        {name: headers.get(name, "") for name in signed},
        body,
        botocore.credentials.Credentials(key, keys[key], headers.get("x-amz-security-token")),
        REGION,
        "ses",
        headers["x-amz-date"],
    )
    if not hmac.compare_digest(expected, found["signature"]):
        return "SignatureDoesNotMatch", "signature does not match"
    return "", ""


def scope_problem(
    found: re.Match[str], signed: list[str], headers: Mapping[str, str]
) -> tuple[str, str] | None:
    """Why the signature cannot be SES's whatever its value: a header that must be
    signed is not, X-Amz-Date is not now, or the scope is not SES's in REGION that day."""
    token = headers.get("x-amz-security-token")
    needed = {"host", "x-amz-date"} | ({"x-amz-security-token"} if token else set())
    if missing := needed - set(signed):
        return "IncompleteSignature", f"not signed: {sorted(missing)}"
    stamp = headers.get("x-amz-date", "")
    if not re.fullmatch(r"\d{8}T\d{6}Z", stamp):
        return "IncompleteSignature", f"X-Amz-Date is {stamp!r}"
    when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    if abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) > 300:
        return "RequestTimeTooSkewed", f"X-Amz-Date {stamp} is not now"
    if (found["date"], found["region"], found["service"]) != (stamp[:8], REGION, "ses"):
        return "SignatureDoesNotMatch", f"credential scope {found['date']}/{found['region']}"
    return None


# ---------------------------------------------------------------------------- scripted endpoint


@dataclass
class Seen(ReceivedRequest):
    body: dict[str, Any] = field(default_factory=dict)  # the JSON body


class ScriptedSES(FakeHTTP[Seen]):
    """SES's REST-JSON SendEmail endpoint on 127.0.0.1: checks each request's signature
    (with botocore, from the method, path, headers and body received, and the secret of
    its access key in keys) and refuses a wrong one as SES does (403), records it, and
    gives the next scripted answer, or 200 with a fresh MessageId."""

    def __init__(self, keys: Mapping[str, str] = KNOWN_KEYS) -> None:
        super().__init__(Seen)
        self.keys = dict(keys)

    def fail_with(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer the next request with an AWS REST-JSON error."""
        self.respond_with(
            status, {"message": message}, {"x-amzn-ErrorType": code, **(headers or {})}
        )

    def _answer(self, record: Seen) -> Answer:
        record.body = json.loads(record.raw or b"{}")
        code, why = signature_problem(
            record.method, record.path, record.headers, record.raw, self.keys
        )
        if code:
            message = (
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method."
            )
            raise Refused(Answer.of(403, {"message": message}, {"x-amzn-ErrorType": code}), why)
        status, body, headers = self._scripted() or Answer.of(
            200, {"MessageId": f"ses-{uuid.uuid4()}"}
        )
        return Answer(
            status,
            body,
            {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4()), **headers},
        )


# ---------------------------------------------------------------------------- build_request


def test_build_request_is_valid_sendemail_input_with_exact_bytes() -> None:
    """The request satisfies botocore's SendEmail model and carries the body object itself."""
    d = delivery(rich_body(), "bob@example.org", "carol@example.net", "dave@example.net")
    params = build_request(d, configuration_set="transactional")
    assert model_problems(params) == ""
    assert params["Content"]["Raw"]["Data"] is d.body
    assert params["Destination"] == {
        "ToAddresses": ["bob@example.org", "carol@example.net", "dave@example.net"]
    }
    assert params["FromEmailAddress"] == SENDER
    assert params["ConfigurationSetName"] == "transactional"
    assert set(params) == {"Content", "Destination", "FromEmailAddress", "ConfigurationSetName"}


def test_build_request_null_sender_omits_from_email_address() -> None:
    """With the null sender <> SES is left to read the From header: no FromEmailAddress."""
    params = build_request(delivery(mail_from=""))
    assert "FromEmailAddress" not in params
    assert "ConfigurationSetName" not in params
    assert model_problems(params) == ""


def test_build_request_lists_each_recipient_once() -> None:
    """Recipients differing only in case are one destination, in envelope order."""
    params = build_request(
        delivery(None, "bob@example.org", "carol@example.net", "BOB@example.org")
    )
    assert params["Destination"]["ToAddresses"] == ["BOB@example.org", "carol@example.net"]


def test_build_request_sends_international_domains_in_punycode() -> None:
    """SES takes no SMTPUTF8: a non-ASCII domain is sent as its Punycode form."""
    params = build_request(delivery(None, "bob@bücher.example", mail_from="alice@bücher.example"))
    assert params["Destination"]["ToAddresses"] == ["bob@xn--bcher-kva.example"]
    assert params["FromEmailAddress"] == "alice@xn--bcher-kva.example"


def test_build_request_refuses_non_ascii_local_part() -> None:
    """A non-ASCII local part cannot be sent through SES at all."""
    with pytest.raises(RequestError, match="SMTPUTF8"):
        build_request(delivery(None, "jörg@example.org"))


def test_build_request_takes_50_recipients_and_refuses_51() -> None:
    """50 recipients is SES's limit per message; 51 raise RequestError."""
    fifty = [f"r{i}@example.org" for i in range(MAX_RECIPIENTS)]
    assert len(build_request(delivery(None, *fifty))["Destination"]["ToAddresses"]) == 50
    with pytest.raises(RequestError, match="more than 50 recipients"):
        build_request(delivery(None, *fifty, "one-more@example.org"))


def test_build_request_size_limit_is_inclusive() -> None:
    """A body of exactly max_message_bytes is sent; one byte more raises RequestError."""
    body = wire(message()).ljust(2000, b"x")
    assert build_request(delivery(body), max_message_bytes=2000)
    with pytest.raises(RequestError, match="over the 1999-byte limit"):
        build_request(delivery(body), max_message_bytes=1999)


def test_request_body_is_botocores_serialization_of_the_params() -> None:
    """The JSON body is what botocore's REST-JSON serializer makes of the same params
    for SendEmail (Data in base64), and decodes to the exact bytes."""
    d = delivery(rich_body(), "bob@example.org", "carol@example.net")
    params = build_request(d, configuration_set="transactional")
    ours = json.loads(request_body(params))
    theirs = create_serializer("rest-json", include_validation=True).serialize_to_request(
        params, SES_MODEL.operation_model("SendEmail")
    )
    assert (theirs["method"], theirs["url_path"]) == ("POST", PATH)
    assert ours == json.loads(theirs["body"])
    assert base64.b64decode(ours["Content"]["Raw"]["Data"]) == d.body
    null_sender = build_request(delivery(mail_from=""))
    assert "FromEmailAddress" not in json.loads(request_body(null_sender))


def test_type_declares_ses_limits() -> None:
    """The provider type names SES's documented limits: 50 recipients, 40 MB."""
    assert (TYPE.name, TYPE.max_recipients, TYPE.max_message_bytes) == ("ses", 50, 40_000_000)
    assert MAX_MESSAGE_BYTES == 40_000_000
    assert not TYPE.secret_required


# ---------------------------------------------------------------------------- sigv4

EXAMPLE = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


def signed_by_botocore(
    monkeypatch: pytest.MonkeyPatch,
    when: datetime.datetime,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    credentials: sigv4.Credentials,
    region: str = REGION,
    service: str = "ses",
    params: list[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """The headers botocore's SigV4Auth.add_auth sets on the request at `when`."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *_, **__: when)
    request = botocore.awsrequest.AWSRequest(
        method=method, url=url, headers=dict(headers), data=body, params=params
    )
    creds = botocore.credentials.Credentials(
        credentials.access_key, credentials.secret_key, credentials.token
    )
    botocore.auth.SigV4Auth(creds, service, region).add_auth(request)
    names = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token")
    return {name: request.headers[name] for name in names if name in request.headers}


def signed_by_us(
    when: datetime.datetime,
    method: str,
    host: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    credentials: sigv4.Credentials,
    region: str = REGION,
    service: str = "ses",
    query: tuple[tuple[str, str], ...] = (),
) -> dict[str, str]:
    added = sigv4.sign(
        method=method, host=host, path=path, headers=headers, body=body,
        credentials=credentials, region=region, service=service,
        now=when.replace(tzinfo=datetime.UTC), query=query,
    )  # fmt: skip
    return dict(added)


SIGNED_CASES = {
    "sendemail": ("POST", "https://email.us-east-1.amazonaws.com", "/v2/email/outbound-emails", ()),
    "port-and-base-path": ("POST", "http://127.0.0.1:8443", "/ses/v2/email/outbound-emails", ()),
    "query": ("GET", "https://email.us-east-1.amazonaws.com", "/v2/email/identities",
              (("PageSize", "10"), ("NextToken", "a b/c=d"), ("A", "2"), ("A", "1"))),
}  # fmt: skip


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEXAMPLE//token+with/odd=chars"])
@pytest.mark.parametrize("case", list(SIGNED_CASES))
def test_sigv4_matches_botocore(
    monkeypatch: pytest.MonkeyPatch, case: str, token: str | None
) -> None:
    """Our signer and botocore's SigV4Auth give the same Authorization (and X-Amz-Date,
    and X-Amz-Security-Token with session credentials) for the same request."""
    method, origin, path, query = SIGNED_CASES[case]
    host = origin.split("://", 1)[1]
    when = datetime.datetime(2026, 3, 1, 23, 59, 58)
    credentials = sigv4.Credentials(ACCESS_KEY, SECRET_KEY, token)
    body = rich_body() if method == "POST" else b""
    headers = [("Content-Type", "application/json"), ("X-Custom", "  two   spaces  ")]
    ours = signed_by_us(when, method, host, path, headers, body, credentials, query=query)
    theirs = signed_by_botocore(
        monkeypatch, when, method, origin + path, [*headers, ("Host", host)], body,
        credentials, params=list(query),
    )  # fmt: skip
    assert ours == theirs
    signed = ["content-type", "host", "x-amz-date", "x-custom"]
    signed += ["x-amz-security-token"] if token else []
    assert f"SignedHeaders={';'.join(sorted(signed))}, " in ours["Authorization"]
    assert ours.get("X-Amz-Security-Token") == token


def test_sigv4_aws_published_examples() -> None:
    """AWS's published examples: the signed POST of the General Reference ("Signed
    Signature Version 4 Requests Examples",
    https://docs.aws.amazon.com/general/latest/gr/sigv4-signed-request-examples.html)
    and get-vanilla of the Signature Version 4 test suite."""
    post = signed_by_us(
        datetime.datetime(2011, 9, 9, 23, 36), "POST", "iam.amazonaws.com", "/",
        [("Content-type", "application/x-www-form-urlencoded; charset=utf-8")],
        b"Action=ListUsers&Version=2010-05-08", EXAMPLE, "us-east-1", "iam",
    )  # fmt: skip
    assert post["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20110909/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ced6826de92d2bdeed8f846f0bf508e8559e98e4b0199114b84c54174deb456c"
    )
    vanilla = signed_by_us(
        datetime.datetime(2015, 8, 30, 12, 36), "GET", "example.amazonaws.com", "/", [], b"",
        EXAMPLE, "us-east-1", "service",
    )  # fmt: skip
    assert vanilla == {
        "X-Amz-Date": "20150830T123600Z",
        "Authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            "SignedHeaders=host;x-amz-date, "
            "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        ),
    }


def test_sigv4_signing_key_is_derived_once_a_day() -> None:
    """The derived key is AWS's example one, and is cached per day, region, service and
    secret: a second request that day derives nothing."""
    sigv4.signing_key.cache_clear()
    key = sigv4.signing_key(EXAMPLE.secret_key, "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
    for second in (1, 2):
        when = datetime.datetime(2026, 3, 1, 12, 0, second)
        signed_by_us(when, "POST", "h", "/", [], b"x", EXAMPLE)
    info = sigv4.signing_key.cache_info()
    assert (info.misses, info.hits) == (2, 1)
    signed_by_us(datetime.datetime(2026, 3, 2), "POST", "h", "/", [], b"x", EXAMPLE)
    assert sigv4.signing_key.cache_info().misses == 3


def test_sigv4_credentials_repr_hides_the_secret_and_token() -> None:
    text = repr(sigv4.Credentials(ACCESS_KEY, SECRET_KEY, "session-token"))
    assert SECRET_KEY not in text
    assert "session-token" not in text


# ---------------------------------------------------------------------------- classify


def error_answer(
    code: str, status: int, message: str = "", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """An AWS REST-JSON error answer as SES gives it: the code in x-amzn-ErrorType (with
    the suffix AWS adds after ":"), the message in the JSON body; header names as the
    HTTP client gives them (lower-cased)."""
    all_headers = {
        "content-type": "application/json",
        "x-amzn-requestid": str(uuid.uuid4()),
        "x-amzn-errortype": f"{code}:http://internal.amazon.com/coral/com.amazonaws.sesv2/",
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    return status, all_headers, json.dumps({"message": message})


PERMANENT = OutcomeKind.PERMANENT
RETRY = OutcomeKind.RETRY
CODES = [
    ("MessageRejected", 400, PERMANENT),
    ("MailFromDomainNotVerifiedException", 400, PERMANENT),
    ("AccountSuspendedException", 400, PERMANENT),
    ("SendingPausedException", 400, RETRY),
    ("BadRequestException", 400, PERMANENT),
    ("InvalidParameterValue", 400, PERMANENT),
    ("NotFoundException", 404, PERMANENT),
    ("TooManyRequestsException", 429, RETRY),
    ("LimitExceededException", 400, RETRY),
    ("Throttling", 400, RETRY),
    ("ThrottlingException", 400, RETRY),
    ("InternalFailure", 500, RETRY),
    ("ServiceUnavailable", 503, RETRY),
    ("AccessDenied", 403, PERMANENT),
    ("AccessDeniedException", 403, PERMANENT),
    ("UnrecognizedClientException", 403, PERMANENT),
    ("UnrecognizedClient", 403, PERMANENT),
    ("InvalidClientTokenId", 403, PERMANENT),
    ("SignatureDoesNotMatch", 403, PERMANENT),
    ("ExpiredTokenException", 403, RETRY),
    ("RequestTimeTooSkewed", 403, RETRY),
    ("SomethingNew", 400, PERMANENT),
    ("SomethingNew", 502, RETRY),
    ("SomethingNew", 408, RETRY),
]


@pytest.mark.parametrize(("code", "status", "kind"), CODES, ids=[f"{c}-{s}" for c, s, _ in CODES])
def test_classify_error_codes(code: str, status: int, kind: OutcomeKind) -> None:
    """Each SES error code is a retry or a permanent failure; the detail names code and status."""
    outcome = classify(*error_answer(code, status, "what SES said"))
    assert outcome.kind == kind
    assert outcome.detail == f"HTTP {status}: SES {code}: what SES said"
    assert outcome.provider_message_id is None


def test_classify_success_takes_the_message_id() -> None:
    """200 with a MessageId is delivered under that id."""
    outcome = classify(200, {"content-type": "application/json"}, '{"MessageId":"0100-abc"}')
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id == "0100-abc"
    assert outcome.detail == "SES SendEmail accepted"


def test_classify_throttling_honours_retry_after() -> None:
    """A throttled call with Retry-After waits that long."""
    outcome = classify(*error_answer("TooManyRequestsException", 429, "", {"Retry-After": "7"}))
    assert outcome.kind == RETRY
    assert outcome.retry_after == 7
    assert outcome.detail == "HTTP 429: SES TooManyRequestsException"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"__type": "com.amazonaws.sesv2#MessageRejected", "message": "not verified"},
         "MessageRejected", "not verified"),
        ({"__type": "MailFromDomainNotVerifiedException", "Message": "not verified"},
         "MailFromDomainNotVerifiedException", "not verified"),
        ({"code": "AccountSuspendedException", "message": "suspended"},
         "AccountSuspendedException", "suspended"),
        ({"Code": "SendingPausedException", "Message": "paused"}, "SendingPausedException",
         "paused"),
    ],
    ids=["__type-namespaced", "__type-plain", "code", "Code"],
)  # fmt: skip
def test_classify_reads_the_code_from_the_body_without_the_header(
    body: dict[str, str], code: str, message: str
) -> None:
    """Without x-amzn-ErrorType the body's __type (after "#"), code or Code is the code."""
    outcome = classify(400, {"content-type": "application/json"}, json.dumps(body))
    assert outcome.detail == f"HTTP 400: SES {code}: {message}"
    assert outcome.kind == (RETRY if code == "SendingPausedException" else PERMANENT)


def test_classify_header_code_wins_over_the_body() -> None:
    """The header names the code when the body names another."""
    status, headers, _ = error_answer("ThrottlingException", 400)
    body = json.dumps({"__type": "com.amazonaws.sesv2#BadRequestException", "message": "m"})
    outcome = classify(status, headers, body)
    assert (outcome.kind, outcome.detail) == (RETRY, "HTTP 400: SES ThrottlingException: m")


@pytest.mark.parametrize(("status", "kind"), [(502, RETRY), (403, PERMANENT)], ids=["502", "403"])
def test_classify_answer_without_a_code_follows_the_status(status: int, kind: OutcomeKind) -> None:
    """A proxy's answer (no code, no JSON) is classified by its status and quoted."""
    outcome = classify(status, {"content-type": "text/html"}, "<html>\n Bad   gateway</html>")
    assert outcome.kind == kind
    assert outcome.detail == f"HTTP {status}: SES error: <html> Bad gateway</html>"


def test_classify_masks_credentials_in_messages() -> None:
    """An error message quoting the key id or secret never carries them into the detail."""
    answer = error_answer(
        "SignatureDoesNotMatch", 403, f"key {ACCESS_KEY} with {SECRET_KEY} does not match"
    )
    outcome = classify(*answer, redact=(ACCESS_KEY, SECRET_KEY))
    assert outcome.kind == PERMANENT
    assert ACCESS_KEY not in outcome.detail
    assert SECRET_KEY not in outcome.detail
    assert "key *** with *** does not match" in outcome.detail


# ---------------------------------------------------------------------------- configuration


def test_region_is_required_when_environment_names_none() -> None:
    """Without a region setting or AWS_REGION/AWS_DEFAULT_REGION, the provider is unusable."""
    with pytest.raises(ProviderConfigError, match="'region' is required"):
        SesProvider(spec(None, region=""))


async def test_region_comes_from_environment_when_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS chain's region (AWS_DEFAULT_REGION) is used when the setting is absent."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    async with ses(None, region="") as provider:
        assert provider.region == "eu-west-1"


def test_access_key_id_needs_a_secret_and_a_secret_needs_a_key_id() -> None:
    """access_key_id and the secret come together, or neither (the credential chain)."""
    with pytest.raises(ProviderConfigError, match="no secret access key"):
        SesProvider(spec(None, secret=None, access_key_id=ACCESS_KEY))
    with pytest.raises(ProviderConfigError, match="'access_key_id' is not set"):
        SesProvider(spec(None, access_key_id=""))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"max_message_bytes": MAX_MESSAGE_BYTES + 1}, "can only lower"),
        ({"max_message_bytes": "lots"}, "must be a number"),
        ({"timeout": 0}, "must be positive"),
        ({"max_connections": -1}, "must be positive"),
    ],
)
def test_invalid_numeric_settings_are_config_errors(settings: dict[str, Any], match: str) -> None:
    """Limits above SES's, and non-positive or non-numeric values, are refused."""
    with pytest.raises(ProviderConfigError, match=match):
        SesProvider(spec(None, **settings))


def test_type_validates_setting_names() -> None:
    """An unknown setting is a configuration error naming the known ones."""
    with pytest.raises(ProviderConfigError, match="no setting 'regoin'"):
        TYPE.validate(spec(None, regoin="x"))
    TYPE.validate(spec(None, configuration_set="cs", timeout=5, max_connections=4))


def test_endpoint_must_be_an_http_url() -> None:
    """An endpoint the HTTP client cannot use is a configuration error."""
    with pytest.raises(ProviderConfigError, match="endpoint: not an http"):
        SesProvider(spec("ftp://email.example"))


def test_default_endpoint_is_the_regions() -> None:
    """Without an endpoint, SES's in the provider's region."""
    provider = SesProvider(spec(None, region="eu-central-1"))
    assert provider._client.origin.host_header == "email.eu-central-1.amazonaws.com"
    assert provider._client.origin.scheme == "https"


async def test_repr_and_errors_hold_no_credentials() -> None:
    """Neither the provider's repr nor a configuration error shows the key id or secret."""
    async with ses("http://127.0.0.1:1") as provider:
        text = repr(provider)
    assert ACCESS_KEY not in text
    assert SECRET_KEY not in text
    with pytest.raises(ProviderConfigError) as info:
        SesProvider(spec(None, max_message_bytes=0))
    assert SECRET_KEY not in str(info.value)


# ---------------------------------------------------------------------------- send() to moto


async def test_send_delivers_exact_bytes_to_every_envelope_recipient(moto_ses: MotoSES) -> None:
    """moto records the raw bytes unchanged, the envelope sender and all envelope recipients."""
    body = rich_body()
    recipients = ("bob@example.org", "carol@example.net", "hidden@example.net")
    async with ses(moto_ses.endpoint, configuration_set="cs1") as provider:
        with trio.fail_after(20):
            outcome = await provider.send(delivery(body, *recipients))
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id
    sent = moto_ses.sent_by_id(outcome.provider_message_id)
    assert sent.raw_data.encode("utf-8") == body
    assert sent.source == SENDER
    # moto appends the header addresses after the Destination it was given
    assert tuple(sent.destinations[: len(recipients)]) == recipients


async def test_send_with_credential_chain(moto_ses: MotoSES) -> None:
    """Without access_key_id the standard AWS chain (here the environment) signs the call."""
    async with ses(moto_ses.endpoint, secret=None) as provider:
        with trio.fail_after(20):
            outcome = await provider.send(delivery())
    assert outcome.kind == OutcomeKind.DELIVERED
    assert moto_ses.sent_by_id(outcome.provider_message_id).source == SENDER


async def test_send_null_sender_lets_ses_read_from_header(moto_ses: MotoSES) -> None:
    """A bounce (null sender) is sent without FromEmailAddress: SES takes the From header."""
    body = wire(message())
    async with ses(moto_ses.endpoint) as provider:
        with trio.fail_after(20):
            outcome = await provider.send(delivery(body, mail_from=""))
    assert outcome.kind == OutcomeKind.DELIVERED
    sent = moto_ses.sent_by_id(outcome.provider_message_id)
    assert sent.source == SENDER
    assert sent.raw_data.encode("utf-8") == body


async def test_send_from_unverified_sender_is_permanent(moto_ses: MotoSES) -> None:
    """An unverified envelope sender is refused by SES (MessageRejected): permanent."""
    before = len(moto_ses.sent())
    body = wire(message(sender="Eve <eve@unverified.example>"))
    async with ses(moto_ses.endpoint) as provider:
        with trio.fail_after(20):
            outcome = await provider.send(delivery(body, mail_from="eve@unverified.example"))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("HTTP 400: SES MessageRejected")
    assert "eve@unverified.example" in outcome.detail
    assert SECRET_KEY not in outcome.detail
    assert len(moto_ses.sent()) == before


# ---------------------------------------------------------------------------- send() on the wire


async def test_send_request_on_the_wire() -> None:
    """One signed POST to /v2/email/outbound-emails with the body base64 and every field."""
    body = rich_body()
    with ScriptedSES() as fake:
        async with ses(fake.url, configuration_set="cs1") as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery(body, "bob@example.org", "c@example.net"))
    [req] = fake.requests
    assert (req.method, req.path) == ("POST", "/v2/email/outbound-emails")
    assert base64.b64decode(req.body["Content"]["Raw"]["Data"]) == body
    assert req.body["Destination"] == {"ToAddresses": ["bob@example.org", "c@example.net"]}
    assert req.body["FromEmailAddress"] == SENDER
    assert req.body["ConfigurationSetName"] == "cs1"
    assert req.valid  # the signature botocore computes from what was received
    assert req.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{req.headers['x-amz-date'][:8]}/{REGION}/"
        "ses/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
    )
    assert req.headers["content-type"] == "application/json"
    assert SECRET_KEY not in json.dumps(req.headers)
    assert outcome.kind == OutcomeKind.DELIVERED
    assert outcome.provider_message_id is not None
    assert outcome.provider_message_id.startswith("ses-")


async def test_send_throttled_is_retry_after_and_makes_one_call() -> None:
    """A 429 with Retry-After is a retry after that long, from exactly one call."""
    with ScriptedSES() as fake:
        fake.fail_with(429, "TooManyRequestsException", "Maximum sending rate exceeded.",
                       {"Retry-After": "7"})  # fmt: skip
        async with ses(fake.url) as provider:
            with trio.fail_after(20):
                first = await provider.send(delivery())
                second = await provider.send(delivery())
    assert first.kind == OutcomeKind.RETRY
    assert first.retry_after == 7
    assert "Maximum sending rate exceeded" in first.detail
    assert second.kind == OutcomeKind.DELIVERED
    assert len(fake.requests) == 2


async def test_send_server_error_is_retry_without_resending() -> None:
    """A 500 InternalFailure is a retry for smtpproxy's schedule: no second call."""
    with ScriptedSES() as fake:
        fake.fail_with(500, "InternalFailure", "internal error")
        fake.fail_with(500, "InternalFailure", "internal error")
        async with ses(fake.url) as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery())
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail == "HTTP 500: SES InternalFailure: internal error"
    assert len(fake.requests) == 1


async def test_send_access_denied_is_permanent_and_names_no_credentials() -> None:
    """403 AccessDeniedException is permanent; the detail holds neither key id nor secret."""
    with ScriptedSES() as fake:
        fake.fail_with(403, "AccessDeniedException", f"User {ACCESS_KEY} is not authorized")
        async with ses(fake.url) as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery())
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail == "HTTP 403: SES AccessDeniedException: User *** is not authorized"


async def test_send_with_a_wrong_secret_is_permanent_signature_does_not_match() -> None:
    """A secret that is not the key's: SES refuses the signature (403
    SignatureDoesNotMatch), a permanent failure whose detail holds neither key nor secret."""
    with ScriptedSES() as fake:
        async with ses(fake.url, secret="not-the-secret-access-key") as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery())
    assert fake.errors == ["signature does not match"]
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail.startswith("HTTP 403: SES SignatureDoesNotMatch: The request signature")
    assert "not-the-secret-access-key" not in outcome.detail


async def test_send_under_an_endpoint_path_signs_that_path() -> None:
    """An endpoint with a path (a proxy's prefix) puts it before SendEmail's path, signed."""
    with ScriptedSES() as fake:
        async with ses(fake.url + "/ses-proxy/") as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery())
    [req] = fake.requests
    assert req.path == "/ses-proxy/v2/email/outbound-emails"
    assert req.valid
    assert outcome.kind == OutcomeKind.DELIVERED


async def test_send_over_50_recipients_is_permanent_without_a_call() -> None:
    """51 recipients never reach SES: permanent at once."""
    recipients = [f"r{i}@example.org" for i in range(51)]
    with ScriptedSES() as fake:
        async with ses(fake.url) as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery(None, *recipients))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert "more than 50 recipients" in outcome.detail
    assert fake.requests == []


async def test_send_over_configured_size_is_permanent_without_a_call() -> None:
    """A 2000-byte message over max_message_bytes=1000 never reaches SES."""
    body = wire(message()).ljust(2000, b"x")
    with ScriptedSES() as fake:
        async with ses(fake.url, max_message_bytes=1000) as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery(body))
    assert outcome.kind == OutcomeKind.PERMANENT
    assert outcome.detail == "message of 2000 bytes is over the 1000-byte limit for SES"
    assert fake.requests == []


# ---------------------------------------------------------------------------- credential chain


class FakeContainerCredentials(FakeHTTP[ReceivedRequest]):
    """The container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI) on
    127.0.0.1: answers each request with the next queued credentials."""

    def __init__(self) -> None:
        super().__init__(ReceivedRequest)

    def queue(self, number: int, expires_in: datetime.timedelta) -> None:
        expiry = datetime.datetime.now(datetime.UTC) + expires_in
        self.respond_with(
            200,
            {
                "AccessKeyId": f"ASIACONTAINER{number}",
                "SecretAccessKey": f"container-secret-{number}",
                "Token": f"container-token-{number}",
                "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )

    def _answer(self, record: ReceivedRequest) -> Answer:
        return self._scripted() or Answer.of(500, {"message": "nothing queued"})


async def test_chain_session_token_is_sent_and_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Session credentials from the environment (AWS_SESSION_TOKEN) put the token in
    X-Amz-Security-Token, among the signed headers."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-from-env")
    with ScriptedSES() as fake:
        async with ses(fake.url, secret=None) as provider:
            with trio.fail_after(20):
                outcome = await provider.send(delivery())
    [req] = fake.requests
    assert req.valid
    assert req.headers["x-amz-security-token"] == "session-token-from-env"
    assert "Credential=testing/" in req.headers["authorization"]
    assert (
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token,"
        in req.headers["authorization"]
    )
    assert outcome.kind == OutcomeKind.DELIVERED


async def test_chain_without_credentials_is_retry_without_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the chain finds no credentials, nothing is sent and the message waits."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with ScriptedSES() as fake:
        async with ses(fake.url, secret=None) as provider:
            with trio.fail_after(20):
                outcomes = [await provider.send(delivery()) for _ in range(2)]
    for outcome in outcomes:
        assert outcome.kind == OutcomeKind.RETRY
        assert outcome.detail == "no AWS credentials: the credential chain found none"
    assert fake.requests == []


async def test_chain_refreshes_temporary_credentials_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Container credentials 14 minutes from expiry are refreshed (botocore does from 15)
    before the first send, both fetches in a worker thread, never on trio's; the next
    send, its credentials hours from expiry, fetches nothing."""
    fetched_on_main_thread: list[bool] = []
    fetch = botocore.utils.ContainerMetadataFetcher.retrieve_full_uri

    def recording_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        fetched_on_main_thread.append(threading.current_thread() is threading.main_thread())
        return fetch(self, *args, **kwargs)

    monkeypatch.setattr(
        botocore.utils.ContainerMetadataFetcher, "retrieve_full_uri", recording_fetch
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    keys = {f"ASIACONTAINER{n}": f"container-secret-{n}" for n in (1, 2)}
    with FakeContainerCredentials() as container, ScriptedSES(keys) as fake:
        container.queue(1, datetime.timedelta(minutes=14))
        container.queue(2, datetime.timedelta(hours=6))
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{container.url}/creds")
        async with ses(fake.url, secret=None) as provider:
            with trio.fail_after(20):
                outcomes = [await provider.send(delivery()) for _ in range(2)]
    assert [o.kind for o in outcomes] == [OutcomeKind.DELIVERED] * 2
    assert fetched_on_main_thread == [False, False]
    assert len(container.requests) == 2
    for req in fake.requests:
        assert req.valid
        assert "Credential=ASIACONTAINER2/" in req.headers["authorization"]
        assert req.headers["x-amz-security-token"] == "container-token-2"


# ---------------------------------------------------------------------------- transport


async def test_send_to_closed_port_is_retry_connection_error() -> None:
    """Nothing listening at the endpoint: a retry with "connection error"."""
    async with ses(closed_port_url()) as provider:
        with trio.fail_after(20):
            outcome = await provider.send(delivery())
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith("connection error: cannot connect to 127.0.0.1:")


async def test_send_to_silent_server_times_out_as_retry() -> None:
    """A connection that never gets an answer is a retry with "timeout" after the timeout."""
    async with silent_server() as (url, held), ses(url, timeout=0.5) as provider:
        with trio.fail_after(10):
            started = trio.current_time()
            outcome = await provider.send(delivery())
            elapsed = trio.current_time() - started
    assert held  # the connection was accepted: this was a read timeout
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail == "timeout: no answer within 0.5 s"
    assert 0.4 < elapsed < 5


async def test_concurrent_sends_are_limited_to_max_connections() -> None:
    """With max_connections=2, five stalled sends run two at a time (three rounds)."""
    outcomes = []
    async with silent_server() as (url, held), ses(url, timeout=0.3, max_connections=2) as p:

        async def one() -> None:
            outcomes.append(await p.send(delivery()))

        with trio.fail_after(20):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(one)
            elapsed = trio.current_time() - started
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 5
    assert len(held) == 5
    assert elapsed >= 3 * 0.3 - 0.05  # five at once would take one timeout, not three
