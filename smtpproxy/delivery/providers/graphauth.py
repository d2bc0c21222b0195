"""Tokens for Microsoft Graph: the OAuth2 client-credentials grant of the Microsoft
identity platform, with a client secret or a certificate, cached per application.

POST {login_endpoint}/{tenant}/oauth2/v2.0/token with client_id, scope
(https://graph.microsoft.com/.default) and grant_type client_credentials, and either
client_secret or a signed client assertion (client_assertion_type
urn:ietf:params:oauth:client-assertion-type:jwt-bearer): a JWT signed with the
application's certificate key, PS256, with the certificate's SHA-256 thumbprint in
x5t#S256 (and the SHA-1 one in x5t, for older tenants), aud the token endpoint, iss and
sub the client id, a fresh jti, valid for five minutes (learn.microsoft.com, "Microsoft
identity platform certificate credentials").

Tokens are cached per application (login endpoint, tenant, client id, scope and
credential): every msgraph provider of one app registration shares one token. A token
is reused until min(5 minutes, half its lifetime) before it runs out; concurrent sends
wait on one lock for one fetch and share its failure, so a wrong secret is one request,
not one per waiting send. While the token endpoint fails, the old token is used until
it is about to run out. A token Graph rejected (401) is replaced once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from urllib.parse import quote

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from smtpproxy.delivery.providers import http
from smtpproxy.models import Outcome

SCOPE = "https://graph.microsoft.com/.default"
REFRESH_MARGIN = 300.0  # seconds before expiry a token is replaced (at most half its life)
EXPIRY_SLACK = 30.0  # a token is not sent in its last seconds (at most a tenth of its life)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300


class CredentialError(ValueError):
    """A certificate credential that cannot be used (names what is wrong, never the key)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@attrs.frozen
