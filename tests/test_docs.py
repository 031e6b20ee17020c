"""The README stays a front door (at most 160 lines) and no page links to a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_every_relative_link_in_it_and_the_docs_resolves():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in pages
              for target in LINK.findall(page.read_text())
              if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists()]
    assert broken == []
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - linked <= {"docs/suite-times.md"}


TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_every_test_the_docs_cite_exists():
    """A page that cites `tests/file.py::test_name` as evidence names a test that is there (renamed tests left
    stale citations behind before)."""
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]
    missing = [f"{page.name}: {path}::{name}" for page in pages for path, name in TEST_REF.findall(page.read_text())
               if not (ROOT / path).is_file() or not re.search(rf"def {name}\(", (ROOT / path).read_text())]
    assert missing == []
