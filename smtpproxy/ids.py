"""Message ids: 26 characters, time-ordered, unguessable.

The first 10 characters encode the milliseconds since the epoch and the last 16 are
random (80 bits), in Crockford's base32, so ids sort by acceptance time, fit a path
component, and can be read aloud to support staff without ambiguity.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_LEN = 26


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def new_message_id(now_ms: int | None = None) -> str:
    """Return a fresh message id for the given (or current) time."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    return _encode(ms, 10) + _encode(rand, 16)


def is_message_id(text: str) -> bool:
    """True when text has the shape of an id made by new_message_id."""
    return len(text) == _ID_LEN and all(c in _ALPHABET for c in text)


def id_timestamp_ms(message_id: str) -> int:
    """The acceptance time encoded in a message id, in ms since the epoch."""
    value = 0
    for c in message_id[:10]:
        value = value * 32 + _ALPHABET.index(c)
    return value
