"""Measured tables as data: ``benchmarks/results/tables/NAME.json``, one file a table, with the
command that printed it and the version, date and machine it was measured with.

A benchmark saves its table with :func:`save`; ``python benchmarks/report.py`` writes it into the
documents between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` with :func:`render`, so no
figure in a document is typed by hand. A record has::

    {"title": ..., "columns": [...], "rows": [[...], ...],
     "command": "python benchmarks/...", "date": "YYYY-MM-DD HH:MM UTC", "version": "0.1.0",
     "commit": "abc1234", "machine": "...", "note": "what the reader must know (optional)",
     "source": "where the figures were taken from, when not from the command's own save"}

Records whose ``source`` says so were copied from the tables the command printed into earlier
READMEs (their command, date, commit and machine as measured); the benchmarks write new ones.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "benchmarks" / "results" / "tables"


def machine() -> str:
    """This machine in words: CPU model, cores, and the load when the run started."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} CPUs, load {load:.1f} at the start"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    """This process's command line, as a user would type it."""
    import shlex
    import sys

    return "python " + shlex.join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() or "unknown"


def _version() -> str:
    from importlib.metadata import version

    return version("neuqi")


def save(name: str, title: str, columns: list[str], rows: list[list[Any]], command: str,
         note: str = "", *, started: str | None = None, where: str | None = None) -> Path:
    """Write the record ``NAME.json`` (atomically) and return its path."""
    record = {
        "title": title, "columns": columns, "rows": [[str(c) for c in r] for r in rows],
        "command": command,
        "date": started or now(),
        "version": _version(), "commit": _commit(), "machine": where or machine(),
    }
    if note:
        record["note"] = note
    TABLES.mkdir(parents=True, exist_ok=True)
    path = TABLES / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load(name: str) -> dict[str, Any]:
    return json.loads((TABLES / f"{name}.json").read_text())


def names() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.json"))


def render(record: dict[str, Any]) -> str:
    """The markdown table of a record, then one line: what it is, the command, version, date,
    machine."""
    cols = record["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for row in record["rows"]:
        if len(row) != len(cols):
            raise ValueError(f"{record['title']}: a row of {len(row)} cells under {len(cols)} "
                             f"columns")
        lines.append("| " + " | ".join(row) + " |")
    made = (f"{record['title']}. Made by `{record['command']}`, neuqi {record['version']} "
            f"(commit {record['commit']}), {record['date']}, on {record['machine']}.")
    if record.get("note"):
        made += " " + record["note"]
    if record.get("source"):
        made += f" ({record['source']}.)"
    return "\n".join(lines) + "\n\n" + made + "\n"
