"""mkdocs hooks: the site's pages are assembled from the README, ARCHITECTURE.md and the
pydantic models, so that the documentation has one source and cannot drift.

- ``<!-- readme: Section title -->``: that ``## Section title`` of README.md (without its
  heading; its ``###`` headings become ``##``);
- ``<!-- file: ARCHITECTURE.md -->``: a whole file of the repository, headings one level down;
- ``<!-- scenario-reference -->``: every scenario setting (:mod:`moesim.config.reference`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- (readme|file): (.+?) -->|<!-- scenario-reference -->")


def readme_section(title: str) -> str:
    """The body of README.md's ``## title`` section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no section '## {title}'")
    return re.sub(r"^###", "##", match.group(1), flags=re.M)


def whole_file(name: str) -> str:
    """A repository file with every heading one level down (its title becomes an ``##``)."""
    text = (ROOT / name).read_text(encoding="utf-8")
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)


def on_page_markdown(markdown: str, **_: Any) -> str:
    def expand(m: re.Match[str]) -> str:
        if m.group(1) == "readme":
            return readme_section(m.group(2))
        if m.group(1) == "file":
            return whole_file(m.group(2))
        from moesim.config.reference import reference_markdown

        return reference_markdown()

    return MARK.sub(expand, markdown)
