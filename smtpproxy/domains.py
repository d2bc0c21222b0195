"""Domain names and domain globs, shared by sender checks and routing rules.

A glob is a domain in which `*` stands for one or more labels' worth of characters and
`?` for one character: `*.example.com` matches `mail.example.com` and `a.b.example.com`
but not `example.com`; `*` alone matches every domain. Matching ignores case and a
trailing dot.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

_GLOB = re.compile(r"^(\*|(\*\.)?([a-z0-9?*_-]+\.)*[a-z0-9?*_-]+)$")


class GlobError(ValueError):
    pass


def normalize(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def validate_glob(pattern: str) -> str:
    """The normalised glob, or GlobError saying what is wrong with it."""
    norm = normalize(pattern)
    if not norm or not _GLOB.match(norm) or ".." in norm or "**" in norm:
        raise GlobError(
            f"bad domain pattern {pattern!r}: use a domain like example.com, "
            "a wildcard like *.example.com, or * for any domain"
        )
    return norm


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def domain_matches(pattern: str, domain: str) -> bool:
    return _compiled(normalize(pattern)).match(normalize(domain)) is not None


def domain_of(address: str) -> str:
    """The domain part of an address ('' for the null sender or a bare local part)."""
    _, at, domain = address.rpartition("@")
    return normalize(domain) if at else ""


def any_matches(patterns: tuple[str, ...] | list[str], domain: str) -> bool:
    return any(domain_matches(p, domain) for p in patterns)
