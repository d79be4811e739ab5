"""Every results table in README.md and docs/ is what `python benchmarks/report.py` makes from the
measured results (benchmarks/results/): a table typed or edited by hand, a measured table outside
the report's markers, or results re-measured without rewriting the documents, fail here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import records
import report

# a cell holding a measured figure: a decimal number, or a number with a unit of time, size,
# speed or ratio
MEASURED = re.compile(r"\d\.\d|\b\d+ ?(?:s|ms|min|h|GiB|MiB|GB|MB|kB|x|%|M weights/s|Mw/s)\b")


def test_documents_tables_are_the_results() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_check_names_a_changed_table() -> None:
    quality = (ROOT / "docs" / "QUALITY.md").read_text()
    edited = quality.replace("| full precision (float32) | 19.262 |",
                             "| full precision (float32) | 19.000 |", 1)
    assert edited != quality
    _, changed = report.rewrite(edited)
    assert changed == ["in-domain-table"]


def _tables_outside_markers(text: str) -> list[str]:
    """The first line of every markdown table with a measured figure outside the markers."""
    inside = [(m.start(), m.end()) for m in report.MARKER.finditer(text)]
    found, offset = [], 0
    block: list[str] = []
    start = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("|"):
            if not block:
                start = offset
            block.append(line)
        else:
            if block and any(MEASURED.search(row) for row in block[2:]) and not any(
                    a <= start < b for a, b in inside):
                found.append(block[0].strip())
            block = []
        offset += len(line)
    if block and any(MEASURED.search(row) for row in block[2:]) and not any(
            a <= start < b for a, b in inside):
        found.append(block[0].strip())
    return found


@pytest.mark.parametrize("document", [p.relative_to(ROOT).as_posix() for p in report.documents()])
def test_no_measured_table_is_typed_by_hand(document: str) -> None:
    assert _tables_outside_markers((ROOT / document).read_text()) == []


def test_a_hand_typed_table_is_found() -> None:
    text = "Some prose.\n\n| bits | speed |\n|---|---|\n| 3 | 2.36 M weights/s |\n\nMore.\n"
    assert _tables_outside_markers(text) == ["| bits | speed |"]
    plain = "| option | what |\n|---|---|\n| `--bits` | 2, 3 or 4 |\n"
    assert _tables_outside_markers(plain) == []


def test_every_record_says_where_it_was_measured() -> None:
    for name in records.names():
        record = records.load(name)
        for key in ("title", "columns", "rows", "command", "date", "version", "commit", "machine"):
            assert record.get(key), f"{name}.json has no {key}"
        assert all(len(row) == len(record["columns"]) for row in record["rows"]), name


def test_every_record_is_shown() -> None:
    shown = "".join(p.read_text() for p in report.documents())
    assert [n for n in records.names() if f"<!-- table:{n} -->" not in shown] == []
