"""The process's C library, for the calls Python's os module lacks (syncfs, mallopt),
and the two ways files are made durable (syncfs of a file system, fsync of a directory).

dlopen(NULL) gives the symbols already loaded into the process, the C library's among
them, without find_library's search (which runs ldconfig in a subprocess). A function
the platform's C library lacks is simply absent: look it up with getattr.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)
HAS_SYNCFS = hasattr(libc, "syncfs")


def syncfs(directory: Path) -> None:
    """Make everything written to the file system holding directory durable (syncfs(2),
    Linux): one call for a whole batch of files instead of an fsync per file. OSError
    when it fails."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make the names in directory durable (created, renamed, removed entries)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
