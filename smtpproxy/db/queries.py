"""Named SQL statements, kept in .sql files beside this module.

Each file holds blocks that start with a ``-- name: <identifier>`` line; the text up to
the next such line is the statement. ``Q.<identifier>`` returns it. Keeping SQL in
.sql files lets it be read, reviewed and EXPLAINed as SQL.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a .sql file into {name: statement}."""
    out: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end() : end].strip()
        if m.group(1) in out:
            raise ValueError(f"query {m.group(1)!r} is defined twice")
        out[m.group(1)] = body
    return out


class _Queries:
    def __init__(self) -> None:
        self._stmts: dict[str, str] = {}
        for entry in resources.files("smtpproxy.db").joinpath("sql").iterdir():
            if entry.name.endswith(".sql"):
                for name, stmt in parse(entry.read_text("utf-8")).items():
                    if name in self._stmts:
                        raise ValueError(f"query {name!r} is defined in two files")
                    self._stmts[name] = stmt

    def __getattr__(self, name: str) -> LiteralString:
        try:
            # the text comes from our own package files, never from input
            return self._stmts[name]
        except KeyError:
            raise AttributeError(f"no SQL statement named {name!r}") from None


Q = _Queries()
