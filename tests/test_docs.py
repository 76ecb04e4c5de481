"""The README and the pages under docs/ link to files that exist: a section moved or renamed
leaves no dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

from velo.core.models import ROOT

LINK = re.compile(r"\[[^\]]+\]\(([^)\s#]+)(?:#[^)]*)?\)")


def dead_links(page: Path) -> list[str]:
    text = re.sub(r"(?s)```.*?```", "", page.read_text())  # code blocks hold no links
    return [target for target in LINK.findall(text)
            if not re.match(r"^[a-z]+:", target) and not (page.parent / target).exists()]


def test_every_relative_link_in_the_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 10
    dead = {str(p.relative_to(ROOT)): links for p in pages if (links := dead_links(p))}
    assert dead == {}


def test_a_dead_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[ok](there.md) [web](https://example.org) [gone](docs/gone.md#part)\n"
                    "```\n[in code](not/checked.md)\n```\n")
    assert dead_links(page) == ["docs/gone.md"]
