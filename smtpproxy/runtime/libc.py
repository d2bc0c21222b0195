"""The process's C library, for the calls Python's os module lacks (syncfs, mallopt).

dlopen(NULL) gives the symbols already loaded into the process, the C library's among
them, without find_library's search (which runs ldconfig in a subprocess). A function
the platform's C library lacks is simply absent: look it up with getattr.
"""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
