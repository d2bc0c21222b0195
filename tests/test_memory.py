"""glibc's mmap threshold is pinned, so big freed blocks go back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

# allocate and free a scrypt-sized block a few times, as password checks do, and print
# how much resident memory that left behind
_PROBE = """
import sys
from smtpproxy import memory
pinned = sys.argv[1] == "pin" and memory.pin_mmap_threshold()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

before = rss()
for _ in range(4):
    block = bytearray(16 << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    del block
print(int(pinned), rss() - before)
"""


def probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    return out[0] == "1", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc behaviour")
def test_pinned_threshold_returns_freed_blocks() -> None:
    pinned, left = probe("pin")
    if not pinned:
        pytest.skip("not glibc")
    assert left < 4 << 20  # the 16 MiB blocks were unmapped, not kept in the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc behaviour")
def test_without_pinning_glibc_keeps_them() -> None:
    """The reason for the pin: glibc's moving threshold keeps freed 16 MiB blocks."""
    if not probe("pin")[0]:
        pytest.skip("not glibc")
    _, left = probe("free")
    assert left >= 8 << 20
