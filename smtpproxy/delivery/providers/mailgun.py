"""Mailgun Messages API with raw MIME (POST /v3/{domain}/messages.mime, Basic api:<key>).

Mailgun takes the message as it is, so build_request() never parses it: the exact bytes
of the delivery go out as the ``message`` file part of a multipart/form-data request,
and each envelope recipient as a ``to`` field of its own. Mailgun delivers to the ``to``
fields, not to the message's headers, so a Bcc recipient (absent from every header) is
delivered without being disclosed, and nothing in the message is rewritten. The message
is sent with no ``o:``/``h:``/``v:`` options: each of them would change what recipients
receive (a ``v:`` variable, for one, becomes an X-Mailgun-Variables header).

Limits from Mailgun's documentation: 1,000 recipients per request ("Too many
recipients, max is 1000"; the consumer splits larger groups) and 25 MB per message
(larger requests get 413 Request Entity Too Large). Both are refused here, permanently,
before any request is made. The region picks the API host (an API key belongs to one
region: a US key at the EU host gets 401); ``spec.endpoint`` overrides it.

Classification: 200 is delivered, with Mailgun's ``id`` (the Message-Id it queued) as
the provider message id. 401 (wrong key or region), 404 (unknown domain), 400 (Mailgun
refused the request; its ``message`` says why) and 413 (too large) are permanent. 408,
429 and 5xx are retried: 429 waits for Retry-After, or else for the "try again after N
seconds" Mailgun writes in its answer. Transport errors and timeouts are retried.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping

import attrs

from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome

ENDPOINTS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
DEFAULT_REGION = "us"
MAX_RECIPIENTS = 1000
# "Mailgun supports maximum messages size of 25MB": read as decimal megabytes, the
# smaller reading, so that the whole request (message, `to` fields, multipart framing)
# stays under the limit whichever way Mailgun counts.
MAX_MESSAGE_BYTES = 25 * 1000 * 1000
MAX_CONNECTIONS = 256  # calls in flight by default (429s halve it: delivery/breaker.py)
MESSAGE_FILENAME = "message.mime"
MESSAGE_CONTENT_TYPE = "message/rfc822"
_TRY_AGAIN = re.compile(r"try again after (\d+) seconds?", re.IGNORECASE)
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class RequestError(ValueError):
    """The delivery cannot be sent as one Mailgun request (a permanent failure)."""


@attrs.frozen
class MailgunRequest:
    """What send() posts: the absolute URL, the `to` fields and the message bytes."""

    url: str
    to: tuple[str, ...]
    message: bytes = attrs.field(repr=False)


def base_url(spec: ProviderSpec) -> str:
    """The API base URL: spec.endpoint when set, else the region's host."""
    region = spec.setting("region", DEFAULT_REGION)
    if region not in ENDPOINTS:
        raise ProviderConfigError(f"provider {spec.name}: region must be 'us' or 'eu'")
    return str(spec.endpoint or ENDPOINTS[region]).rstrip("/")


def sending_domain(spec: ProviderSpec) -> str:
    """The Mailgun sending domain of the spec (ProviderConfigError when missing or bad)."""
    domain = spec.require("domain")
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ProviderConfigError(f"provider {spec.name}: setting 'domain' is not a domain name")
    return domain


def build_request(spec: ProviderSpec, delivery: Delivery) -> MailgunRequest:
    """The request for one delivery. RequestError when Mailgun cannot take it."""
    domain = urllib.parse.quote(sending_domain(spec), safe="")
    url = f"{base_url(spec)}/v3/{domain}/messages.mime"
    # Mailgun ignores duplicates itself; dropping them here keeps the count honest
    unique: dict[str, str] = {}
    for r in delivery.recipients:
        unique.setdefault(r.lower(), r)
    to = tuple(unique.values())
    if not to:
        raise RequestError("no recipients")
    if len(to) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one request")
    if len(delivery.body) > MAX_MESSAGE_BYTES:
        raise RequestError("message too large for Mailgun (25 MB)")
    return MailgunRequest(url=url, to=to, message=delivery.body)


def _error_detail(text: str) -> str:
    """Mailgun's own words: the "message" of a JSON answer, else the body's text."""
    try:
        data = json.loads(text)
    except ValueError:
        return http.short(text)
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return http.short(data["message"])
    if isinstance(data, str):  # 401 is documented as the JSON string "Forbidden"
        return http.short(data)
    return http.short(text)


def classify(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """200 is delivered (the id Mailgun queued); see the module docstring for the rest."""
    if 200 <= status < 300:
        message_id: str | None = None
        data = http.json_object(text)
        if isinstance(data.get("id"), str) and data["id"]:
            message_id = data["id"]
        return Outcome.delivered(message_id, detail=f"HTTP {status}")
    detail = _error_detail(text)
    if status == 401:
        detail = f"{detail or 'Forbidden'} (check the API key and the region)"
    elif status == 404:
        detail = f"{detail or 'Not Found'} (check the domain and the region)"
    outcome = http.classify_status(status, headers, detail)
    if status == 429 and outcome.retry_after is None:
        found = _TRY_AGAIN.search(detail)
        if found:
            return Outcome.retry(outcome.detail, float(found.group(1)))
    return outcome


class MailgunProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        base = base_url(spec)
        sending_domain(spec)
        self._key = spec.require_secret("API key")
        self._auth = http.basic_auth("api", self._key)
        self._client = http.open_client(
            base,
            timeout=spec.positive("timeout", http.DEFAULT_TIMEOUT),
            max_connections=spec.positive_int("max_connections", MAX_CONNECTIONS),
        )

    def _scrubbed(self, outcome: Outcome) -> Outcome:
        """The outcome without the key, should an answer ever echo it."""
        if self._key in outcome.detail:
            return attrs.evolve(outcome, detail=outcome.detail.replace(self._key, "[secret]"))
        return outcome

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            request = build_request(self.spec, delivery)
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        content_type, body = http.multipart(
            [("to", r) for r in request.to],
            [("message", MESSAGE_FILENAME, request.message, MESSAGE_CONTENT_TYPE)],
        )
        headers = [("Authorization", self._auth), ("Content-Type", content_type)]
        try:
            resp = await self._client.post(request.url, body, headers)
        except http.TransportError as exc:
            return http.transport_failure(exc)
        return self._scrubbed(classify(resp.status, resp.headers, resp.text))

    async def aclose(self) -> None:
        await self._client.aclose()


TYPE = ProviderType(
    name="mailgun",
    factory=MailgunProvider,
    settings={
        "domain": SettingInfo("the Mailgun sending domain (as in /v3/<domain>/...)", True),
        "region": SettingInfo("'us' (api.mailgun.net, default) or 'eu' (api.eu.mailgun.net)"),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo(
            f"calls in flight and connections kept (default {MAX_CONNECTIONS})"
        ),
    },
    secret="API key",  # noqa: S106 - names what the secret is, not a secret
    secret_required=True,
    default_endpoint=ENDPOINTS[DEFAULT_REGION],
    max_recipients=MAX_RECIPIENTS,
    max_message_bytes=MAX_MESSAGE_BYTES,
    max_connections=MAX_CONNECTIONS,
)
