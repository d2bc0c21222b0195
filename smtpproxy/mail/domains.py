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


_ALNUM = r"A-Za-z0-9\u0080-\U0010ffff"  # U-labels (SMTPUTF8) as well as ASCII
_LABEL = rf"[{_ALNUM}](?:[{_ALNUM}-]{{0,61}}[{_ALNUM}])?"
_FQDN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+\.?")
_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_UNQUOTED_LOCAL = re.compile(r'[^\s@"()<>\[\]\\,;:]+')


def is_qualified_mailbox(address: str) -> bool:
    """local@domain with a fully-qualified domain (or an address literal): what a
    provider can deliver to. UTF-8 is allowed (SMTPUTF8); whitespace outside a quoted
    local part and a dotless domain are not."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not (_FQDN.fullmatch(domain) or _LITERAL.fullmatch(domain)):
        return False
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        return not any(c in local for c in "\r\n")
    return _UNQUOTED_LOCAL.fullmatch(local) is not None


def any_matches(patterns: tuple[str, ...] | list[str], domain: str) -> bool:
    return any(domain_matches(p, domain) for p in patterns)
