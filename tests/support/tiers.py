"""Which tier a test belongs to, read from what it uses: its fixtures, and the helpers its
code (and its fixtures' code) names, followed through the test support modules.

    unit        no database, no Redis, no service, no process: pure code, files, sockets
                of its own on 127.0.0.1
    backend     real PostgreSQL and/or Redis (a fixture that needs pg_admin_url/redis_url)
    service     smtpproxy's serve() running in the test's trio run (tests.support.serving)
    subprocess  starts processes (the subprocess module, `smtpproxy run`, a private Redis)

Each test gets exactly one marker, the heaviest that applies, so `-m unit` is the set that
needs nothing but Python. Nothing is declared by hand: a new test lands in its tier by
using the fixtures and helpers it needs.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import types
from collections.abc import Iterable, Iterator
from typing import Any

TIERS = ("unit", "backend", "service", "subprocess")
BACKEND_FIXTURES = frozenset({"pg_admin_url", "redis_url"})
_RANK = {tier: rank for rank, tier in enumerate(TIERS)}


def heaviest(tiers: Iterable[str]) -> str:
    return max(tiers, key=_RANK.__getitem__, default="unit")


def _sentinels() -> dict[int, str]:
    from tests.support import faults, process, serving

    return {
        id(subprocess): "subprocess",
        id(subprocess.Popen): "subprocess",
        id(subprocess.run): "subprocess",
        id(process): "subprocess",
        id(process.SmtpProxyProcess): "subprocess",
        id(faults.RedisProcess): "subprocess",
        id(serving): "service",
        id(serving.start): "service",
    }


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """code and every function, lambda and comprehension nested in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _ours(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("tests")


class Classifier:
    """Remembers what each function it has read uses (the support modules are shared)."""

    def __init__(self) -> None:
        self._sentinels = _sentinels()
        self._seen: dict[int, str] = {}

    def of_object(self, obj: Any) -> str:
        if id(obj) in self._sentinels:
            return self._sentinels[id(obj)]
        if isinstance(obj, functools.partial):
            return self.of_object(obj.func)
        if inspect.isclass(obj) and _ours(obj):
            return heaviest(self.of_object(v) for v in vars(obj).values() if callable(v))
        if isinstance(obj, staticmethod | classmethod):
            return self.of_object(obj.__func__)
        if inspect.isfunction(obj) and _ours(obj):
            return self.of_function(obj)
        return "unit"

    def of_function(self, func: types.FunctionType) -> str:
        func = inspect.unwrap(func)
        key = id(func.__code__)
        if key in self._seen:
            return self._seen[key]
        self._seen[key] = "unit"  # recursion guard
        names = {name for code in _codes(func.__code__) for name in code.co_names}
        found: list[Any] = [func.__globals__[n] for n in names if n in func.__globals__]
        modules = [m for m in found if isinstance(m, types.ModuleType) and _module_ours(m)]
        found += [getattr(m, n) for m in modules for n in names if hasattr(m, n)]
        tier = heaviest(self.of_object(obj) for obj in found)
        self._seen[key] = tier
        return tier

    def of_test(self, fixturenames: Iterable[str], functions: Iterable[Any]) -> str:
        """The tier of a test using these fixtures (all, transitively), whose own function
        and fixture functions are given."""
        tiers = ["backend" if BACKEND_FIXTURES & set(fixturenames) else "unit"]
        tiers += [self.of_object(f) for f in functions]
        return heaviest(tiers)


def _module_ours(module: types.ModuleType) -> bool:
    return module.__name__.startswith("tests")
