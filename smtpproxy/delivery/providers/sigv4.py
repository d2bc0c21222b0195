"""AWS Signature Version 4 for a request sent with the Authorization header (pure).

sign() returns the headers to add to a request (X-Amz-Date, X-Amz-Security-Token with
session credentials, Authorization); the request must then be sent with exactly the
method, path, query, headers and body it was signed with. The steps (AWS General
Reference, "Signature Version 4 signing process"):

1. the canonical request: method, the URI-encoded path, the sorted query, the signed
   headers (names lower-cased and sorted, values with runs of spaces folded, host and
   x-amz-date always among them), their names joined with ";", and the hex SHA-256 of
   the body;
2. the string to sign: "AWS4-HMAC-SHA256", the timestamp, the credential scope
   (date/region/service/aws4_request) and the hex SHA-256 of the canonical request;
3. the signing key, an HMAC-SHA256 chain from "AWS4" + secret over the date, region,
   service and "aws4_request": the same for a whole day, so it is cached;
4. the signature, the hex HMAC-SHA256 of the string to sign with that key.

S3's variants (unsigned or chunked payloads, single URI encoding) are not implemented.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import urllib.parse
from collections.abc import Sequence

import attrs

ALGORITHM = "AWS4-HMAC-SHA256"


@attrs.frozen
class Credentials:
    access_key: str
    secret_key: str = attrs.field(repr=False)
    token: str | None = attrs.field(default=None, repr=False)  # session credentials


@functools.lru_cache(maxsize=16)
def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The key for one day (YYYYMMDD), region and service."""
    key = f"AWS4{secret_key}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def canonical_query(query: Sequence[tuple[str, str]]) -> str:
    """Pairs URI-encoded, sorted by name, then value."""
    return "&".join(f"{k}={v}" for k, v in sorted((_quote(k), _quote(v)) for k, v in query))


def _fold(value: str) -> str:
    return " ".join(value.split())


def sign(
    *,
    method: str,
    host: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    credentials: Credentials,
    region: str,
    service: str,
    now: datetime.datetime,
    query: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The headers that sign this request: X-Amz-Date, X-Amz-Security-Token (with a
    session token), Authorization.

    host is the Host header as sent; path is the path as sent (already normalized, not
    yet percent-encoded beyond what is on the wire); headers are the others to sign
    (e.g. Content-Type), all of them sent as given; now is the time of signing (UTC)."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    date = stamp[:8]
    added = [("X-Amz-Date", stamp)]
    if credentials.token:
        added.append(("X-Amz-Security-Token", credentials.token))
    signed: dict[str, list[str]] = {"host": [_fold(host)]}
    for name, value in [*headers, *added]:
        signed.setdefault(name.strip().lower(), []).append(_fold(value))
    names = sorted(signed)
    signed_headers = ";".join(names)
    canonical = "\n".join(
        (
            method.upper(),
            urllib.parse.quote(path or "/", safe="/~"),
            canonical_query(query),
            "".join(f"{n}:{','.join(signed[n])}\n" for n in names),
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        )
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    key = signing_key(credentials.secret_key, date, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    added.append(
        (
            "Authorization",
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}",
        )
    )
    return added
