"""`neuqi status`: how far a job has got, read from the job store's plain files.

Only json and the standard library (no torch, no zarr, no transformers), so the command answers at
once; the layout read here (``zarr.json``'s manifest, ``done/<key>.json`` records, ``LOCK``) is
the one :mod:`neuqi.pipeline.store` writes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from neuqi.errors import UserError

__all__ = ["LINEARS_PER_LAYER", "job_status"]

#: Linears per decoder layer of every supported family (``neuqi.models.LLAMA_LIKE.linears``; a
#: test keeps the two equal).
LINEARS_PER_LAYER = 7


def _root(job: str | Path) -> Path:
    text = str(job)
    if "://" in text:
        if not text.startswith("file://"):
            raise UserError(f"job store {text}: only local folders are supported; give a folder "
                            f"path")
        text = text.removeprefix("file://")
    return Path(text).expanduser().absolute()


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def read_manifest(job: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of the job store ``job``; UserError if it is not one."""
    root = _root(job)
    if root.exists() and not root.is_dir():
        raise UserError(f"job store {job} is a file, not a folder: give a folder path")
    try:
        meta = _json(root / "zarr.json")
    except (OSError, ValueError) as e:
        raise UserError(f"job store {job} has an unreadable zarr.json ({e})") from None
    if meta is None:
        raise UserError(f"{job} is not a neuqi job store (no zarr.json): give the folder of a "
                        f"previous run's --job")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    manifest = attrs.get("manifest") if isinstance(attrs, dict) else None
    if not isinstance(manifest, dict) or "neuqi_job_store" not in attrs:
        raise UserError(f"{job} is a zarr store but not a neuqi job store")
    return root, manifest


def record_keys(root: Path) -> list[str]:
    """Keys of the completion records (``done/solve/3/mlp.up_proj.json`` -> ``solve/3/...``)."""
    done = root / "done"
    keys = []
    for dirpath, dirnames, filenames in os.walk(done):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(done).as_posix()
        for f in filenames:
            if f.endswith(".json") and not f.startswith("."):
                key = f.removesuffix(".json")
                keys.append(key if rel == "." else f"{rel}/{key}")
    return keys


def _pid_alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = text[text.rfind(")") + 2:].split()
    if fields and fields[0] in ("Z", "X"):
        return False
    return proc_start is None or len(fields) < 20 or int(fields[19]) == proc_start


def live_lock(root: Path) -> dict[str, Any] | None:
    """The LOCK's contents when a live process holds it, else None."""
    try:
        info = _json(root / "LOCK")
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None}
    if not isinstance(info, dict):
        return None
    if info.get("host") != socket.gethostname():
        return info
    pid = info.get("pid")
    return info if isinstance(pid, int) and pid > 0 and _pid_alive(pid, info.get("proc_start")) \
        else None


def _layer_count(model: str) -> int | None:
    """``num_hidden_layers`` from the model's config.json, without resolving a hub id."""
    folder = Path(model).expanduser()
    if not folder.is_dir() and model == "smollm2":
        from neuqi.demo_model import default_cache_dir

        folder = default_cache_dir()
    try:
        return int(_json(folder / "config.json")["num_hidden_layers"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def job_status(job: str | Path) -> dict[str, Any]:
    """Progress of the job in store ``job``: per stage, how many steps are done of how many."""
    root, manifest = read_manifest(job)
    options = manifest.get("options") or {}
    records = record_keys(root)
    layers = {int(k.split("/")[1]) for k in records if k.count("/") >= 1}
    n = _layer_count(str(options.get("model"))) or (max(layers, default=0) + 1)
    stages = {
        "embed": (sum(k == "embed" for k in records), 1),
        "hessian": (sum(k.startswith("hessian/") for k in records), n),
        "solve": (sum(k.startswith("solve/") for k in records), n * LINEARS_PER_LAYER),
        "forward": (sum(k.startswith("forward/") for k in records), n - 1),
        **({"distill": (sum(k.startswith("distill/") for k in records), n)}
           if options.get("distill_steps") else {}),
        "pack": (sum(k == "pack" for k in records), 1),
    }
    return {
        "job": str(root),
        "model": options.get("model"),
        "out": options.get("out"),
        "options": options,
        "stages": {k: {"done": d, "total": t} for k, (d, t) in stages.items()},
        "done": sum(d for d, _ in stages.values()),
        "total": sum(t for _, t in stages.values()),
        "complete": stages["pack"][0] == 1,
        "lock": live_lock(root),
    }
