"""Shared HTTP plumbing for API providers: one client per provider (its own keep-alive
pool and timeouts, http11.py), request bodies (form, multipart), status classification
common to every JSON API, and Retry-After.

Transport errors and timeouts are transient; so are 408, 429 and 5xx. Other 4xx
answers mean the request itself is wrong for this provider (validation, auth,
permission, size) and are permanent: retrying would not help.
"""

from __future__ import annotations

import base64
import email.utils
import json
import secrets
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from smtpproxy.delivery.providers.http11 import Client, Response, Timeout, TransportError
from smtpproxy.models import Outcome

DEFAULT_TIMEOUT = 30.0

__all__ = [  # providers see one HTTP module
    "DEFAULT_TIMEOUT",
    "Client",
    "Response",
    "TransportError",
    "basic_auth",
    "classify_status",
    "form",
    "multipart",
    "open_client",
    "parse_retry_after",
    "short",
    "transport_failure",
]


def open_client(
    base_url: str, *, timeout: float = DEFAULT_TIMEOUT, max_connections: int = 20
) -> Client:
    return Client(base_url, timeout=timeout, connect_timeout=10.0, max_connections=max_connections)


def basic_auth(user: str, password: str) -> str:
    """An Authorization header value for HTTP Basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def form(fields: Sequence[tuple[str, str]]) -> bytes:
    """An application/x-www-form-urlencoded body."""
    return urllib.parse.urlencode(list(fields)).encode("ascii")


def multipart(
    fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, str, bytes, str]]
) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data request: text fields, then files as
    (field name, file name, content, content type)."""
    boundary = secrets.token_hex(16)
    parts: list[bytes] = []
    for name, value in fields:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'
        parts.append(head.encode() + value.encode() + b"\r\n")
    for name, filename, content, content_type in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"; '
            f'filename="{_quoted(filename)}"\r\nContent-Type: {content_type}\r\n\r\n'
        )
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(
    status: int, headers: Mapping[str, str], detail: str, *, message_id: str | None = None
) -> Outcome:
    """The outcome of an HTTP answer, by status code alone."""
    if 200 <= status < 300:
        return Outcome.delivered(message_id, detail=f"HTTP {status}")
    text = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status in (408, 425, 429) or status >= 500:
        return Outcome.retry(text, parse_retry_after(headers.get("retry-after")))
    return Outcome.permanent(text)


def transport_failure(exc: TransportError) -> Outcome:
    """A request that got no HTTP answer: always worth another try later."""
    if isinstance(exc, Timeout):
        return Outcome.retry(f"timeout: {exc}")
    return Outcome.retry(f"connection error: {exc}")


def json_object(text: str) -> dict[str, Any]:
    """An answer's JSON object; {} when the body is not JSON or not an object."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def short(text: str, limit: int = 300) -> str:
    """An error body cut to one short line for logs and delivery_logs."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."
