"""Every relative link in the README and the other documents leads somewhere: the file exists and,
where the link names a heading (``FILE.md#anchor``), the heading does (GitHub's anchor rule:
lower case, punctuation dropped, spaces as hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+ (.+)$", re.MULTILINE)


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(m.group(1)) for m in HEADING.finditer(path.read_text())}


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "CHANGELOG.md",
            *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]


def test_every_relative_link_resolves() -> None:
    broken, checked = [], 0
    for doc in documents():
        if not doc.is_file():
            continue
        for m in LINK.finditer(doc.read_text()):
            link = m.group(1)
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            checked += 1
            path, _, fragment = link.partition("#")
            target = doc.parent / path if path else doc
            if not target.exists():
                broken.append(f"{doc.name}: {link} (no such file)")
            elif fragment and target.suffix == ".md" and fragment not in anchors(target):
                broken.append(f"{doc.name}: {link} (no such heading)")
    assert checked >= 5  # the README links its sections and documents
    assert not broken, broken


def test_the_anchor_rule() -> None:
    assert anchor("NeUQI inside GPTQ, on two models") == "neuqi-inside-gptq-on-two-models"
    assert anchor("Against the tools a user would otherwise pick") == (
        "against-the-tools-a-user-would-otherwise-pick")
