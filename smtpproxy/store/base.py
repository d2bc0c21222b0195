"""The MessageStore protocol: where raw RFC 5322 bodies live, apart from the metadata.

Every method is blocking and safe to call from several worker threads at once; trio
code calls them through an Offload. Every backend raises BodyNotFound for a missing
key and StoreUnavailable when it cannot do its job right now (disk full, read-only,
S3 unreachable), so ingress can answer 451 without knowing which backend it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import attrs

from smtpproxy.errors import BodyNotFound, StoreUnavailable

StoreError = BodyNotFound | StoreUnavailable

QUARANTINE = "quarantine"  # top-level directory / key prefix that holds quarantined bodies


@attrs.frozen
class StoredObject:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def key_for(message_id: str) -> str:
    """The storage key of a message: fanned out by the id's random last two characters
    (32 x 32 = 1,024 directories or S3 key prefixes), so a million bodies make about a
    thousand files per directory."""
    tail = message_id[-2:].lower()
    return f"{tail[1]}/{tail[0]}/{message_id}.eml"


class MessageStore(Protocol):
    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store each (key, body); when this returns every body is durable."""

    def put(self, key: str, data: bytes) -> None:
        """Store one body durably."""

    def get(self, key: str) -> bytes:
        """The body under key; BodyNotFound when there is none."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        """The body under each key, in order, or the BodyNotFound or StoreUnavailable
        that reading it raised (one thread hop for a batch of deliveries)."""

    def delete(self, key: str) -> None:
        """Remove key; removing a missing key is not an error."""

    def exists(self, key: str) -> bool:
        """Whether a body is stored under key (cheaper than get)."""

    def quarantine(self, key: str) -> None:
        """Move key under quarantine/ (kept for an operator to inspect, no longer listed)."""

    def check(self) -> None:
        """Raise StoreUnavailable when the store cannot take writes now."""

    def iter_objects(self) -> Iterator[StoredObject]:
        """Every stored body (quarantined ones excluded), in no particular order, without
        loading them."""

    def describe(self) -> str:
        """Where the bodies are, for banners and `check-config`."""

    def close(self) -> None:
        """Release connections and threads."""


def get_each(get: Callable[[str], bytes], keys: Sequence[str]) -> list[bytes | StoreError]:
    """get() every key in turn, each failure kept as its exception."""
    out: list[bytes | StoreError] = []
    for key in keys:
        try:
            out.append(get(key))
        except (BodyNotFound, StoreUnavailable) as exc:
            out.append(exc)
    return out
