"""Rewrite every results table of README.md and docs/*.md from the measured results, between
their markers, so that no figure in the documents is typed by hand.

    python benchmarks/report.py            # rewrite every marked table
    python benchmarks/report.py --check    # exit 1 (naming the document and table) if one differs

A table lies between ``<!-- NAME -->`` and ``<!-- /NAME -->``. NAME is one of:

* a quality table of :data:`QUALITY` (``benchmarks/quality.py``'s own table function over a
  ``quality.json`` for the settings and methods listed there);
* ``peers-table``: ``benchmarks/peers.py``'s table of ``peers.json``;
* ``headline-table`` / ``headline``: NeUQI's variants against the peers at w2/w3/w4 (table and
  one sentence), from ``peers.json`` and the in-domain ``quality.json`` of the same protocol;
* ``table:RECORD``: a measured table saved as ``benchmarks/results/tables/RECORD.json`` by a
  benchmark (:mod:`records`), with its command, version, date and machine under it.

``tests/test_report.py`` runs the check, and fails where a table with measured figures in a
document lies outside the markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers
import records
from quality import minutes, table

RESULTS = ROOT / "benchmarks" / "results"
GPTQ_METHODS = ["minmax-lazy+gptq", "neuqi+gptq", "neuqi-lazy+gptq", "neuqi-lazy+gptq+refit",
                "neuqi-lazy+gptq+refit+distill", "neuqi"]
# marker -> (results file, settings, methods)
QUALITY: dict[str, tuple[Path, list[str], list[str]]] = {
    "in-domain-table": (
        RESULTS / "in-domain" / "quality.json", ["w2g64", "w3g64", "w4g64", "w3c", "w4c"],
        ["minmax", "neuqi-int", "neuqi", "neuqi+gptq", "minmax+gptq", "neuqi+distill"]),
    "gptq-smollm2-table": (
        RESULTS / "in-domain" / "quality.json",
        ["w2g64", "w3g64", "w4g64", "w2g192", "w3g192", "w4g192"], GPTQ_METHODS),
    "gptq-gemma3-table": (
        RESULTS / "gemma3-270m" / "quality.json", ["w2g128", "w3g128", "w4g128"],
        GPTQ_METHODS),
    "quality-table": (
        RESULTS / "quality.json", ["w2g64", "w3g64", "w4g64", "w3c", "w4c"],
        ["minmax", "neuqi-int", "neuqi", "minmax+gptq", "neuqi+gptq", "neuqi+distill",
         "neuqi+gptq+distill", "neuqi+e2e-distill"]),
}
# the headline's NeUQI rows: (label, quality.json method)
HEADLINE_NEUQI = [("NeUQI + GPTQ, the default (`--method neuqi --gptq`)", "neuqi-lazy+gptq+refit"),
                  ("NeUQI + GPTQ, the paper's recipe (`--gptq-params static`)", "neuqi+gptq"),
                  ("NeUQI + block-wise distillation (`--distill-steps 16`)", "neuqi+distill"),
                  ("NeUQI alone (`--method neuqi`)", "neuqi")]
HEADLINE_PEERS = ["autoround", "gptq", "hqq"]
SETTINGS = ["w2g64", "w3g64", "w4g64"]
DOCUMENTS = ["README.md", "docs"]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _provenance(results: dict[str, Any], keys: list[str]) -> str:
    """Commits, dates and machines of the rows ``keys`` (dates and machines from the runs)."""
    rows = [results["rows"][k] for k in keys if k in results["rows"]]
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    dates = sorted({r["date"][:10] for r in rows if r.get("date")}
                   | {run["date"][:10] for run in results.get("runs", []) if run.get("date")})
    text = f"Rows measured at commits {', '.join(commits)}" if commits else "Rows measured"
    if dates:
        text += f", {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
    return text + ", neuqi 0.1.0, on the project's 2-core AMD EPYC CPU (shared: times vary " \
                  "with its load; perplexities do not)."


def quality_table(name: str) -> str:
    path, settings, methods = QUALITY[name]
    results = _load(path)
    keys = ["fp", *(f"{s}/{m}" for s in settings for m in methods)]
    return table(results, settings, methods).rstrip("\n") + " " + _provenance(results, keys) + "\n"


def peers_table() -> str:
    return peers.table(_load(RESULTS / "peers.json"))


def _headline_rows() -> tuple[float, list[tuple[str, list[dict[str, Any] | None]]]]:
    quality, peer = _load(RESULTS / "in-domain" / "quality.json"), _load(RESULTS / "peers.json")
    same = ("calib", "nsamples", "seqlen", "seed", "max_windows", "eval_seqlen", "data")
    differ = [k for k in same if quality["protocol"].get(k) != peer["protocol"].get(k)]
    if differ:
        raise SystemExit(f"report: the in-domain quality and peers results differ in "
                         f"{', '.join(differ)}; the headline needs one protocol")
    rows = [(label, [quality["rows"].get(f"{s}/{m}") for s in SETTINGS])
            for label, m in HEADLINE_NEUQI]
    for name in HEADLINE_PEERS:
        found = [r for k, r in peer["rows"].items() if k.endswith(f"/{name}")]
        label = peers.row_label(name, found)
        rows.append((label, [peer["rows"].get(f"{s}/{name}") for s in SETTINGS]))
    return quality["rows"]["fp"]["perplexity"], rows


def headline_table() -> str:
    fp, rows = _headline_rows()
    best = [min(r[i]["perplexity"] for _, r in rows if r[i] and "perplexity" in r[i])
            for i in range(len(SETTINGS))]
    lines = ["| SmolLM2-135M, groups of 64 | " + " | ".join(f"w{s[1]}" for s in SETTINGS) + " |",
             "|---" * (len(SETTINGS) + 1) + "|",
             "| full precision (float32) | " + " | ".join([f"{fp:.2f}"] * len(SETTINGS)) + " |"]
    for label, cells in rows:
        out = []
        for i, row in enumerate(cells):
            if not row or "perplexity" not in row:
                out.append("-")
                continue
            cell = f"{row['perplexity']:.2f} ({minutes(row['quantize_seconds'])})"
            out.append(f"**{cell}**" if row["perplexity"] == best[i] else cell)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines) + (
        "\n\nPerplexity on 8 windows of 2048 tokens of WikiText-2 test (lower is better; the best "
        "of each column in bold), every row calibrated on the same 16 windows of 512 held-out "
        "WikiText-2 tokens and scored by `neuqi eval`; in brackets the quantization's wall time "
        "on the project's 2-core CPU. From `benchmarks/results/in-domain/quality.json` and "
        "`benchmarks/results/peers.json`, whose commands, dates and versions the quality and peers "
        "pages list under their tables.\n")


def headline() -> str:
    fp, rows = _headline_rows()
    ours = rows[0][1]
    names = {"autoround": "AutoRound (its light recipe)", "gptq": "llm-compressor's GPTQ",
             "hqq": "HQQ"}
    peers_best = {names[n]: cells for n, (_, cells) in zip(HEADLINE_PEERS,
                                                             rows[len(HEADLINE_NEUQI):])}

    def figures(cells: list[dict[str, Any] | None]) -> str:
        return " / ".join(f"{c['perplexity']:.1f}" if c and "perplexity" in c else "-"
                          for c in cells)

    return (f"On SmolLM2-135M at 2 / 3 / 4 bits in groups of 64, `neuqi quantize --gptq` reaches "
            f"a WikiText-2 perplexity of {figures(ours)} (full precision {fp:.1f}), against "
            + ", ".join(f"{name} {figures(cells)}" for name, cells in peers_best.items())
            + " with the same calibration and evaluation.\n")


def record_table(name: str) -> str:
    return records.render(records.load(name))


def renderer(name: str) -> Callable[[], str]:
    if name in QUALITY:
        return lambda: quality_table(name)
    if name.startswith("table:"):
        record = name.split(":", 1)[1]
        if record not in records.names():
            raise SystemExit(f"report: no benchmarks/results/tables/{record}.json for the "
                             f"<!-- {name} --> table")
        return lambda: record_table(record)
    fixed = {"peers-table": peers_table, "headline-table": headline_table,
             "headline": headline}
    if name not in fixed:
        raise SystemExit(f"report: unknown table <!-- {name} -->")
    return fixed[name]


MARKER = re.compile(r"<!-- ([a-z0-9:_-]+) -->\n(.*?)<!-- /\1 -->", re.DOTALL)


def documents() -> list[Path]:
    out = []
    for entry in DOCUMENTS:
        path = ROOT / entry
        out += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return out


def rewrite(document: str) -> tuple[str, list[str]]:
    """``document`` with every marked table made anew, and the names of those that changed."""
    changed = []
    out, last = [], 0
    for match in MARKER.finditer(document):
        name = match.group(1)
        new = renderer(name)()
        out += [document[last:match.start(2)], new]
        last = match.end(2)
        if match.group(2) != new:
            changed.append(name)
    out.append(document[last:])
    return "".join(out), changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its results")
    args = parser.parse_args()
    differ, count = [], 0
    for path in documents():
        text = path.read_text()
        new, changed = rewrite(text)
        count += len(MARKER.findall(text))
        if changed:
            differ.append(f"{path.relative_to(ROOT)} ({', '.join(changed)})")
            if not args.check:
                path.write_text(new)
    if args.check:
        if differ:
            print(f"report: tables differ from their results in {'; '.join(differ)}; run "
                  "python benchmarks/report.py", file=sys.stderr)
            raise SystemExit(1)
        print(f"report: {count} tables match their results")
        return
    print(f"report: rewrote {'; '.join(differ) or 'nothing (all tables match)'}")


if __name__ == "__main__":
    main()
