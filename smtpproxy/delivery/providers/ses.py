"""Amazon SES v2 SendEmail with raw content (POST /v2/email/outbound-emails, SigV4).

build_request() sends the exact bytes received over SMTP as Content.Raw.Data (base64 in
the JSON body, request_body()) and the envelope as the destination: every envelope
recipient in Destination.ToAddresses. SES delivers a raw message to the Destination
addresses when they are given and does not rewrite the headers, so Bcc recipients (in
the envelope only) are reached and nobody sees them. FromEmailAddress is the envelope
sender; with the null sender (bounces) it is left out and SES takes the address from
the From header. The configuration_set setting becomes ConfigurationSetName.

SES does not support SMTPUTF8 (botocore model, shape Destination): a non-ASCII local
part cannot be sent and is refused here; a non-ASCII domain is sent in Punycode, the
same address.

The call is SES v2's REST-JSON API through smtpproxy's own HTTP/1.1 client on trio
(http11.py, as sendgrid's), signed with Signature Version 4 (sigv4.py). boto3 did this
in worker threads before; a profile of the relay put 61% of its busy CPU in botocore's
call path. One connection pool per provider, max_connections large: at most that many
calls in flight. One attempt per send: retrying is smtpproxy's (the retry schedule,
Retry-After, one delivery_logs row per attempt).

Credentials: the access_key_id setting with the secret access key as the provider's
secret, or else the standard AWS credential chain (environment, shared files, container
and instance roles), which botocore resolves: it is imported only then, and every call
that can reach the network (finding the credentials, refreshing temporary ones) runs in
a worker thread. Neither the key id nor the secret is ever part of an Outcome.

Limits (Amazon SES Developer Guide, "Service quotas in Amazon SES",
https://docs.aws.amazon.com/ses/latest/dg/quotas.html): at most 50 recipients per
message, "a recipient is any To, CC, or BCC address" (the consumer splits larger groups);
"Using the SES v2 API or SMTP - Maximum message size (including attachments): 40 MB per
message (after base64 encoding)", that is the MIME message as sent, whose attachments are
already encoded. AWS does not say whether MB means 10^6 or 2^20 bytes: the smaller
reading, 40,000,000 bytes, is used, so that everything admitted fits. The
max_message_bytes setting can lower it. Both limits are checked before any call.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from smtpproxy.delivery.providers import http, sigv4
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome

if TYPE_CHECKING:
    import botocore.credentials
    import botocore.session

MAX_RECIPIENTS = 50
MAX_MESSAGE_BYTES = 40 * 1000 * 1000
# calls in flight and connections kept: at SES's ~100-200 ms a call, 256 allow more
# than one delivery process sends; an account's sending-rate quota answers Throttling,
# which halves the calls in flight (delivery/breaker.py), so a lower quota needs no change
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_ENDPOINT = "https://email.{region}.amazonaws.com"
PATH = "/v2/email/outbound-emails"
JSON_HEADERS = [("Content-Type", "application/json")]  # signed, with Host and X-Amz-Date
SERVICE = "ses"  # SigV4's service name for SES (v1 and v2)
# temporary credentials of the chain closer to their expiry than this are read in a
# worker thread: botocore refreshes them on reading from 15 minutes before (its
# advisory window, the widest it uses), so a read outside a thread never refreshes
REFRESH_MARGIN = 16 * 60
# what a worker-thread read of the chain gave (credentials, or none) is the answer for
# this long: one thread call a second, however many sends wait for it
RECHECK_SECONDS = 1.0

# error codes, by what a later attempt can change
PERMANENT_CODES = frozenset(
    {
        # the message or its sender: the same request is refused again
        "MessageRejected",
        "MailFromDomainNotVerifiedException",
        "BadRequestException",
        "InvalidParameterValue",
        "ValidationException",
        "SerializationException",
        "NotFoundException",  # e.g. the configuration set does not exist
        # "permanently restricted" (AWS's words): nothing is sent until AWS reinstates it
        "AccountSuspendedException",
        # credentials or permission: an operator has to act
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClient",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
    }
)
RETRY_CODES = frozenset(
    {
        # sending "is currently paused" (by AWS review, or by the account owner for the
        # account or the configuration set): it can resume, so the message waits for it,
        # bounded by delivery.max_age, instead of every queued message failing for good
        "SendingPausedException",
        # throttling and quotas (sending rate, daily quota)
        "TooManyRequestsException",
        "LimitExceededException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "SlowDown",
        # the service
        "InternalFailure",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        # credentials from the chain that expired (the next attempt reads them again,
        # refreshed), or a clock off by minutes (it may be corrected meanwhile)
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
    }
)


class RequestError(ValueError):
    """The delivery cannot be sent through SES (a permanent failure)."""


def _ascii_address(address: str) -> str:
    """The address as SES takes it: Punycode domain; RequestError for a non-ASCII local part."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        raise RequestError(f"SES does not support SMTPUTF8 addresses ({address})")
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        raise RequestError(f"not a valid international domain: {address}") from None


