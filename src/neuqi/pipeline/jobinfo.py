"""`neuqi status`: how far a job has got, read from the job store's plain files.

Only json and the standard library (no torch, no zarr, no transformers), so the command answers at
once; the layout read here (``zarr.json``'s manifest, ``done/<key>.json`` records, ``LOCK``) is
the one :mod:`neuqi.pipeline.store` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuqi.model.architectures import arch_for
from neuqi.pipeline.location import Location, storage_errors
from neuqi.pipeline.lock import LeaseLock, WriterLock
from neuqi.pipeline.manifest import read_manifest
from neuqi.pipeline.records import records_at
from neuqi.util.durable import read_json

__all__ = ["job_status"]


def _model_config(model: str) -> dict[str, Any] | None:
    """The model's config.json, without resolving a hub id (None where it cannot be read)."""
    folder = Path(model).expanduser()
    from neuqi.model.demo import BUILTIN, default_cache_dir

    if not folder.is_dir() and model in BUILTIN:
        folder = default_cache_dir(model)
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def job_status(job: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Progress of the job in store ``job`` (a folder or a URL, with fsspec
    ``storage_options``): per stage, how many steps are done of how many."""
    loc = Location(job, storage_options)
    display = str(job) if loc.local is not None else loc.url
    loc.check()
    with storage_errors(loc):
        manifest = read_manifest(loc, display, must_exist=True)
        assert manifest is not None
        found = records_at(loc)
        lock: WriterLock | LeaseLock = (WriterLock(loc.local, display) if loc.local is not None
                                        else LeaseLock(loc, display))
        holder = lock.info() if lock.is_live() else None
    options = manifest.get("options") or {}
    records = list(found)
    layers = {int(k.split("/")[1]) for k in records if k.count("/") >= 1}
    config = _model_config(str(options.get("model")))
    try:
        n = int(config["num_hidden_layers"])  # type: ignore[index]
        arch = arch_for(config)
        solves = sum(len(arch.linears_of(i)) for i in range(n))
    except Exception:  # noqa: BLE001 - the model moved or changed: count what the records show
        n = max(layers, default=0) + 1
        solves = n * max((sum(k.startswith(f"solve/{i}/") for k in records) for i in layers),
                         default=0)
    stages = {
        "embed": (sum(k == "embed" for k in records), 1),
        "hessian": (sum(k.startswith("hessian/") for k in records), n),
        "solve": (sum(k.startswith("solve/") for k in records), solves),
        "forward": (sum(k.startswith("forward/") for k in records), n - 1),
        **({"distill": (sum(k.startswith("distill/") for k in records), n)}
           if options.get("distill_steps") else {}),
        "pack": (sum(k == "pack" for k in records), 1),
    }
    # the peak device memory each stage's tasks measured on CUDA (neuqi.pipeline.tasks.mark)
    peaks: dict[str, int] = {}
    for key, rec in found.items():
        peak = (rec.get("info") or {}).get("device_peak_bytes")
        if peak is not None:
            stage = key.split("/")[0]
            peaks[stage] = max(peaks.get(stage, 0), int(peak))
    return {
        "job": loc.url,
        "model": options.get("model"),
        "device_peak_bytes": peaks,
        "out": options.get("out"),
        "options": options,
        "stages": {k: {"done": d, "total": t} for k, (d, t) in stages.items()},
        "done": sum(d for d, _ in stages.values()),
        "total": sum(t for _, t in stages.values()),
        "complete": stages["pack"][0] == 1,
        "lock": holder,
    }