class Certificate:
    """An application's certificate and its private key (RSA), from one PEM text."""

    key: rsa.RSAPrivateKey = attrs.field(repr=False)
    der: bytes = attrs.field(repr=False)

    @classmethod
    def from_pem(cls, pem: str) -> Certificate:
        """The PEM text holds the private key and the certificate, as `openssl req -x509
        -newkey rsa:2048 -keyout k -out c` writes them (cat k c)."""
        data = pem.encode()
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise CredentialError("the secret has no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise CredentialError("the secret has no unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CredentialError("the private key is not an RSA key (Entra needs RSA)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CredentialError("the private key does not belong to the certificate")
        return cls(key, cert.public_bytes(serialization.Encoding.DER))

    @property
    def thumbprint(self) -> str:
        """SHA-1 thumbprint in hex, as the Entra portal shows it."""
        return hashlib.sha1(self.der).hexdigest().upper()  # noqa: S324 - a name, not security

    def assertion(self, client_id: str, audience: str, now: float | None = None) -> str:
        """A signed client assertion (JWT) for the token endpoint `audience`."""
        issued = int(time.time() if now is None else now)
        header = {
            "alg": "PS256",
            "typ": "JWT",
            "x5t#S256": _b64url(hashlib.sha256(self.der).digest()),
            "x5t": _b64url(hashlib.sha1(self.der).digest()),  # noqa: S324 - a name
        }
        claims = {
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": str(uuid.uuid4()),
            "nbf": issued,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self.key.sign(
            signing_input.encode("ascii"),
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
        return signing_input + "." + _b64url(signature)


@attrs.frozen
class App:
    """An application registration as one tenant knows it, and how it proves itself.
    Two providers with the same App share one cached token."""

    login_endpoint: str
    tenant: str
    client_id: str
    scope: str
    secret: str | None = attrs.field(default=None, repr=False, eq=False)
    certificate: Certificate | None = attrs.field(default=None, repr=False, eq=False)
    # what tells credentials apart in the cache, without holding them as its key
    credential: str = attrs.field(default="", repr=False)

    @classmethod
    def of(
        cls,
        login_endpoint: str,
        tenant: str,
        client_id: str,
        scope: str,
        *,
        secret: str | None = None,
        certificate: Certificate | None = None,
    ) -> App:
        proof = certificate.der if certificate is not None else (secret or "").encode()
        return cls(
            login_endpoint.rstrip("/"),
            tenant,
            client_id,
            scope,
            secret,
            certificate,
            hashlib.sha256(proof).hexdigest(),
        )

    @property
    def token_path(self) -> str:
        return f"/{quote(self.tenant, safe='')}/oauth2/v2.0/token"

    @property
    def token_url(self) -> str:
        return self.login_endpoint + self.token_path

    def form(self) -> list[tuple[str, str]]:
        """The token request's fields."""
        fields = [("client_id", self.client_id), ("scope", self.scope)]
        if self.certificate is not None:
            assertion = self.certificate.assertion(self.client_id, self.token_url)
            fields += [("client_assertion_type", ASSERTION_TYPE), ("client_assertion", assertion)]
        else:
            fields.append(("client_secret", self.secret or ""))
        return [*fields, ("grant_type", "client_credentials")]

    def scrub(self, text: str) -> str:
        """Text with the client secret taken out, should an answer ever echo it."""
        return text.replace(self.secret, "***") if self.secret else text


def classify_token(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """A failed token request: the identity platform's errors (invalid_client,
    unauthorized_client, invalid_scope, AADSTS codes) are permanent, except
    temporarily_unavailable; 408, 429 and 5xx retry."""
    body = http.json_object(text)
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
    body = http.json_object(text)
    token = body.get("access_token")
    kind = str(body.get("token_type") or "Bearer")
    try:
        lifetime = float(body.get("expires_in", 0))
    except (TypeError, ValueError):
        return None
    if not isinstance(token, str) or not token or kind.lower() != "bearer":
        return None
    return token, lifetime


class Tokens:
    """The cached token of one application, fetched through the asking provider's
    client for the login endpoint."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._lock = trio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # trio time: when to fetch a new token
        self._usable_until = 0.0  # trio time: when the token runs out (less EXPIRY_SLACK)
        self.fetches = 0
        self._last_failure: Outcome | None = None

    async def token(self, client: http.Client, rejected: str | None = None) -> str | Outcome:
        """A token to send with: the cached one until its refresh time (unless Graph just
        rejected it), else a new one. When the token endpoint fails, a cached token that
        has not run out yet is still used."""
        seen = self.fetches
        async with self._lock:
            if rejected is not None and self._token == rejected:
                self._token = None
            token = self._token
            if token is not None and trio.current_time() < self._refresh_at:
                return token
            if self.fetches != seen and self._last_failure is not None:
                failure = self._last_failure  # the fetch this send waited for failed
            else:
                fetched = await self._fetch(client)
                if isinstance(fetched, str):
                    return fetched
                failure = fetched
            if token is not None and trio.current_time() < self._usable_until:
                return token
            return failure

    async def _fetch(self, client: http.Client) -> str | Outcome:
        """Ask the token endpoint; cache the token, or remember the failure for the sends
        that waited for this fetch."""
        self.fetches += 1
        started = trio.current_time()
        headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]
        try:
            resp = await client.post(self.app.token_path, http.form(self.app.form()), headers)
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
            self._last_failure = attrs.evolve(failure, detail=self.app.scrub(failure.detail))
            return self._last_failure
        token, lifetime = parsed
        self._token = token
        self._refresh_at = started + lifetime - min(REFRESH_MARGIN, lifetime / 2)
        self._usable_until = started + lifetime - min(EXPIRY_SLACK, lifetime / 10)
        self._last_failure = None
        return token


class TokenCache:
    """One Tokens per application, shared by every provider that uses it: providers of
    one app registration (and a provider rebuilt by a reload) send with one token."""

    def __init__(self) -> None:
        self._by_app: dict[App, Tokens] = {}

    def tokens(self, app: App) -> Tokens:
        found = self._by_app.get(app)
        if found is None:
            found = self._by_app[app] = Tokens(app)
        return found


CACHE = TokenCache()  # the process's
