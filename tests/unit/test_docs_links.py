"""The docs' relative links lead somewhere, and nothing in the repository points outside it.

Every relative Markdown link in README.md, CONTRIBUTING.md, CHANGELOG.md and docs/*.md must name a
file of the repository and, when it has a ``#fragment`` into a Markdown file, one of that file's
headings (GitHub's anchors). No tracked text file may point into the ``shared`` folder beside the
checkout: a clone does not have it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
)
OUTSIDE = "../" + "shared"  # spelled apart so that this file does not match itself

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """The relative link targets of a Markdown file (no scheme), outside code."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = match.group(1)
            if not _SCHEME.match(target):
                links.append((number, target))
    return links


def broken_links(path: Path) -> list[str]:
    """Every relative link of ``path`` whose file or heading does not exist, as 'file:line: target'."""
    problems = []
    for number, target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no such file")
        elif not linked.is_relative_to(ROOT):
            problems.append(f"{where}: outside the repository")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{where}: no heading with that anchor in {linked.relative_to(ROOT)}")
    return problems


def tracked_text_files() -> list[Path]:
    """The repository's tracked files (git), else every file outside .git and .venv."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", ".demo", "node_modules"}
        paths = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    texts = []
    for path in paths:
        if not path.is_file():  # listed but deleted in the working tree
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        texts.append(path)
    return texts


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    assert broken_links(doc) == []


def test_nothing_points_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if OUTSIDE in line
    ]
    assert offenders == [], f"these lines refer to {OUTSIDE}, which a clone does not have"


def test_a_broken_link_and_a_missing_heading_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    page = "# A page\n\n## The `x` setting: why?\n\n```\n# not a heading\n```\n"
    (tmp_path / "docs" / "a.md").write_text(page)
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/a.md#the-x-setting-why) [ok too](docs/a.md) [self](#top) [web](https://example.com/x#y)\n"
        "[gone](docs/b.md) [no heading](docs/a.md#not-a-heading) `[in code](nowhere.md)`\n\n# Top\n"
    )
    assert broken_links(doc) == [
        "README.md:2: docs/b.md: no such file",
        "README.md:2: docs/a.md#not-a-heading: no heading with that anchor in docs/a.md",
    ]


def test_slug_matches_githubs_anchors():
    assert slug("… retry failed deliveries?") == "-retry-failed-deliveries"
    assert slug("The ledger: `cdr_webhook.delivery`") == "the-ledger-cdr_webhookdelivery"
    assert slug("Chunk mode: many CDRs per task") == "chunk-mode-many-cdrs-per-task"
    assert slug("The Deliveries page's queries at 1,000,000 ledger rows") == (
        "the-deliveries-pages-queries-at-1000000-ledger-rows"
    )
