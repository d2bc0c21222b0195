"""Running blocking library calls from trio.

psycopg (sync pool), redis-py (sync) and boto3 are called in worker threads, each
library behind its own CapacityLimiter (ARCHITECTURE.md, "Blocking clients run in
threads"). A thread call that trio cancels keeps running to completion: callers must
tolerate the work happening anyway (the checker reconciles orphans).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class Offload:
    """A named pool of worker-thread slots for one blocking library."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limiter = trio.CapacityLimiter(limit)

    async def __call__(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
