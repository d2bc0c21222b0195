"""Limits enforced at SMTP time, as pure decisions (the I/O is in ingress/guard.py).

* rates: an account's `rate_limit` ('10/s', '600/m', '5000/h') is a fixed-window count
  kept in Redis, shared by every instance; over it, MAIL gets 421 4.7.0 with the seconds
  until the window ends;
* monthly quota: a tenant's `monthly_limit` counts accepted messages per calendar month
  (UTC) in Redis, rebuilt from PostgreSQL when the counter is missing; at the limit,
  MAIL gets 452 4.7.1;
* networks: a tenant's `allowed_networks` (CIDRs) bound where its accounts may log in;
* brute force: failed AUTH attempts are counted per client IP and per username in a
  sliding window; each failure is answered more slowly, and past the limit the client
  gets 421 4.7.0 and is disconnected, and further attempts are refused until the
  window has passed.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterable
from datetime import UTC, datetime

import attrs

_UNITS = {"s": 1, "m": 60, "h": 3600}


@attrs.frozen
class Rate:
    count: int
    per: int  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'10/s' -> Rate(10, 1); raises ValueError naming the expected form."""
        number, slash, unit = text.strip().partition("/")
        if not slash or not number.isdigit() or int(number) < 1 or unit not in _UNITS:
            raise ValueError(f"rate {text!r}: expected N/s, N/m or N/h, e.g. 10/s")
        return cls(int(number), _UNITS[unit])

    def __str__(self) -> str:
        unit = {v: k for k, v in _UNITS.items()}[self.per]
        return f"{self.count}/{unit}"


def rate_window(rate: Rate, now: float) -> tuple[int, int]:
    """(this window's number, seconds until it ends) for a time in epoch seconds."""
    window = int(now // rate.per)
    return window, max(1, int((window + 1) * rate.per - now + 0.999))


def rate_key(prefix: str, account_id: int, rate: Rate, window: int) -> str:
    return f"{prefix}:rate:{account_id}:{rate.per}:{window}"


def month_of(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m")


def quota_key(prefix: str, tenant_id: int, month: str) -> str:
    return f"{prefix}:quota:{tenant_id}:{month}"


def over_rate_reply(retry_in: int) -> str:
    return f"421 4.7.0 Sending rate exceeded for this account, try again in {retry_in} s"


QUOTA_REPLY = "452 4.7.1 Monthly message quota of this tenant is used up"
BUSY_REPLY = "421 4.3.2 System busy (delivery backlog), try again later"
TOO_MANY_FAILURES = "421 4.7.0 Too many failed authentication attempts, try again later"


def ip_allowed(ip: str, networks: Iterable[str]) -> bool:
    """True when no networks are set, or ip is in one of them."""
    nets = list(networks)
    if not nets:
        return True
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n, strict=False) for n in nets)


@attrs.define
class FailureTracker:
    """Failed AUTH attempts per client IP and per username within `window` seconds.

    A username locked by failures stays usable from an address it logged in from
    successfully within `trust_period`: otherwise anyone could lock a real client out by
    failing logins under its name from elsewhere. That address's own failures still
    lock it.
    """

    max_failures: int = 5
    window: float = 900.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    trust_period: float = 86400.0
    _by_key: dict[str, collections.deque[float]] = attrs.Factory(dict)
    _trusted: dict[tuple[str, str], float] = attrs.Factory(dict)  # (user, ip) -> last success
    _pending: collections.Counter[str] = attrs.Factory(collections.Counter)  # being checked

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        times = self._by_key.get(key)
        if times is None:
            return collections.deque()
        while times and now - times[0] > self.window:
            times.popleft()
        if not times:
            del self._by_key[key]
        return times

    def _is_trusted(self, ip: str, username: str, now: float) -> bool:
        last = self._trusted.get((username, ip))
        return last is not None and now - last <= self.trust_period

    # -- the decisions, also used with counts kept in Redis (ingress/failures.py) ------
    def is_locked(self, ip_failures: int, user_failures: int, trusted: bool) -> bool:
        """Too many recent failures from this IP, or for this username from an address
        it has not logged in from lately."""
        if ip_failures >= self.max_failures:
            return True
        return user_failures >= self.max_failures and not trusted

    def delay_for(self, failures: int) -> float:
        """How long to wait before answering the failure that made the count this."""
        return float(min(self.max_delay, self.base_delay * 2 ** (failures - 1)))

    # -- counts kept here (one process) ------------------------------------------------
    def locked(self, ip: str, username: str, now: float) -> bool:
        return self.is_locked(
            len(self._recent(f"ip:{ip}", now)),
            len(self._recent(f"user:{username}", now)),
            self._is_trusted(ip, username, now),
        )

    def reserve(self, ip: str, username: str, now: float) -> str:
        """Take a place for an attempt whose password is about to be checked: 'ok' (settle
        it with `settle`), 'wait' (attempts being checked may still lock the client) or
        'locked'. The same rule as SharedFailures.reserve, for one process."""
        keys = (f"ip:{ip}", f"user:{username}")
        ip_failures, user_failures = (len(self._recent(key, now)) for key in keys)
        trusted = self._is_trusted(ip, username, now)
        if self.is_locked(ip_failures, user_failures, trusted):
            return "locked"
        ip_pending, user_pending = (self._pending[key] for key in keys)
        if self.is_locked(ip_failures + ip_pending, user_failures + user_pending, trusted):
            return "wait"
        self._pending.update(keys)
        return "ok"

    def settle(self, ip: str, username: str) -> None:
        """A reserved attempt is over (its failure, if any, is counted by `failed`)."""
        for key in (f"ip:{ip}", f"user:{username}"):
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]

    def failed(self, ip: str, username: str, now: float) -> float:
        """Record a failure; returns how long to wait before answering it."""
        worst = 0
        for key in (f"ip:{ip}", f"user:{username}"):
            times = self._recent(key, now)
            times.append(now)
            self._by_key[key] = times
            worst = max(worst, len(times))
        return self.delay_for(worst)

    def succeeded(self, ip: str, username: str, now: float) -> None:
        """A good login forgets that username's failures (not the IP's), and makes the
        address trusted for the username."""
        self._by_key.pop(f"user:{username}", None)
        self._trusted[(username, ip)] = now

    def prune(self, now: float) -> None:
        """Drop keys whose failures are all older than the window, and trust older than
        the trust period (bounded memory)."""
        for key in list(self._by_key):
            self._recent(key, now)
        for pair, last in list(self._trusted.items()):
            if now - last > self.trust_period:
                del self._trusted[pair]
