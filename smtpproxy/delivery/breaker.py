"""Keeping one failing provider from taking everything down: a circuit breaker and an
adaptive concurrency limit per provider.

* Breaker (pure): after `threshold` consecutive transient failures the circuit opens and
  no call is made for `cooldown` seconds; then one probe is let through (half-open); its
  success closes the circuit, its failure opens it again.
* Throttle: at most `limit` calls in flight. A transient failure (429, 5xx, timeout)
  halves the limit, each success adds 1/limit (AIMD, as TCP does), so a provider that
  pushes back gets fewer concurrent calls and recovers gradually. Waiting for a slot is
  bounded: a delivery that cannot get one soon is put back in the queue, so a slow
  provider cannot hold every consumer slot and stall other providers' mail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import trio


@attrs.define
class Breaker:
    threshold: int = 5
    cooldown: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing else "open"

    def allow(self, now: float) -> bool:
        """May a call go to this provider now? (Lets exactly one probe through.)"""
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.cooldown or self.probing:
            return False
        self.probing = True
        return True

    def retry_in(self, now: float) -> float:
        """Seconds until a probe may go (0 when closed)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (now - self.opened_at))

    def record(self, ok: bool, now: float) -> None:
        """ok: the provider answered (delivered or a permanent refusal); else a transient
        failure."""
        self.probing = False
        if ok:
            self.failures = 0
            self.opened_at = None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now


def next_limit(limit: float, ok: bool, ceiling: int) -> float:
    """AIMD: a transient failure halves the limit (not below 1), a success adds 1/limit."""
    if ok:
        return min(float(ceiling), limit + 1.0 / limit)
    return max(1.0, limit / 2.0)


class Throttle:
    def __init__(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(self.ceiling)
        self.in_use = 0
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most timeout seconds; False if none came free."""
        with trio.move_on_after(timeout):
            while self.in_use >= math.floor(self.limit):
                await self._changed.wait()
            self.in_use += 1
            return True
        return False

    def release(self, ok: bool | None) -> None:
        """Give the slot back; ok says how the call went (None: no call was made)."""
        self.in_use -= 1
        if ok is not None:
            self.limit = next_limit(self.limit, ok, self.ceiling)
        self._wake()


@attrs.define
class ProviderHealth:
    """The breaker and throttle of every provider, by (tenant id, provider name)."""

    threshold: int = 5
    cooldown: float = 30.0
    clock: Callable[[], float] = trio.current_time
    _breakers: dict[tuple[int | None, str], Breaker] = attrs.Factory(dict)
    _throttles: dict[tuple[int | None, str], Throttle] = attrs.Factory(dict)

    def breaker(self, key: tuple[int | None, str]) -> Breaker:
        if key not in self._breakers:
            self._breakers[key] = Breaker(self.threshold, self.cooldown)
        return self._breakers[key]

    def throttle(self, key: tuple[int | None, str], ceiling: int) -> Throttle:
        current = self._throttles.get(key)
        if current is None or current.ceiling != max(1, ceiling):
            current = self._throttles[key] = Throttle(ceiling)
        return current

    def snapshot(self) -> dict[str, dict[str, object]]:
        """State per provider (tenant id/name), for /metrics."""
        out: dict[str, dict[str, object]] = {}
        for (tenant, name), b in self._breakers.items():
            t = self._throttles.get((tenant, name))
            out[f"{tenant}/{name}"] = {
                "circuit": b.state,
                "failures": b.failures,
                "limit": round(t.limit, 2) if t else None,
                "in_flight": t.in_use if t else 0,
            }
        return out
