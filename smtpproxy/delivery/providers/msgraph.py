"""Microsoft Graph sendMail with MIME content (POST /v1.0/users/{user}/sendMail).

Graph's documented way to send a MIME message: the whole message base64-encoded as the
request body, Content-Type text/plain, Authorization: Bearer <token> (user: sendMail,
learn.microsoft.com/graph/api/user-sendmail). Success is 202 Accepted with no body and
no message id: the answer's request-id header (else client-request-id, which is sent
with every request) names the attempt.

Tokens: OAuth2 client credentials (POST {login_endpoint}/{tenant_id}/oauth2/v2.0/token
with client_id, client_secret, scope https://graph.microsoft.com/.default and
grant_type client_credentials). A token is reused until min(5 minutes, half its
lifetime) before expires_in runs out; concurrent sends wait on one lock for one fetch
(and share its failure, so a wrong secret is one request, not one per waiting send).
While the token endpoint fails, the old token is used until it is about to run out.
When Graph answers 401 the token is fetched again once, unless another send has done
so already, and the request is sent once more; a second 401 is permanent.

Recipients: Graph sends a MIME message to the addresses in its To, Cc and Bcc header
fields (Exchange never shows Bcc to recipients); it has no envelope. prepare_mime()
makes the headers say exactly this delivery's envelope:
  - every envelope recipient that no To/Cc/Bcc field names is added in one Bcc field
    at the top of the header (merged with a Bcc field the message already has, which
    is then taken out), so Bcc recipients and route groups of envelope-only recipients
    are reached and nobody sees them; nothing else in the message changes;
  - when a To/Cc/Bcc (or Resent-To/Cc/Bcc) field names an address that is not an
    envelope recipient of this delivery, the delivery is refused as permanent, without
    a request: Graph would send to that address too, which the SMTP client did not ask
    for (a message split across providers, or headers that differ from the envelope,
    such as a mailing list's). Addresses compare case-insensitively, domains by their
    Punycode form.

save_to_sent_items: for MIME content, sendMail has no way to say saveToSentItems
(the parameter exists only in the JSON form; microsoftgraph/microsoft-graph-docs
issue 18698), and Graph saves a copy in the mailbox's Sent Items. The setting is
therefore true by default and only true: false is a configuration error instead of a
promise Graph would not keep.

Limits: a request body of at most 4 MB (4,194,304 bytes; Graph refuses larger MIME
payloads with 413), the base64 text included, so about 3 MB of MIME; checked before
any request. At most 500 recipients per message (Exchange Online's default recipient
limit; the consumer splits larger route groups, which works when those recipients are
envelope-only).
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import json
import uuid
from collections.abc import Mapping
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import quote

import attrs
import trio

from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome, OutcomeKind

GRAPH_ENDPOINT = "https://graph.microsoft.com"
LOGIN_ENDPOINT = "https://login.microsoftonline.com"
SCOPE = "https://graph.microsoft.com/.default"
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_RECIPIENTS = 500
REFRESH_MARGIN = 300.0  # seconds before expiry a token is replaced (at most half its life)
EXPIRY_SLACK = 30.0  # a token is not sent in its last seconds (at most a tenth of its life)
RECIPIENT_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
BCC_LINE = 78
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

_HEADERS = BytesHeaderParser(policy=email.policy.default)


class RequestError(ValueError):
    """The delivery cannot be sent as this MIME message through Graph (permanent)."""


# ---------------------------------------------------------------------------- the message


def _key(address: str) -> str:
    """An address as compared: lower case, the domain in Punycode."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):  # not a valid IDN: compared as it is
            domain = domain.encode("idna").decode("ascii")
    return f"{local}@{domain}".lower()


def header_recipients(raw: bytes, fields: tuple[str, ...] = RECIPIENT_FIELDS) -> list[str]:
    """The addresses of the To, Cc, Bcc (and Resent-) fields, in order.

    Raises RequestError when such a field cannot be read: Graph would still address
    the message from it, to recipients nobody can check.
    """
    msg = _HEADERS.parsebytes(raw)
    out: list[str] = []
    for name in fields:
        for value in msg.get_all(name) or []:
            try:
                addresses = value.addresses
            except (AttributeError, ValueError, IndexError):
                raise RequestError(f"cannot read the {name.title()} header field") from None
            out.extend(_unescape(a.addr_spec) for a in addresses if a.addr_spec)
    return out


