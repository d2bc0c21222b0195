"""The generated reference pages match the code, and the hand-written provider pages
cover every setting their type declares."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from smtpproxy.delivery.providers import TYPES
from smtpproxy.delivery.providers.base import COMMON_SETTINGS
from tests.docs.gen import PAGES, ROOT


@pytest.mark.parametrize("page", list(PAGES), ids=lambda p: p.name)
def test_reference_page_is_current(page: Path) -> None:
    """Regenerated in memory, the page is the committed one."""
    expected = PAGES[page]()
    actual = page.read_text() if page.exists() else ""
    if actual != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    actual.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    "committed",
                    "generated",
                )
            )[:40]
        )
        pytest.fail(
            f"{page.relative_to(ROOT)} is out of date with the code: run `just docs-gen`"
            f" and commit the result\n{diff}"
        )


@pytest.mark.parametrize("name", sorted(TYPES))
def test_provider_page_names_every_setting(name: str) -> None:
    """docs/providers/<type>.md exists and names each setting its type declares."""
    page = ROOT / "docs" / "providers" / f"{name}.md"
    assert page.exists(), f"provider type {name} has no page {page.relative_to(ROOT)}"
    text = page.read_text()
    missing = [
        key for key in TYPES[name].settings if key not in COMMON_SETTINGS and f"`{key}`" not in text
    ]
    assert missing == [], f"{page.relative_to(ROOT)} does not describe {missing}"


# smtpproxy at the start of a command: of the line, after a pipe or `uv run`
COMMAND = re.compile(r"(?:^\s*|[|;&]\s*|\$ |uv run )smtpproxy ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")


def _code(text: str) -> list[tuple[int, str]]:
    """(line number, code) for lines of code blocks and code spans elsewhere."""
    from tests.docs.markdown import prose_lines

    prose = dict(prose_lines(text))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if number not in prose:
            out.append((number, re.sub(r"(^|\s)#.*", "", line)))  # not shell comments
        else:
            out += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def test_docs_use_only_commands_that_exist() -> None:
    """Every `smtpproxy COMMAND [SUBCOMMAND]` the pages show is a command of the app."""
    import typer

    from tests.docs.gen import _app
    from tests.docs.markdown import pages

    root = typer.main.get_command(_app())
    ctx = root.make_context("smtpproxy", [], resilient_parsing=True)
    unknown = []
    for page in pages():
        for number, line in _code(page.read_text()):
            for m in re.finditer(COMMAND, line):
                command = root.get_command(ctx, m.group(1))
                if command is None:
                    unknown.append(f"{page.relative_to(ROOT)}:{number}: smtpproxy {m.group(1)}")
                elif hasattr(command, "list_commands") and m.group(2):
                    sub_ctx = type(ctx)(command, info_name=m.group(1), parent=ctx)
                    if command.get_command(sub_ctx, m.group(2)) is None:
                        unknown.append(f"{page.relative_to(ROOT)}:{number}: {m.group(0)}")
    assert unknown == []
