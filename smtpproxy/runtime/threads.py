"""Running blocking library calls from trio.

psycopg (sync pool), redis-py (sync) and boto3 are called in worker threads, each
library behind its own CapacityLimiter (docs/architecture.md, "Blocking clients run in
threads"). A thread call that trio cancels keeps running to completion: callers must
tolerate the work happening anyway (the checker reconciles orphans).
"""

from __future__ import annotations

import contextlib
import threading
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

    async def until(
        self, deadline: float, on_late: Callable[[], None], fn: Callable[[*Ts], T], *args: *Ts
    ) -> T:
        """fn(*args) in a worker thread, awaited until `deadline` (trio's clock).

        Past the deadline DeadlinePassed is raised at once and the call is abandoned: if
        it had not started (no free thread yet) it never runs; if it is running, it
        runs on, and when it ends, whatever its result, `on_late()` is called on the
        trio thread to undo what it may have done."""
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        state = ["waiting"]  # -> running -> finished, or -> abandoned

        def work() -> T:
            with lock:
                if state[0] == "abandoned":
                    raise DeadlinePassed  # never started: nothing to undo
                state[0] = "running"
            try:
                return fn(*args)
            finally:
                with lock:
                    late = state[0] == "abandoned"
                    state[0] = "finished"
                if late:
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(on_late)

        with trio.move_on_at(deadline):
            return await trio.to_thread.run_sync(work, limiter=self.limiter, abandon_on_cancel=True)
        with lock:
            previous = state[0]
            if previous != "finished":
                state[0] = "abandoned"
        if previous == "finished":
            on_late()  # it ended in the very moment the deadline passed: undo it
        raise DeadlinePassed


class DeadlinePassed(Exception):
    """A call did not finish before its deadline (Offload.until)."""
