"""Names in the job store and its completion records on disk (``done/<key>.json``).

Plain files and the standard library only, so that ``neuqi status`` can read a job's progress
without importing torch or zarr.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from neuqi.pipeline.location import Location
from neuqi.util.durable import read_json

DONE = "done"

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_BAD_SUFFIXES = (".json", ".tmp", ".partial")


def check_name(name: str, what: str) -> str:
    """Validate a ``/``-separated record key or array name; return it without outer slashes."""
    name = name.strip("/")
    parts = name.split("/")
    for part in parts:
        if not _SEGMENT.fullmatch(part) or part.startswith("__") or part.endswith(_BAD_SUFFIXES):
            raise ValueError(
                f"invalid {what} {name!r}: use '/'-separated parts of letters, digits, '_', '.', "
                f"'-' (not starting with '.' or '__', not ending with .json/.tmp/.partial)"
            )
    return name


def check_prefix(prefix: str, what: str) -> str:
    prefix = prefix.strip("/")
    return check_name(prefix, what) if prefix else ""


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``solve/2`` before ``solve/10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def read_records(done: Path, prefix: str = "") -> dict[str, dict[str, Any]]:
    """The completion records under the folder ``done`` whose key is ``prefix`` or lies under
    it, in natural order."""
    prefix = check_prefix(prefix, "record prefix")
    out: dict[str, dict[str, Any]] = {}
    if prefix:
        own = done / (prefix + ".json")
        rec = read_json(own) if own.is_file() else None
        if rec is not None:
            out[prefix] = rec
    top = done / prefix if prefix else done
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(done).as_posix()
        for fname in filenames:
            if fname.startswith(".") or not fname.endswith(".json"):
                continue
            key = fname.removesuffix(".json")
            key = key if rel == "." else f"{rel}/{key}"
            rec = read_json(Path(dirpath) / fname)
            if rec is not None:
                out[key] = rec
    return {k: out[k] for k in sorted(out, key=natural_key)}


def records_at(loc: Location, prefix: str = "") -> dict[str, dict[str, Any]]:
    """:func:`read_records` of the job store at ``loc`` (a folder, or one listing and concurrent
    reads on an object store)."""
    if loc.local is not None:
        return read_records(loc.local / DONE, prefix)
    prefix = check_prefix(prefix, "record prefix")
    names = [p for p in loc.files(f"{DONE}/{prefix}" if prefix else DONE)
             if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")]
    if prefix:
        names.append(f"{DONE}/{prefix}.json")
    out: dict[str, dict[str, Any]] = {}
    for rel, data in loc.read_many(names).items():
        key = rel.removeprefix(f"{DONE}/").removesuffix(".json")
        if any(part.startswith(".") for part in key.split("/")):
            continue
        out[key] = json.loads(data)
    return {k: out[k] for k in sorted(out, key=natural_key)}
