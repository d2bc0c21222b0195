"""The thread bridge between the ingress asyncio loop and trio.

The asyncio side queues jobs and hands them to trio once per loop iteration
(TrioToken.run_sync_soon), however many sessions submitted one meanwhile; trio answers
whole batches with one loop.call_soon_threadsafe. docs/architecture.md measured this batched
crossing as what lets one process reach ~1,700 durable msgs/s.

Nothing here knows about SMTP: a job is a payload and an asyncio future.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio
from loguru import logger


class BridgeError(Exception):
    """A job submitted to trio did not produce a result."""


class BridgeClosed(BridgeError):
    """trio is no longer running: the job cannot be done."""


class CallFailed(BridgeError):
    """The trio function raised; the error was logged on the trio side."""


@attrs.define
class Job:
    payload: Any
    future: asyncio.Future[Any]
    submitted: float = attrs.field(factory=time.monotonic)  # for deadlines on the trio side


class Portal:
    """asyncio side: submit a payload, await its result."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        token: trio.lowlevel.TrioToken,
        sink: Callable[[list[Job]], None],
    ) -> None:
        self._loop = loop
        self._token = token
        self._sink = sink
        self._pending: list[Job] = []

    def submit(self, payload: Any) -> asyncio.Future[Any]:
        """Called on the asyncio thread."""
        fut = self._loop.create_future()
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(Job(payload, fut))
        return fut

    def _flush(self) -> None:
        jobs, self._pending = self._pending, []
        try:
            self._token.run_sync_soon(self._sink, jobs)
        except trio.RunFinishedError:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(BridgeClosed())


def _set_results(pairs: Sequence[tuple[Job, Any, bool]]) -> None:
    for job, value, failed in pairs:
        if job.future.done():  # the session went away meanwhile
            continue
        if failed:
            job.future.set_exception(value)
        else:
            job.future.set_result(value)


def resolve(
    loop: asyncio.AbstractEventLoop, pairs: Sequence[tuple[Job, Any]], *, failed: bool = False
) -> None:
    """Called on the trio thread: deliver results to their asyncio futures in one hop."""
    if not pairs:
        return
    items = [(job, value, failed) for job, value in pairs]
    with contextlib.suppress(RuntimeError):  # the ingress loop closed: its sessions are gone
        loop.call_soon_threadsafe(_set_results, items)


def channel_sink(send: trio.MemorySendChannel[Job]) -> Callable[[list[Job]], None]:
    """A sink that puts each job into an unbounded trio memory channel (runs in trio)."""

    def sink(jobs: list[Job]) -> None:
        for job in jobs:
            try:
                send.send_nowait(job)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                job.future.get_loop().call_soon_threadsafe(_fail_closed, job)

    return sink


def call_sink(
    nursery: trio.Nursery, loop: asyncio.AbstractEventLoop
) -> Callable[[list[Job]], None]:
    """A sink that runs each job's payload, (async_fn, args), as a task in nursery."""

    def sink(jobs: list[Job]) -> None:
        for job in jobs:
            nursery.start_soon(_run_call, job, loop)

    return sink


async def _run_call(job: Job, loop: asyncio.AbstractEventLoop) -> None:
    fn, args = job.payload
    try:
        result = await fn(*args)
    except Exception:  # noqa: BLE001 - the asyncio session must get an answer
        logger.exception("call from ingress failed")
        resolve(loop, [(job, CallFailed())], failed=True)
    else:
        resolve(loop, [(job, result)])


def _fail_closed(job: Job) -> None:
    if not job.future.done():
        job.future.set_exception(BridgeClosed())
