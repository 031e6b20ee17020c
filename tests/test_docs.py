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
