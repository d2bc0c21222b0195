"""The package's layout holds: `ls smtpproxy/` is the table of contents, every package
says what it owns, and the CLI parses, calls and prints without running SQL."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smtpproxy"
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))
CLI = sorted((PACKAGE / "cli").glob("*.py"))


def test_the_top_level_is_packages_and_a_few_shared_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "errors.py", "ids.py", "models.py"]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_package_says_what_it_owns(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc, f"{package.name}/__init__.py has no docstring"
    assert len(doc) >= 60, f"{package.name}/__init__.py: say what it owns and must not do"


@pytest.mark.parametrize("module", CLI, ids=lambda p: p.name)
def test_no_cli_module_runs_sql(module: Path) -> None:
    nodes = list(ast.walk(ast.parse(module.read_text())))
    imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith(("smtpproxy.db.queries", "psycopg.rows"))}
    calls = [
        n.func.attr for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    assert "execute" not in calls and "cursor" not in calls
