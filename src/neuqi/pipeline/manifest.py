"""The job store's identity: its root ``zarr.json``, the format version and the manifest.

Reading needs only the standard library (``neuqi status`` answers without importing torch or
zarr). The manifest is the JSON of everything that determines the result (model, options, calibration
digest). A store is created with one, once; opening it with another is refused with the list of
what differs, so a resumed job can only ever continue the job it started.
"""

from __future__ import annotations

import json
from typing import Any

from neuqi.pipeline.location import Location, storage_errors
from neuqi.util.durable import fsync, fsync_dirs_up, read_json
from neuqi.util.errors import UserError

#: Version of the store layout, saved in the root attributes.
FORMAT_VERSION = 1

MARKER = "neuqi_job_store"


def normalize(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as it reads back from JSON (TypeError if it is not a JSON object)."""
    try:
        normalized = json.loads(json.dumps(manifest))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the manifest must be JSON-serializable: {exc}") from exc
    if not isinstance(normalized, dict):
        raise TypeError("the manifest must be a dict")
    return normalized


def read_manifest(loc: Location, display: str, *, must_exist: bool) -> dict[str, Any] | None:
    """The stored manifest; None for a missing or empty folder or prefix (unless
    ``must_exist``)."""
    if loc.local is None:
        with storage_errors(loc):
            try:
                meta = loc.read_json("zarr.json")
            except ValueError as exc:
                raise UserError(f"job store {display} has an unreadable zarr.json ({exc}): "
                                "delete its objects to start over") from None
            if meta is None:
                if must_exist:
                    raise UserError(f"{display} is not a neuqi job store (no zarr.json): give "
                                    "the URL of a previous run's --job")
                if loc.files():
                    raise UserError(f"{display} holds objects but is not a neuqi job store: "
                                    "use a new or empty --job prefix")
                return None
        return _check_meta(meta, display)
    root = loc.local
    if root.exists() and not root.is_dir():
        raise UserError(f"job store {display} is a file, not a folder: give a folder path")
    meta_path = root / "zarr.json"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"job store {display} has an unreadable zarr.json ({exc}): "
            "delete the folder to start over"
        ) from exc
    if meta is None:
        if must_exist:
            raise UserError(
                f"{display} is not a neuqi job store (no zarr.json): give the folder of a "
                "previous run's --job"
            )
        entries = list(root.iterdir()) if root.is_dir() else []
        if any(not e.name.endswith(".partial") for e in entries):
            raise UserError(
                f"{display} is a non-empty folder but not a neuqi job store: "
                "use a new or empty --job folder"
            )
        return None
    return _check_meta(meta, display)


def _check_meta(meta: Any, display: str) -> dict[str, Any]:
    """The manifest of a root ``zarr.json``; UserError unless it is a neuqi job store's."""
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if (
        not isinstance(attrs, dict)
        or meta.get("zarr_format") != 3
        or meta.get("node_type") != "group"
        or MARKER not in attrs
    ):
        raise UserError(
            f"{display} is a zarr store but not a neuqi job store: use another --job folder"
        )
    if attrs[MARKER] != FORMAT_VERSION:
        raise UserError(
            f"job store {display} has format {attrs[MARKER]!r}, this neuqi reads "
            f"{FORMAT_VERSION}: use the neuqi version that made it, or another --job folder"
        )
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict):
        raise UserError(
            f"job store {display} has no manifest in zarr.json: delete the folder to start over"
        )
    return manifest


def create_root(loc: Location, manifest: dict[str, Any]) -> None:
    """Make ``loc`` a job store: the root zarr group with the marker and the manifest."""
    import zarr  # here, so that reading a manifest (neuqi status) needs no zarr

    attributes = {MARKER: FORMAT_VERSION, "manifest": manifest}
    if loc.local is None:
        with storage_errors(loc):
            zarr.create_group(loc.zarr_store(), attributes=attributes, zarr_format=3)
        return
    from zarr.storage import LocalStore

    root = loc.local
    root.mkdir(parents=True, exist_ok=True)
    zarr.create_group(
        LocalStore(root),
        attributes=attributes,
        zarr_format=3,
    )
    fsync(root / "zarr.json")
    fsync_dirs_up(root, root.parent)


def refuse_other(stored: dict[str, Any], wanted: dict[str, Any], display: str) -> None:
    """UserError naming what differs when a store made with ``stored`` is opened for ``wanted``."""
    if stored == wanted:
        return
    diffs = manifest_diff(stored, wanted)
    if len(diffs) > 8:
        diffs = [*diffs[:8], f"and {len(diffs) - 8} more"]
    raise UserError(
        f"job store {display} was made with different options: {', '.join(diffs)}; "
        "use another --job folder or delete it"
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def manifest_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["bits 4 -> 3", ...]`` for every (dotted) key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    diffs = []
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            sa = "(unset)" if va is missing else _show(va)
            sb = "(unset)" if vb is missing else _show(vb)
            diffs.append(f"{key} {sa} -> {sb}")
    return diffs
