"""The context-manager protocol of the local servers tests start (fakehttp, aws,
fake_smtp, faults)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class StartStop(ABC):
    """`with X() as x:` is x = X().start() ... x.stop()."""

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Closing(StartStop):
    """For servers that start in __init__: `with X() as x:` closes x on the way out."""

    @abstractmethod
    def close(self) -> None: ...

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        self.close()
