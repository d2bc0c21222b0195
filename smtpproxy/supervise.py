"""The one supervisor: restart a crashed background service with backoff, and say why.

This is the only place that catches every Exception: a consumer, the scheduler or the
checker crashing must not take SMTP ingress down. Ingress itself is not supervised; if
it fails the process stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from loguru import logger

HEALTHY_AFTER = 60.0  # a run this long resets the backoff


async def supervise(
    name: str,
    service: Callable[[], Awaitable[object]],
    *,
    max_backoff: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    backoff = 1.0
    while True:
        started = trio.current_time()
        try:
            await service()
        except Exception:  # noqa: BLE001 - the supervisor's job is to survive this
            logger.bind(service=name).exception("{} crashed; restarting in {:.0f} s", name, backoff)
        else:
            logger.bind(service=name).warning("{} stopped; restarting in {:.0f} s", name, backoff)
        if trio.current_time() - started > HEALTHY_AFTER:
            backoff = 1.0
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
