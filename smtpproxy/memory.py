"""Keep large short-lived allocations out of the long-lived heap.

Every password check runs scrypt, whose work area is 16 MiB. glibc serves blocks that
big with mmap and unmaps them on free, but it also raises its mmap threshold each time
such a block is freed (up to 32 MiB): from then on the work areas come from the
worker threads' heaps and stay resident after the check. With a burst of new logins
that cost 65 MB of resident memory for nothing (just bench --idle 1000: 190 MB with the
moving threshold, 125 MB with it pinned). Setting the threshold explicitly turns the
adjustment off. Other C libraries need nothing, and get nothing.
"""

from __future__ import annotations

import ctypes

from smtpproxy.libc import libc

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