def _unescape(text: str) -> str:
    """Header text as UTF-8: the parser keeps 8-bit bytes (RFC 6532) as surrogates."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header_block(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(header lines with their line ends, the rest from the blank line on, newline)."""
    first = raw.find(b"\n")
    newline = b"\r\n" if first > 0 and raw[first - 1 : first] == b"\r" else b"\n"
    lines: list[bytes] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        pos = end
    return lines, raw[pos:], newline


def _without_bcc(lines: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # a continuation of the field before
            if not dropping:
                out.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == b"bcc"
        if not dropping:
            out.append(line)
    return out


def _bcc_field(addresses: list[str], newline: bytes) -> bytes:
    """One Bcc field, folded between addresses to keep lines near 78 characters."""
    lines: list[str] = []
    current = "Bcc: " + addresses[0]
    for address in addresses[1:]:
        if len(current) + 2 + len(address) > BCC_LINE:
            lines.append(current + ",")
            current = " " + address
        else:
            current += ", " + address
    lines.append(current)
    return b"".join(line.encode("utf-8") + newline for line in lines)


def prepare_mime(delivery: Delivery) -> bytes:
    """The MIME message Graph is to send: the body, with a Bcc field for the envelope
    recipients its header does not name. Raises RequestError when the header names an
    address that is not a recipient of this delivery (see the module docstring)."""
    envelope = {_key(r): r for r in delivery.recipients}
    if not envelope:
        raise RequestError("no recipients")
    if len(envelope) > MAX_RECIPIENTS:
        raise RequestError(f"more than {MAX_RECIPIENTS} recipients in one Graph message")
    if any("\r" in r or "\n" in r for r in envelope.values()):
        raise RequestError("a recipient address contains a line break")
    named = header_recipients(delivery.body)
    named_keys = {_key(a) for a in named}
    strangers = [a for a in dict.fromkeys(named) if _key(a) not in envelope]
    if strangers:
        raise RequestError(
            "the header names recipients that are not in this delivery's envelope, and "
            f"Graph sends to every address in To/Cc/Bcc: {http.short(', '.join(strangers), 200)}"
        )
    missing = [r for key, r in envelope.items() if key not in named_keys]
    if not missing:
        return delivery.body
    lines, rest, newline = _header_block(delivery.body)
    blind = {_key(a): a for a in [*header_recipients(delivery.body, ("bcc",)), *missing]}
    return _bcc_field(list(blind.values()), newline) + b"".join(_without_bcc(lines)) + rest


def build_request(delivery: Delivery) -> bytes:
    """The sendMail request body: the prepared MIME message in base64 (ASCII, one line).

    Raises RequestError when Graph cannot take it (recipients, or over 4 MB)."""
    payload = base64.b64encode(prepare_mime(delivery))
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestError(
            f"message too large for Graph ({len(payload)} bytes in base64, "
            f"{MAX_REQUEST_BYTES} per request)"
        )
    return payload


# ---------------------------------------------------------------------------- answers


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _graph_error(text: str) -> tuple[str, str]:
    """(code, message) of Graph's {"error": {"code", "message"}} body."""
    error = _json(text).get("error")
    if not isinstance(error, dict):
        return "", http.short(text)
    return str(error.get("code") or ""), http.short(str(error.get("message") or ""))


def message_id(headers: Mapping[str, str]) -> str | None:
    """Graph's name for the request: request-id, else client-request-id."""
    return headers.get("request-id") or headers.get("client-request-id") or None


def classify(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """A sendMail answer: 202 delivered; 429, 5xx and Exchange's "later" codes retry
    (after Retry-After); 400 (invalid recipients, MIME), 401, 403 (access denied),
    404 (no such mailbox) and 413 are permanent."""
    if 200 <= status < 300:
        return Outcome.delivered(message_id(headers), detail=f"HTTP {status}")
    code, message = _graph_error(text)
    detail = f"{code}: {message}" if code and message else code or message
    if code in TRANSIENT_CODES:
        wait = http.parse_retry_after(headers.get("retry-after"))
        return Outcome.retry(f"HTTP {status}: {detail}", wait)
    return http.classify_status(status, headers, detail)


def classify_token(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """A failed token request: the identity platform's errors (invalid_client,
    unauthorized_client, invalid_scope, AADSTS codes) are permanent, except
    temporarily_unavailable; 408, 429 and 5xx retry."""
    body = _json(text)
    error = str(body.get("error") or "")
    description = str(body.get("error_description") or "").splitlines()
    first = description[0].strip() if description else ""
    reason = ": ".join(p for p in (error, first) if p) or http.short(text)
    detail = f"token request: HTTP {status}" + (f": {http.short(reason)}" if reason else "")
    if error == "temporarily_unavailable" or status in (408, 425, 429) or status >= 500:
        return Outcome.retry(detail, http.parse_retry_after(headers.get("retry-after")))
    return Outcome.permanent(detail)


def parse_token(text: str) -> tuple[str, float] | None:
    """(access_token, expires_in seconds) of a token answer, None when it has none."""
    body = _json(text)
    token = body.get("access_token")
    kind = str(body.get("token_type") or "Bearer")
    try:
        lifetime = float(body.get("expires_in", 0))
    except (TypeError, ValueError):
        return None
    if not isinstance(token, str) or not token or kind.lower() != "bearer":
        return None
    return token, lifetime


# ---------------------------------------------------------------------------- the provider


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


class GraphProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self._tenant = str(spec.require("tenant_id"))
        self._client_id = str(spec.require("client_id"))
        self.user = str(spec.require("user"))
        self._secret = spec.require_secret("client secret")
        if not _bool(spec, "save_to_sent_items", True):
            raise ProviderConfigError(
                f"provider {spec.name}: save_to_sent_items cannot be false: Graph's MIME "
                "sendMail always saves a copy in Sent Items"
            )
        self._scope = str(spec.setting("scope") or SCOPE)
        timeout = spec.positive("timeout", http.DEFAULT_TIMEOUT)
        self._path = f"/v1.0/users/{quote(self.user, safe='@')}/sendMail"
        self._token_path = f"/{quote(self._tenant, safe='')}/oauth2/v2.0/token"
        self._graph = http.open_client(
            spec.endpoint or GRAPH_ENDPOINT,
            timeout=timeout,
            max_connections=spec.positive_int("max_connections", 20),
        )
        self._login = http.open_client(
            str(spec.setting("login_endpoint") or LOGIN_ENDPOINT),
            timeout=timeout,
            max_connections=2,  # one fetch at a time, under the lock
        )
        self._lock = trio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # trio time: when to fetch a new token
        self._usable_until = 0.0  # trio time: when the token runs out (less EXPIRY_SLACK)
        self._fetches = 0
        self._last_failure: Outcome | None = None

    def __repr__(self) -> str:
        return f"GraphProvider(name={self.spec.name!r}, user={self.user!r})"

    async def _access_token(self, rejected: str | None = None) -> str | Outcome:
        """A token to send with: the cached one until its refresh time (unless Graph just
        rejected it), else a new one. When the token endpoint fails, a cached token that
        has not run out yet is still used."""
        seen = self._fetches
        async with self._lock:
            if rejected is not None and self._token == rejected:
                self._token = None
            token = self._token
            if token is not None and trio.current_time() < self._refresh_at:
                return token
            if self._fetches != seen and self._last_failure is not None:
                failure = self._last_failure  # the fetch this send waited for failed
            else:
                fetched = await self._fetch_token()
                if isinstance(fetched, str):
                    return fetched
                failure = fetched
            if token is not None and trio.current_time() < self._usable_until:
                return token
            return failure

    async def _fetch_token(self) -> str | Outcome:
        """Ask the token endpoint; cache the token, or remember the failure for the sends
        that waited for this fetch."""
        self._fetches += 1
        started = trio.current_time()
        try:
            resp = await self._login.post(
                self._token_path,
                http.form(
                    [
                        ("client_id", self._client_id),
                        ("scope", self._scope),
                        ("client_secret", self._secret),
                        ("grant_type", "client_credentials"),
                    ]
                ),
                [
                    ("Accept", "application/json"),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ],
            )
        except http.TransportError as exc:
            failure = http.transport_failure(exc)
            self._last_failure = Outcome.retry(f"token request: {failure.detail}")
            return self._last_failure
        parsed = parse_token(resp.text) if resp.status == 200 else None
        if parsed is None:
            if resp.status == 200:
                failure = Outcome.retry("token request: HTTP 200 without a Bearer access_token")
            else:
                failure = classify_token(resp.status, resp.headers, resp.text)
            self._last_failure = attrs.evolve(
                failure, detail=failure.detail.replace(self._secret, "***")
            )
            return self._last_failure
        token, lifetime = parsed
        self._token = token
        self._refresh_at = started + lifetime - min(REFRESH_MARGIN, lifetime / 2)
        self._usable_until = started + lifetime - min(EXPIRY_SLACK, lifetime / 10)
        self._last_failure = None
        return token

    async def _post(self, payload: bytes, token: str) -> tuple[http.Response, str] | Outcome:
        """The answer, and the client-request-id it was sent with."""
        request_id = str(uuid.uuid4())
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "text/plain"),
            ("client-request-id", request_id),
            ("return-client-request-id", "true"),
        ]
        try:
            return await self._graph.post(self._path, payload, headers), request_id
        except http.TransportError as exc:
            return http.transport_failure(exc)

    async def _attempt(self, payload: bytes) -> tuple[http.Response, str] | Outcome:
        """POST with the current token; after a 401, once more with a new token."""
        token = await self._access_token()
        if isinstance(token, Outcome):
            return token
        resp = await self._post(payload, token)
        if isinstance(resp, Outcome) or resp[0].status != 401:
            return resp
        token = await self._access_token(rejected=token)
        if isinstance(token, Outcome):
            return token
        return await self._post(payload, token)

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            payload = build_request(delivery)
        except RequestError as exc:
            return Outcome.permanent(str(exc))
        answer = await self._attempt(payload)
        if isinstance(answer, Outcome):
            return answer
        resp, sent_id = answer
        outcome = classify(resp.status, resp.headers, resp.text)
        if resp.status == 401:
            return Outcome.permanent(f"{outcome.detail} (again with a new token)")
        if outcome.kind == OutcomeKind.DELIVERED and outcome.provider_message_id is None:
            return Outcome.delivered(sent_id, detail=outcome.detail)
        return outcome

    async def aclose(self) -> None:
        await self._graph.aclose()
        await self._login.aclose()


TYPE = ProviderType(
    name="msgraph",
    factory=GraphProvider,
    settings={
        "tenant_id": SettingInfo("Entra ID tenant (directory) id or domain", True),
        "client_id": SettingInfo("application (client) id of the app registration", True),
        "user": SettingInfo("mailbox to send as: user id or user principal name", True),
        "save_to_sent_items": SettingInfo(
            "true (default and only value): Graph's MIME sendMail always saves to Sent Items"
        ),
        "login_endpoint": SettingInfo(f"identity platform base URL (default {LOGIN_ENDPOINT})"),
        "scope": SettingInfo(f"token scope (default {SCOPE}; national clouds differ)"),
        "timeout": SettingInfo("request timeout in seconds (default 30)"),
        "max_connections": SettingInfo("connection pool size (default 20)"),
    },
    secret="client secret",  # noqa: S106 - names what the secret is, not a secret
    secret_required=True,
    default_endpoint=GRAPH_ENDPOINT,
    max_recipients=MAX_RECIPIENTS,
    # 4 MB of base64 per request, less room for the Bcc field prepare_mime() may add
    max_message_bytes=MAX_REQUEST_BYTES * 3 // 4 - 32 * 1024,
)
