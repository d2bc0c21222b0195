"""Amazon SES v2 SendEmail with raw content (POST /v2/email/outbound-emails, SigV4).

build_request() sends the exact bytes received over SMTP as Content.Raw.Data (boto3
base64-encodes them on the wire) and the envelope as the destination: every envelope
recipient in Destination.ToAddresses. SES delivers a raw message to the Destination
addresses when they are given and does not rewrite the headers, so Bcc recipients (in
the envelope only) are reached and nobody sees them. FromEmailAddress is the envelope
sender; with the null sender (bounces) it is left out and SES takes the address from
the From header. The configuration_set setting becomes ConfigurationSetName.

SES does not support SMTPUTF8 (botocore model, shape Destination): a non-ASCII local
part cannot be sent and is refused here; a non-ASCII domain is sent in Punycode, the
same address.

One boto3 client per provider, created once and shared by every worker thread (boto3
clients are thread-safe), called through trio.to_thread behind a CapacityLimiter as
large as the client's connection pool (max_connections), with explicit connect and read
timeouts. botocore makes one attempt per send: retrying is smtpproxy's (the retry
schedule, Retry-After, one delivery_logs row per attempt), and an SDK retry after a read
timeout could send the message twice within one attempt.

Credentials: the access_key_id setting with the secret access key as the provider's
secret, or else the standard AWS credential chain (environment, shared files, container
and instance roles). Neither the key id nor the secret is ever part of an Outcome.

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

from collections.abc import Iterable, Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome
from smtpproxy.runtime.threads import Offload

MAX_RECIPIENTS = 50
MAX_MESSAGE_BYTES = 40 * 1000 * 1000
DEFAULT_MAX_CONNECTIONS = 64  # sends in flight, each a thread of boto3
DEFAULT_ENDPOINT = "https://email.{region}.amazonaws.com"

# ClientError codes, by what a later attempt can change
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
        # credentials from the chain that expired, or a clock off by minutes: botocore
        # refreshes the former and corrects the skew on the next attempt
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
    }
)
_TIMEOUTS = (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)


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


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _client_error(error: botocore.exceptions.ClientError, redact: Iterable[str]) -> Outcome:
    err: Mapping[str, Any] = error.response.get("Error", {})
    meta: Mapping[str, Any] = error.response.get("ResponseMetadata", {})
    headers = {str(k).lower(): str(v) for k, v in (meta.get("HTTPHeaders") or {}).items()}
    code = str(err.get("Code") or "")
    status = int(meta.get("HTTPStatusCode") or 0)
    message = http.short(_redact(str(err.get("Message") or ""), redact))
    detail = f"SES {code or 'error'}" + (f": {message}" if message else "")
    if status:
        detail = f"HTTP {status}: {detail}"
    if code in PERMANENT_CODES:
        return Outcome.permanent(detail)
    if code in RETRY_CODES or not status or status in (408, 425, 429) or status >= 500:
        return Outcome.retry(detail, http.parse_retry_after(headers.get("retry-after")))
    return Outcome.permanent(detail)


def classify(error: Exception, *, redact: Iterable[str] = ()) -> Outcome:
    """The outcome of a failed SendEmail call (a botocore exception).

    A ClientError is classified by its code (PERMANENT_CODES, RETRY_CODES), otherwise by
    its HTTP status as any JSON API's: 408, 429 and 5xx retry (after Retry-After when
    given), other 4xx are permanent. No HTTP answer (connection refused, timeouts, a
    dropped connection) is retried, and so are missing credentials (the chain's instance
    metadata service may answer next time); an invalid parameter is permanent. Text
    equal to one of redact (the access key id and secret) is masked.
    """
    if isinstance(error, botocore.exceptions.ClientError):
        return _client_error(error, redact)
    if isinstance(error, _TIMEOUTS):
        return Outcome.retry(f"timeout: {type(error).__name__}")
    if isinstance(
        error, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
    ):
        return Outcome.retry(f"connection error: {type(error).__name__}")
    if isinstance(error, botocore.exceptions.ParamValidationError):
        # its text may quote parameter values, the message among them: not repeated
        return Outcome.permanent("invalid SendEmail request (botocore parameter validation)")
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return Outcome.retry("no AWS credentials: the credential chain found none")
    return Outcome.retry(f"SES call failed: {type(error).__name__}")


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
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=spec.secret if access_key_id else None,
            region_name=str(spec.setting("region") or "") or None,
        )
        try:
            self._client = session.client(
                "sesv2",
                endpoint_url=spec.endpoint or None,
                config=botocore.config.Config(
                    max_pool_connections=connections,
                    connect_timeout=min(10.0, timeout),
                    read_timeout=timeout,
                    retries={"mode": "standard", "total_max_attempts": 1},
                    user_agent_extra="smtpproxy",
                ),
            )
        except botocore.exceptions.NoRegionError:
            raise ProviderConfigError(
                f"provider {spec.name}: setting 'region' is required "
                "(the AWS environment names no region)"
            ) from None
        except ValueError as exc:  # an endpoint URL botocore cannot use
            raise ProviderConfigError(f"provider {spec.name}: {exc}") from None
        self.region = self._client.meta.region_name
        self._offload = Offload(f"ses:{spec.name}", connections)

    def __repr__(self) -> str:
        return f"SesProvider(name={self.spec.name!r}, region={self.region!r})"

    def _send_email(self, params: dict[str, Any]) -> str:
        response = self._client.send_email(**params)
        return str(response.get("MessageId") or "")

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            params = build_request(
                delivery,
                configuration_set=self._configuration_set,
                max_message_bytes=self._max_bytes,
            )
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        try:
            message_id = await self._offload(self._send_email, params)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            return classify(exc, redact=self._redact)
        return Outcome.delivered(message_id or None, detail="SES SendEmail accepted")

    async def aclose(self) -> None:
        self._client.close()


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
