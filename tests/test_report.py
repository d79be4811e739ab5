"""Every marked results table in README.md is what `python benchmarks/report.py` makes from the
measured results (benchmarks/results/*.json): a table typed or edited by hand, or results
re-measured without rewriting the README, fail here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_the_results() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_check_names_a_changed_table() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| full precision (float32) | 19.262 |", "| full precision (float32) | 19.000 |", 1)
    assert edited != readme
    _, changed = report.rewrite(edited)
    assert changed and changed[0] in report.TABLES
