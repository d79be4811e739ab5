"""Rewrite the quality tables of README.md from the measured results, between their markers.

    python benchmarks/report.py            # rewrite every marked table
    python benchmarks/report.py --check    # exit 1 (naming the table) if one differs

Each table lies between ``<!-- NAME -->`` and ``<!-- /NAME -->`` and is made by
``benchmarks/quality.py``'s own table function from a results file (``quality.json``) for the
settings and methods listed in :data:`TABLES`, so that no figure in them is typed by hand.
``tests/test_report.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import table

RESULTS = ROOT / "benchmarks" / "results"
GPTQ_METHODS = ["minmax-lazy+gptq", "neuqi+gptq", "neuqi-lazy+gptq", "neuqi-lazy+gptq+refit",
                "neuqi-lazy+gptq+refit+distill", "neuqi"]
# marker -> (results file, settings, methods, trailing blank line inside the markers)
TABLES: dict[str, tuple[Path, list[str], list[str], bool]] = {
    "in-domain-table": (
        RESULTS / "in-domain" / "quality.json", ["w2g64", "w3g64", "w4g64", "w3c", "w4c"],
        ["minmax", "neuqi-int", "neuqi", "neuqi+gptq", "minmax+gptq", "neuqi+distill"], False),
    "gptq-smollm2-table": (
        RESULTS / "in-domain" / "quality.json", ["w2g64", "w3g64", "w2g192", "w3g192", "w4g192"],
        GPTQ_METHODS, False),
    "gptq-gemma3-table": (
        RESULTS / "gemma3-270m" / "quality.json", ["w2g128", "w3g128", "w4g128"],
        GPTQ_METHODS, False),
    "quality-table": (
        RESULTS / "quality.json", ["w2g64", "w3g64", "w4g64", "w3c", "w4c"],
        ["minmax", "neuqi-int", "neuqi", "minmax+gptq", "neuqi+gptq", "neuqi+distill",
         "neuqi+gptq+distill", "neuqi+e2e-distill"], True),
}


def render(name: str) -> str:
    path, settings, methods, blank = TABLES[name]
    text = table(json.loads(path.read_text()), settings, methods)
    return text + ("\n" if blank else "")


def rewrite(document: str) -> tuple[str, list[str]]:
    """``document`` with every marked table made anew, and the names of those that changed."""
    changed = []
    for name in TABLES:
        pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n)(.*?)(<!-- /{re.escape(name)} -->)",
                             re.DOTALL)
        match = pattern.search(document)
        if match is None:
            raise SystemExit(f"report: README.md has no <!-- {name} --> table")
        new = render(name)
        if match.group(2) != new:
            changed.append(name)
            document = document[:match.start(2)] + new + document[match.end(2):]
    return document, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its results")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    document, changed = rewrite(readme.read_text())
    if args.check:
        if changed:
            print(f"report: README.md tables differ from their results: {', '.join(changed)}; "
                  "run python benchmarks/report.py", file=sys.stderr)
            raise SystemExit(1)
        print(f"report: {len(TABLES)} tables match their results")
        return
    readme.write_text(document)
    print(f"report: rewrote {', '.join(changed) or 'nothing (all tables match)'}")


if __name__ == "__main__":
    main()
