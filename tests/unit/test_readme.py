"""The README stays a short front door, and every relative link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 220
# .ci/run runs exactly this command as "the README's test command".
TEST_COMMAND = "python -m pytest"
# These pages are written on parallel branches (extending, sources, settings) and arrive when they are
# merged; until then a link to one of them is allowed to dangle. Remove this allowance at the merge.
PAGES_FROM_PARALLEL_BRANCHES: frozenset[str] = frozenset()  # every linked page exists

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed (neither holds links)."""
    lines, in_code = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#{1,6}\s+(.*)$", line)):
            anchor, n = heading_anchor(match.group(1)), 0
            while (anchor if n == 0 else f"{anchor}-{n}") in found:
                n += 1
            found.add(anchor if n == 0 else f"{anchor}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    """Every link and image target of the page that is not a web address or an e-mail."""
    targets = [target for line in prose_lines(page) for target in LINK.findall(line)]
    return [t for t in targets if not re.match(r"^(https?:|mailto:)", t)]


def broken_links(page: Path, root: Path = REPO,
                 may_dangle: frozenset[str] | set[str] = PAGES_FROM_PARALLEL_BRANCHES) -> list[str]:
    """The page's relative links whose file (or heading anchor) does not exist, as ``target (why)``.

    ``may_dangle``: files (relative to ``root``) that a link may name before they exist."""
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page.resolve()
        name = file.relative_to(root.resolve()).as_posix()
        if not file.exists():
            if name not in may_dangle:
                broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    return broken


def test_the_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details into docs/"


def test_the_readme_gives_the_command_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci, ".ci/run no longer runs the README's test command"
    assert TEST_COMMAND in README.read_text(encoding="utf-8")


def test_the_readme_links_into_docs():
    linked = {target.partition("#")[0] for target in relative_links(README)}
    pages = {f"docs/{page.name}" for page in PAGES if page != README}
    assert pages <= linked, f"README.md does not link to {sorted(pages - linked)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_check_finds_missing_files_and_headings(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# The `other` page\n\n## Step two: go\n", encoding="utf-8")
    page.write_text("# Title\n\nSee [gone](missing.md), [soon](arriving.md), [ok](other.md#step-two-go), "
                    "[top](#title), [bad](other.md#nowhere), [web](https://example.org/x.md).\n\n"
                    "```\n# not a heading\n[code](not-a-link.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["missing.md", "arriving.md", "other.md#step-two-go", "#title",
                                    "other.md#nowhere"]
    assert anchors(tmp_path / "other.md") == {"the-other-page", "step-two-go"}
    assert broken_links(page, root=tmp_path, may_dangle={"arriving.md"}) == [
        "missing.md (no such file)", "other.md#nowhere (no heading #nowhere in other.md)"]
