"""What a consumer holds at once: messages in flight (Slots), and bodies in memory, in
bytes (ByteBudget).

delivery.concurrency bounds the messages in flight; with big messages that alone could
hold gigabytes (512 messages of 25 MB). A ByteBudget makes a consumer wait before
reading more bodies once the ones it holds add up to its budget. A message bigger
than the whole budget still goes, alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import trio

BODY_BUDGET = 256 * 1024 * 1024  # bytes of bodies a consumer holds at once
READ_CHUNK = 8 * 1024 * 1024  # bytes of bodies read in one call to the store


class Sized(Protocol):
    @property
    def size(self) -> int: ...


S = TypeVar("S", bound=Sized)


class Slots:
    """delivery.concurrency slots, one per message in flight; a reader can wait a moment
    for several to come free, so that it fetches a batch rather than one at a time."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._semaphore = trio.Semaphore(total)
        self._freed = trio.Event()

    @property
    def free(self) -> int:
        return self._semaphore.value

    async def acquire(self) -> None:
        await self._semaphore.acquire()

    def release(self) -> None:
        self._semaphore.release()
        self._freed.set()
        self._freed = trio.Event()

    async def gather(self, wanted: int, patience: float) -> None:
        """Wait until `wanted` slots are free, or patience seconds have passed."""
        with trio.move_on_after(patience):
            while self.free < wanted:
                await self._freed.wait()


class ByteBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = trio.Event()

    async def acquire(self, amount: int) -> None:
        """Wait until amount fits (or nothing else is held)."""
        while self.used and self.used + amount > self.total:
            await self._freed.wait()
        self.used += amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._freed.set()
        self._freed = trio.Event()


def by_bytes(items: Sequence[S], limit: int) -> Iterator[list[S]]:
    """items in order, in runs whose sizes add up to at most limit (at least one each)."""
    run: list[S] = []
    total = 0
    for item in items:
        if run and total + item.size > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += item.size
    if run:
        yield run
