"""A small tmpfs for full-disk and read-only-disk tests (root only; skipped elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TMPFS_SIZE = 256 * 1024


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@contextmanager
def small_tmpfs(where: Path, size: int = TMPFS_SIZE) -> Iterator[Path]:
    """Mount a fresh tmpfs of `size` bytes at where/mnt; unmount afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (full / read-only disk tests)")
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs")
    mnt = where / "mnt"
    mnt.mkdir()
    done = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        done = run("umount", "-l", str(mnt))
        assert done.returncode == 0, f"umount {mnt}: {done.stderr}"


def remount_read_only(mnt: Path) -> None:
    done = run("mount", "-o", "remount,ro", str(mnt))
    assert done.returncode == 0, done.stderr
