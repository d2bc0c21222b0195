"""Failed-AUTH counters in Redis, shared by every instance and process.

With several instances (or `smtp.reuse_port` processes) behind one address, counters
kept in each process's memory would give a password guesser one allowance per process.
These keys hold the same sliding windows as limits.FailureTracker, whose decisions
(`is_locked`, `delay_for`) they use:

* `<prefix>:authfail:ip:<h>` and `<prefix>:authfail:user:<h>`: sorted sets of failure
  times within smtp.auth_failure_window (h: a hash, so no username is stored and keys
  stay short whatever a client sends);
* `<prefix>:authpending:ip:<h>` and `<prefix>:authpending:user:<h>`: attempts being
  checked right now (score: when the reservation lapses, should its process die);
* `<prefix>:authtrust:<h>`: this username logged in from this address lately.

An attempt whose password must be checked first reserves its place (`reserve`, one
Lua script, so the check and the charge are one atomic step): it is refused when the
failures already counted lock the address or username, and told to wait when those
failures plus the attempts being checked reach the limit. Its outcome then turns the
reservation into a failure (`failed`) or drops it (`succeeded`, `release`). Opening
many sessions at once therefore buys a guesser no more checks than guessing one
after another: at most auth_max_failures passwords are ever checked.

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


PENDING_LIFETIME = 30.0  # seconds a reservation outlives a process that died holding it

# KEYS: ip failures, user failures, ip pending, user pending, trust
# ARGV: now, window, max failures, member, pending lifetime
# -> {verdict ('ok', 'wait' or 'locked'), ip failures, user failures, trusted}
_RESERVE = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local ip_failures = redis.call('ZCARD', KEYS[1])
local user_failures = redis.call('ZCARD', KEYS[2])
local trusted = redis.call('EXISTS', KEYS[5])
local user_counts = trusted == 0
if ip_failures >= limit or (user_counts and user_failures >= limit) then
  return {'locked', ip_failures, user_failures, trusted}
end
if ip_failures + redis.call('ZCARD', KEYS[3]) >= limit
   or (user_counts and user_failures + redis.call('ZCARD', KEYS[4]) >= limit) then
  return {'wait', ip_failures, user_failures, trusted}
end
local lapses = now + tonumber(ARGV[5])
for i = 3, 4 do
  redis.call('ZADD', KEYS[i], lapses, ARGV[4])
  redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[5])))
end
return {'ok', ip_failures, user_failures, trusted}
"""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "replace")).hexdigest()[:32]


class SharedFailures:
    def __init__(self, client: redis.Redis, prefix: str, policy: FailureTracker) -> None:
        self.client: Any = client
        self.policy = policy
        self._fail = f"{prefix}:authfail"
        self._pending = f"{prefix}:authpending"
        self._trust = f"{prefix}:authtrust"
        self._reserve = self.client.register_script(_RESERVE)

    def _keys(self, ip: str, username: str) -> tuple[str, str]:
        return f"{self._fail}:ip:{_digest(ip)}", f"{self._fail}:user:{_digest(username)}"

    def _pending_keys(self, ip: str, username: str) -> tuple[str, str]:
        return f"{self._pending}:ip:{_digest(ip)}", f"{self._pending}:user:{_digest(username)}"

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

    def reserve(self, ip: str, username: str, now: float) -> tuple[str, Counts, str]:
        """Blocking: take a place for an attempt whose password is about to be checked.
        (verdict, counts, reservation): verdict 'ok' (the reservation is taken: settle
        it with failed, succeeded or release), 'wait' (attempts being checked may still
        lock the client: ask again shortly) or 'locked'."""
        member = f"{now!r}:{secrets.token_hex(4)}"
        keys = [*self._keys(ip, username), *self._pending_keys(ip, username)]
        keys.append(self._trust_key(ip, username))
        args = (now, self.policy.window, self.policy.max_failures, member, PENDING_LIFETIME)
        with mapped_errors():
            verdict, ip_failures, user_failures, trusted = self._reserve(keys=keys, args=args)
        verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        return verdict, Counts(int(ip_failures), int(user_failures), bool(trusted)), member

    def release(self, ip: str, username: str, reservation: str) -> None:
        """Blocking: the attempt was not decided (the check itself failed): forget it."""
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            for key in self._pending_keys(ip, username):
                pipe.zrem(key, reservation)
            pipe.execute()

    def failed(self, ip: str, username: str, now: float, reservation: str = "") -> Counts:
        """Blocking: count a failure (the reserved attempt's, when given); the counts it
        leaves (what `counts` would read)."""
        window = self.policy.window
        member = reservation or f"{now!r}:{secrets.token_hex(4)}"
        with mapped_errors():
            pipe = self.client.pipeline(transaction=True)
            for key in self._pending_keys(ip, username):
                pipe.zrem(key, member)
            for key in self._keys(ip, username):
                pipe.zadd(key, {member: now})
                pipe.zremrangebyscore(key, "-inf", now - window)
                pipe.zcard(key)
                pipe.expire(key, math.ceil(window))
            pipe.exists(self._trust_key(ip, username))
            replies = pipe.execute()[2:]
        return Counts(int(replies[2]), int(replies[6]), bool(replies[8]))

    def delay(self, counts: Counts) -> float:
        """How long to wait before answering the failure that left these counts."""
        return self.policy.delay_for(max(counts.ip_failures, counts.user_failures))

    def succeeded(self, ip: str, username: str, reservation: str = "") -> None:
        """Blocking: a good login forgets the username's failures (not the address's)
        and trusts the address for the username."""
        with mapped_errors():
            pipe = self.client.pipeline(transaction=False)
            if reservation:
                for key in self._pending_keys(ip, username):
                    pipe.zrem(key, reservation)
            pipe.delete(self._keys(ip, username)[1])
            pipe.set(self._trust_key(ip, username), "1", ex=math.ceil(self.policy.trust_period))
            pipe.execute()
