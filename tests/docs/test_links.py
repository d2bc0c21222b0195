"""Every relative link in README.md and docs/ resolves: the file exists inside the
repository, and an anchor names a heading of that page (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.docs.markdown import ROOT, anchors, links, pages, slug

# written on another branch at the same time; linked from the map before it lands

_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _problems(page: Path, text: str) -> list[str]:
    where = page.relative_to(ROOT)
    found = []
    for number, target in links(text):
        if not target or _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        try:
            rel = dest.relative_to(ROOT)
        except ValueError:
            found.append(f"{where}:{number}: {target} points outside the repository")
            continue
        if dest != page and not dest.exists():
            found.append(f"{where}:{number}: {target}: no such file {rel}")
            continue
        dest_text = text if dest == page else dest.read_text()
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest_text):
            found.append(f"{where}:{number}: {target}: {rel} has no heading #{anchor}")
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page: Path) -> None:
    assert _problems(page, page.read_text()) == []


def test_every_page_is_on_the_map() -> None:
    """Every page under docs/ is reachable from docs/index.md or the README."""
    linked: set[Path] = set()
    for start in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        for _, target in links(start.read_text()):
            path_part = target.partition("#")[0]
            if path_part and not _EXTERNAL.match(path_part):
                linked.add((start.parent / path_part).resolve())
    unlinked = [
        p.relative_to(ROOT).as_posix()
        for p in pages()[1:]
        if p.resolve() not in linked and p.name != "index.md"
    ]
    assert unlinked == []


def test_no_page_points_outside_the_repository() -> None:
    """No page names a path above the repository, linked or not (../shared/...)."""
    outside = []
    for page in pages():
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for m in re.finditer(r"(?<![\w/.])((?:\.\./)+)[\w.-]", line):
                depth = m.group(1).count("../")
                if len(page.parent.relative_to(ROOT).parts) < depth:
                    outside.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert outside == []


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        (
            "`msgraph`: Microsoft 365 through Microsoft Graph",
            "msgraph-microsoft-365-through-microsoft-graph",
        ),
        ("Checking storage: `smtpproxy fsck-storage`", "checking-storage-smtpproxy-fsck-storage"),
        ("send-test, health and configuration", "send-test-health-and-configuration"),
        ("1. Register an application", "1-register-an-application"),
        ("Operating it: the CLI", "operating-it-the-cli"),
        ("`smtp.max_line_length` and [links](x.md)", "smtpmax_line_length-and-links"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_checker_finds_broken_links() -> None:
    """The checker itself: a missing file, a missing anchor, a path outside, and links
    inside code left alone."""
    page = ROOT / "docs" / "probe.md"
    text = (
        "# Title\n\n[a](nope.md) [b](#title) [c](#missing) [d](../../x.md)\n"
        "[e](index.md#no-such-heading) `[f](gone.md)`\n```\n[g](gone.md)\n```\n"
    )
    assert _problems(page, text) == [
        "docs/probe.md:3: nope.md: no such file docs/nope.md",
        "docs/probe.md:3: #missing: docs/probe.md has no heading #missing",
        "docs/probe.md:3: ../../x.md points outside the repository",
        "docs/probe.md:4: index.md#no-such-heading: docs/index.md has no heading #no-such-heading",
    ]
