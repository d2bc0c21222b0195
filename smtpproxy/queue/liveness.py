"""Which delivery consumers are alive, kept in Redis by their own heartbeats.

A message in `sending` whose consumer is alive is being delivered or its outcome is
being recorded, however long that takes (a PostgreSQL outage can hold the record up for
minutes): nobody else may claim it and send it again. Only a claim whose consumer has
stopped beating is taken over. Redis is the right judge because it is independent of
PostgreSQL: during a database outage the owner keeps beating here while it retries.

The registry is one sorted set, `<prefix>:consumers`: member = consumer name, score =
when its last heartbeat expires (Redis server time, so hosts' clocks do not matter).
`<prefix>:consumers:since` records when the set was (re)created: if Redis restarted
empty or someone deleted the set, live consumers have not all beaten again yet, and
until one heartbeat lifetime has passed the list is treated as incomplete.

Timing (delivery.heartbeat_interval, 2 s, and heartbeat_lifetime, 10 s) is its own,
not the visibility timeout's: after a crash the dead consumer's work is taken over
about one lifetime later. A consumer beats once before it reads anything, so holding
work always implies being in the registry, and a lifetime of at least three intervals
keeps a list that is one interval old from missing a consumer that holds work.
"""

from __future__ import annotations

from typing import Any

import attrs
import redis

from smtpproxy.queue.streams import mapped_errors


@attrs.frozen
class LiveConsumers:
    names: frozenset[str] = frozenset()
    complete: bool = False  # False: someone alive may be missing from names

    def others(self, me: str) -> list[str]:
        return sorted(self.names - {me})


class ConsumerRegistry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client: Any = client
        self.key = f"{prefix}:consumers"
        self.since_key = f"{prefix}:consumers:since"

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1e6

    def beat(self, name: str, lifetime: float) -> LiveConsumers:
        """Blocking: say `name` is alive for `lifetime` seconds; returns who is alive."""
        with mapped_errors():
            now = self._now()
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.since_key, repr(now), nx=True)
            pipe.zadd(self.key, {name: now + lifetime})
            pipe.zremrangebyscore(self.key, "-inf", f"({now}")
            pipe.zrangebyscore(self.key, now, "+inf")
            pipe.get(self.since_key)
            *_, members, since = pipe.execute()
        names = frozenset(m.decode() if isinstance(m, bytes) else m for m in members)
        return LiveConsumers(names, complete=now - float(since) >= lifetime)

    def leave(self, name: str) -> None:
        """Blocking: `name` has stopped; its claims may be taken over."""
        with mapped_errors():
            self.client.zrem(self.key, name)
