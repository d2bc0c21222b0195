"""The one supervisor: restart a crashed background service with backoff, and say why;
and the one backoff every waiting loop uses (`Backoff`).

This is the only place that catches every Exception: a consumer, the scheduler or the
checker crashing must not take SMTP ingress down. Ingress itself is not supervised; if
it fails the process stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from loguru import logger


class Backoff:
    """Waits that double from `first` up to `most`; `reset` after a healthy stretch."""

    def __init__(self, first: float = 1.0, most: float = 60.0) -> None:
        self.first, self.most = first, most
        self._next = first

    def next(self) -> float:
        """The wait before the next try (and double the one after it)."""
        wait, self._next = self._next, min(self._next * 2, self.most)
        return wait

    def reset(self) -> None:
        self._next = self.first

    def after_run(self, seconds: float) -> float:
        """The wait before restarting something that ran this long: from `first` again
        after a healthy run (HEALTHY_AFTER)."""
        if seconds > HEALTHY_AFTER:
            self.reset()
        return self.next()


HEALTHY_AFTER = 60.0  # a run this long resets the backoff


async def supervise(
    name: str,
    service: Callable[[], Awaitable[object]],
    *,
    max_backoff: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    backoff = Backoff(1.0, max_backoff)
    while True:
        started = trio.current_time()
        try:
            await service()
        except Exception:  # noqa: BLE001 - the supervisor's job is to survive this
            wait = backoff.after_run(trio.current_time() - started)
            logger.bind(service=name).exception("{} crashed; restarting in {:.0f} s", name, wait)
        else:
            wait = backoff.after_run(trio.current_time() - started)
            logger.bind(service=name).warning("{} stopped; restarting in {:.0f} s", name, wait)
        await trio.sleep(wait)