def build_request(
    delivery: Delivery,
    *,
    configuration_set: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> dict[str, Any]:
    """SendEmail's parameters for one delivery. Raises RequestError when SES cannot take it."""
    if len(delivery.body) > max_message_bytes:
        raise RequestError(
            f"message of {len(delivery.body)} bytes is over the {max_message_bytes}-byte "
            "limit for SES"
        )
    recipients = list({r.lower(): _ascii_address(r) for r in delivery.recipients}.values())
    if not recipients:
        raise RequestError("no recipients")
    if len(recipients) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one SES message")
    params: dict[str, Any] = {
        "Destination": {"ToAddresses": recipients},
        "Content": {"Raw": {"Data": delivery.body}},
    }
    if delivery.mail_from:
        params["FromEmailAddress"] = _ascii_address(delivery.mail_from)
    if configuration_set:
        params["ConfigurationSetName"] = configuration_set
    return params


def request_body(params: Mapping[str, Any]) -> bytes:
    """SendEmail's JSON body (REST-JSON) for build_request()'s params: Content.Raw.Data
    in base64, every other member as it is."""
    content = params["Content"]
    raw = content["Raw"]
    body = {
        **params,
        "Content": {**content, "Raw": {**raw, "Data": base64.b64encode(raw["Data"]).decode()}},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def error_code(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """An AWS REST-JSON error's code: from the x-amzn-ErrorType header (names
    lower-cased) before its first ":", else the body's __type (after its last "#"),
    code or Code; "" when there is none."""
    code = headers.get("x-amzn-errortype") or body.get("__type") or body.get("code")
    code = code or body.get("Code") or ""
    return str(code).split(":", 1)[0].rsplit("#", 1)[-1].strip()


def classify(
    status: int, headers: Mapping[str, str], text: str, *, redact: Iterable[str] = ()
) -> Outcome:
    """The outcome of SES's answer to SendEmail (its status, headers and body text).

    2xx is delivered, with the MessageId of the JSON body. An error is classified by its
    code (PERMANENT_CODES, RETRY_CODES), otherwise by its HTTP status as any JSON API's:
    408, 425, 429 and 5xx retry (after Retry-After when given), other 4xx are
    permanent. The detail is "HTTP {status}: SES {code}: {message}" (the message of the
    JSON body, or the start of a body that is not JSON). Text equal to one of redact
    (the access key id and secret) is masked.
    """
    headers = {k.lower(): v for k, v in headers.items()}
    body = http.json_object(text)
    if 200 <= status < 300:
        message_id = body.get("MessageId")
        return Outcome.delivered(
            str(message_id) if message_id else None, detail="SES SendEmail accepted"
        )
    code = error_code(headers, body)
    message = (body.get("message") or body.get("Message")) if body else text
    message = http.short(_redact(str(message or ""), redact))
    said = _redact(f"SES {code or 'error'}" + (f": {message}" if message else ""), redact)
    if code in PERMANENT_CODES:
        return Outcome.permanent(f"HTTP {status}: {said}")
    if code in RETRY_CODES:
        retry_after = http.parse_retry_after(headers.get("retry-after"))
        return Outcome.retry(f"HTTP {status}: {said}", retry_after)
    return http.classify_status(status, headers, said)  # by status, as any JSON API


class CredentialChain:
    """The standard AWS credential chain, as botocore resolves it.

    Finding the credentials (files, processes, the container or instance metadata
    service) and refreshing temporary ones can take network round trips: both run in a
    worker thread, one at a time, whose answer (credentials, or none) stands for
    RECHECK_SECONDS. Credentials that are not near their expiry are read on the trio
    thread, which costs no I/O.
    """

    def __init__(self, session: botocore.session.Session) -> None:
        import botocore.credentials  # noqa: PLC0415 - loaded with the session already

        self._refreshable = botocore.credentials.RefreshableCredentials
        self._session = session
        self._source: botocore.credentials.Credentials | None = None
        self._lock = trio.Lock()
        # what the last worker-thread read gave, and until when it is the answer
        self._last: tuple[float, sigv4.Credentials | Outcome] | None = None

    async def current(self) -> sigv4.Credentials | Outcome:
        """The credentials to sign with now, or the retry outcome when there are none."""
        source = self._source
        if source is not None and not (
            isinstance(source, self._refreshable) and source.refresh_needed(REFRESH_MARGIN)
        ):
            return _frozen(source)
        async with self._lock:
            if self._last is not None and trio.current_time() < self._last[0]:
                return self._last[1]
            found: sigv4.Credentials | Outcome
            try:
                found = await trio.to_thread.run_sync(self._read)
            except Exception as exc:  # noqa: BLE001 - whatever a source raises, none now
                if isinstance(exc, NoCredentials):
                    why = "the credential chain found none"
                elif self._source is None:
                    why = f"the credential chain failed ({type(exc).__name__})"
                else:
                    why = f"refreshing them failed ({type(exc).__name__})"
                found = Outcome.retry(f"no AWS credentials: {why}")
            self._last = (trio.current_time() + RECHECK_SECONDS, found)
            return found

    def _read(self) -> sigv4.Credentials:
        """In a worker thread: look the chain up while nothing is found, then read the
        credentials (botocore refreshes temporary ones when due)."""
        if self._source is None:
            self._source = self._session.get_credentials()
        if self._source is None:
            raise NoCredentials
        return _frozen(self._source)


class NoCredentials(Exception):
    """The credential chain found no credentials."""


def _frozen(source: botocore.credentials.Credentials) -> sigv4.Credentials:
    frozen = source.get_frozen_credentials()
    return sigv4.Credentials(frozen.access_key or "", frozen.secret_key or "", frozen.token or None)


class SesProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        access_key_id = str(spec.setting("access_key_id") or "")
        if access_key_id and not spec.secret:
            spec.require_secret("secret access key (for access_key_id)")
        if spec.secret and not access_key_id:
            raise ProviderConfigError(
                f"provider {spec.name}: a secret is stored but setting 'access_key_id' is "
                "not set (set both, or neither to use the AWS credential chain)"
            )
        self._redact = (access_key_id, spec.secret or "")
        self._configuration_set = str(spec.setting("configuration_set") or "") or None
        self._max_bytes = spec.positive_int("max_message_bytes", MAX_MESSAGE_BYTES)
        if self._max_bytes > MAX_MESSAGE_BYTES:
            raise ProviderConfigError(
                f"provider {spec.name}: max_message_bytes can only lower SES's limit "
                f"({MAX_MESSAGE_BYTES})"
            )
        timeout = spec.positive("timeout", http.DEFAULT_TIMEOUT)
        connections = spec.positive_int("max_connections", DEFAULT_MAX_CONNECTIONS)
        region = str(spec.setting("region") or "")
        session = None
        if not region or not access_key_id:
            session = _botocore_session()
            region = region or str(session.get_config_variable("region") or "")
        if not region:
            raise ProviderConfigError(
                f"provider {spec.name}: setting 'region' is required "
                "(the AWS environment names no region)"
            )
        self.region = region
        self._credentials: sigv4.Credentials | CredentialChain
        if access_key_id:
            self._credentials = sigv4.Credentials(access_key_id, spec.secret or "")
        else:
            assert session is not None
            self._credentials = CredentialChain(session)
        try:
            self._client = http.open_client(
                spec.endpoint or DEFAULT_ENDPOINT.format(region=region),
                timeout=timeout,
                max_connections=connections,
            )
        except ValueError as exc:  # not an http(s) URL
            raise ProviderConfigError(f"provider {spec.name}: endpoint: {exc}") from None
        self._host = self._client.origin.host_header
        self._path = self._client.origin.base_path + PATH

    def __repr__(self) -> str:
        return f"SesProvider(name={self.spec.name!r}, region={self.region!r})"

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            params = build_request(
                delivery,
                configuration_set=self._configuration_set,
                max_message_bytes=self._max_bytes,
            )
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        credentials = self._credentials
        if isinstance(credentials, CredentialChain):
            found = await credentials.current()
            if isinstance(found, Outcome):
                return found
            credentials = found
        body = request_body(params)
        headers = JSON_HEADERS + sigv4.sign(
            method="POST",
            host=self._host,
            path=self._path,
            headers=JSON_HEADERS,
            body=body,
            credentials=credentials,
            region=self.region,
            service=SERVICE,
            now=datetime.datetime.now(datetime.UTC),
        )
        try:
            resp = await self._client.post(PATH, body, headers)
        except http.TransportError as exc:
            return http.transport_failure(exc)
        return classify(
            resp.status,
            resp.headers,
            resp.text,
            redact=(*self._redact, credentials.access_key, credentials.secret_key),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _botocore_session() -> botocore.session.Session:
    """A botocore session for the AWS environment (region, credential chain): botocore
    is imported only by a provider that needs it."""
    import botocore.session  # noqa: PLC0415 - only for the AWS environment

    return botocore.session.Session()


TYPE = ProviderType(
    name="ses",
    max_connections=DEFAULT_MAX_CONNECTIONS,
    factory=SesProvider,
    settings={
        "region": SettingInfo(
            "AWS region, e.g. eu-west-1 (required unless the AWS environment names one)"
        ),
        "access_key_id": SettingInfo(
            "AWS access key id; the secret is then the secret access key "
            "(default: the standard AWS credential chain)"
        ),
        "configuration_set": SettingInfo("SES configuration set to send with (optional)"),
        "max_message_bytes": SettingInfo(
            f"refuse larger messages (default and upper bound {MAX_MESSAGE_BYTES}, SES's limit)"
        ),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo(
            f"connection pool size and concurrent sends (default {DEFAULT_MAX_CONNECTIONS})"
        ),
    },
    secret="AWS secret access key (with access_key_id)",  # noqa: S106 - names it, is none
    secret_required=False,
    default_endpoint=DEFAULT_ENDPOINT,
    max_recipients=MAX_RECIPIENTS,
    max_message_bytes=MAX_MESSAGE_BYTES,
)
