"""Shared HTTP plumbing for API providers: one httpx client per provider (its own pool
and timeouts), status classification common to every JSON API, and Retry-After.

httpx runs natively on trio. Transport errors and timeouts are transient; so are 408,
429 and 5xx. Other 4xx answers mean the request itself is wrong for this provider
(validation, auth, permission, size) and are permanent: retrying would not help.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

import httpx

from smtpproxy.models import Outcome

DEFAULT_TIMEOUT = 30.0


def open_client(
    base_url: str, *, timeout: float = DEFAULT_TIMEOUT, max_connections: int = 20
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        headers={"User-Agent": "smtpproxy"},
    )


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


def transport_failure(exc: httpx.HTTPError) -> Outcome:
    """A request that got no HTTP answer: always worth another try later."""
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    return Outcome.retry(f"{kind}: {type(exc).__name__}")


def short(text: str, limit: int = 300) -> str:
    """An error body cut to one short line for logs and delivery_logs."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."
