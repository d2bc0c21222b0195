"""Keep large short-lived allocations out of the long-lived heap, and give memory freed
after a burst of sessions back to the system.

Every password check runs scrypt, whose work area is 16 MiB. glibc serves blocks that
big with mmap and unmaps them on free, but it also raises its mmap threshold each time
such a block is freed (up to 32 MiB): from then on the work areas come from the
worker threads' heaps and stay resident after the check. With a burst of new logins
that cost 65 MB of resident memory for nothing (just bench --idle 1000: 190 MB with the
moving threshold, 125 MB with it pinned). Setting the threshold explicitly turns the
adjustment off. Other C libraries need nothing, and get nothing.

A burst of TLS sessions leaves their freed memory scattered over glibc's arenas, where
it stays resident (2,000 STARTTLS sessions: 180 MB after they closed, 126 MB after
malloc_trim, which took 6 ms). AfterBursts says when a trim is worth it.
"""

from __future__ import annotations

import ctypes

import attrs

from smtpproxy.runtime.libc import libc

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; True when it was set (False off glibc)."""
    mallopt = getattr(libc, "mallopt", None)  # musl and others have none
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def trim() -> bool:
    """Blocking: return freed heap memory to the system (glibc's malloc_trim); True when
    something was released, False off glibc."""
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


@attrs.define
class AfterBursts:
    """When to trim: at least `min_ended` sessions ended since the last trim, and the
    live sessions have fallen to half their peak since then (the burst is over)."""

    min_ended: int = 500
    _ended_at: int = 0
    _peak: int = 0

    def due(self, ended: int, live: int) -> bool:
        self._peak = max(self._peak, live)
        if ended - self._ended_at < self.min_ended or live > self._peak // 2:
            return False
        self._ended_at, self._peak = ended, live
        return True
