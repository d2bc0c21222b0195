"""Failed-AUTH counters in Redis, shared by every instance and process.

With several instances (or `smtp.reuse_port` processes) behind one address, counters
kept in each process's memory would give a password guesser one allowance per process.
These keys hold the same sliding windows as limits.FailureTracker, whose decisions
(`is_locked`, `delay_for`) they use:

* `<prefix>:authfail:ip:<h>` and `<prefix>:authfail:user:<h>`: sorted sets of failure
  times within smtp.auth_failure_window (h: a hash, so no username is stored and keys
  stay short whatever a client sends);
* `<prefix>:authtrust:<h>`: this username logged in from this address lately.

Callers fall back to their in-memory tracker when Redis does not answer.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any

import attrs
import redis

from smtpproxy.ingress.limits import FailureTracker
from smtpproxy.queue.streams import mapped_errors


@attrs.frozen
class Counts:
    ip_failures: int
    user_failures: int
    trusted: bool


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "replace")).hexdigest()[:32]


class SharedFailures:
    def __init__(self, client: redis.Redis, prefix: str, policy: FailureTracker) -> None:
        self.client: Any = client
        self.policy = policy
        self._fail = f"{prefix}:authfail"
        self._trust = f"{prefix}:authtrust"

    def _keys(self, ip: str, username: str) -> tuple[str, str]:
        return f"{self._fail}:ip:{_digest(ip)}", f"{self._fail}:user:{_digest(username)}"

    def _trust_key(self, ip: str, username: str) -> str:
        return f"{self._trust}:{_digest(username, ip)}"

    def counts(self, ip: str, username: str, now: float) -> Counts:
        """Blocking: the recent failures of the address and the username, and whether
        the address is trusted for the username."""
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for key in self._keys(ip, username):
                pipe.zcount(key, now - self.policy.window, "+inf")
            pipe.exists(self._trust_key(ip, username))
            ip_failures, user_failures, trusted = pipe.execute()
        return Counts(int(ip_failures), int(user_failures), bool(trusted))

    def locked(self, counts: Counts) -> bool:
        return self.policy.is_locked(counts.ip_failures, counts.user_failures, counts.trusted)

    @staticmethod
    def success_changes_anything(counts: Counts) -> bool:
        """A login with no failures to forget, from a trusted address, writes nothing
        (trust is renewed when it has expired): the usual login costs one round trip."""
        return counts.user_failures > 0 or not counts.trusted

    def failed(self, ip: str, username: str, now: float) -> Counts:
        """Blocking: count a failure; the counts it leaves (what `counts` would read)."""
        window = self.policy.window
        member = f"{now!r}:{secrets.token_hex(4)}"
        with mapped_errors():
            pipe = self.client.pipeline(transaction=True)
            for key in self._keys(ip, username):
                pipe.zadd(key, {member: now})
                pipe.zremrangebyscore(key, "-inf", now - window)
                pipe.zcard(key)
                pipe.expire(key, math.ceil(window))
            pipe.exists(self._trust_key(ip, username))
            replies = pipe.execute()
        return Counts(int(replies[2]), int(replies[6]), bool(replies[8]))

    def delay(self, counts: Counts) -> float:
        """How long to wait before answering the failure that left these counts."""
        return self.policy.delay_for(max(counts.ip_failures, counts.user_failures))

    def succeeded(self, ip: str, username: str) -> None:
        """Blocking: a good login forgets the username's failures (not the address's)
        and trusts the address for the username."""
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self._keys(ip, username)[1])
            pipe.set(self._trust_key(ip, username), "1", ex=math.ceil(self.policy.trust_period))
            pipe.execute()
