"""glibc's mmap threshold is pinned, so big freed blocks go back to the system; and after a
burst of sessions, freed memory is trimmed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from smtpproxy.runtime import heap

# allocate and free a scrypt-sized block a few times, as password checks do, and print
# how much resident memory that left behind
_PROBE = """
import sys
from smtpproxy.runtime import heap
pinned = sys.argv[1] == "pin" and heap.pin_mmap_threshold()

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


def test_trim_after_a_burst_not_during_it() -> None:
    """A trim is due once enough sessions ended and the live ones fell to half their
    peak; not while a burst is still open, and not again until more sessions end."""
    policy = heap.AfterBursts(min_ended=500)
    assert not policy.due(ended=0, live=2000)  # the burst is open
    assert not policy.due(ended=400, live=1600)  # too few ended yet
    assert not policy.due(ended=900, live=1100)  # still above half the peak
    assert policy.due(ended=1900, live=100)  # it is over
    assert not policy.due(ended=2000, live=0)  # nothing much since
    assert not policy.due(ended=2600, live=600)  # a new burst
    assert policy.due(ended=3000, live=200)


def test_trim_runs() -> None:
    assert heap.trim() in (True, False)
