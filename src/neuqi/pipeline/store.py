"""The job store: every intermediate result of a quantization run, in one zarr v3 folder.

A run that is killed at any moment (SIGKILL included) resumes from its job store. The rule that
makes this safe: a stage writes its data first, makes it durable (``fsync``), and only then writes
its *completion record*. On resume, work with a record is skipped and work without one is redone
from scratch (after :meth:`JobStore.discard_incomplete`); half-written data is never trusted.

Layout of a job store folder::

    zarr.json            root zarr group; attributes {"neuqi_job_store": 1, "manifest": {...}}
    LOCK                 JSON {pid, host, started, ...} of the one process writing the store
    LOCK.guard           empty file, ``flock``-ed for an instant while the LOCK is taken
    arrays/<name>/       zarr v3 arrays (torch tensors), e.g. arrays/capture/3/inputs
    done/<key>.json      completion records, e.g. done/solve/3/self_attn.q_proj.json

Every completion record is its own small file, written to a temporary name, fsync'd and renamed,
so concurrent writers (dask workers) never rewrite the same file and no reader ever sees a record
half-written. The root ``zarr.json`` is written once, when the store is created.

Only local folders are supported (a ``file://`` URL is accepted): the durability guarantees rest
on ``fsync``, ``rename`` and process ids of this host.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from neuqi import faults
from neuqi.errors import UserError

try:  # POSIX only; without it the stale-lock takeover is merely less race-proof.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT_VERSION", "JobStore"]

#: Version of the store layout, saved in the root attributes.
FORMAT_VERSION = 1

_MARKER = "neuqi_job_store"
_ARRAYS = "arrays"
_DONE = "done"
_TRASH = ".trash"
_LOCK = "LOCK"
_GUARD = "LOCK.guard"

#: Default chunk size when chunking along the first axis.
_TARGET_CHUNK_BYTES = 64 * 2**20

# Torch dtypes numpy lacks: stored as an unsigned integer view of the same width.
_VIEW_DTYPES: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.uint16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _VIEW_DTYPES[getattr(torch, _name)] = torch.uint8

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_BAD_SUFFIXES = (".json", ".tmp", ".partial")


# ----------------------------------------------------------------------------- small helpers


def _check_name(name: str, what: str) -> str:
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


def _check_prefix(prefix: str, what: str) -> str:
    prefix = prefix.strip("/")
    return _check_name(prefix, what) if prefix else ""


def _natural_key(text: str) -> list[Any]:
    """Sort key putting ``solve/2`` before ``solve/10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _fsync(path: Path, *, directory: bool = False) -> None:
    """fsync one file or directory (directories: tolerate filesystems that refuse it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_dirs_up(start: Path, stop: Path) -> None:
    """fsync ``start`` and each parent directory up to and including ``stop``."""
    d = start
    while True:
        _fsync(d, directory=True)
        if d == stop or d.parent == d:
            break
        d = d.parent


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a fsync'd temporary file and a rename: never seen half-written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    try:
        faults.charge(len(data), path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync(path.parent, directory=True)


def _read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"unknown torch dtype {dtype!r}")
    return value


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` is stored as."""
    stored = _VIEW_DTYPES.get(dtype, dtype)
    try:
        return torch.empty((), dtype=stored).numpy().dtype
    except TypeError as exc:
        raise ValueError(f"tensors of dtype {dtype} cannot be stored in a job store") from exc


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype in _VIEW_DTYPES:
        t = t.view(_VIEW_DTYPES[t.dtype])
    return t.numpy()


def _from_numpy(array: Any, dtype: torch.dtype) -> torch.Tensor:
    arr = np.asarray(array)  # zarr gives a numpy scalar for 0-d arrays
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    t = torch.from_numpy(arr)
    return t.view(dtype) if dtype in _VIEW_DTYPES else t


def _default_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk along the first axis only, about ``_TARGET_CHUNK_BYTES`` per chunk."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, _TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return (max(1, min(shape[0], rows)), *(max(1, s) for s in shape[1:]))


def _normalize_chunks(
    chunks: int | Iterable[int] | None, shape: tuple[int, ...], itemsize: int
) -> tuple[int, ...]:
    if chunks is None:
        return _default_chunks(shape, itemsize)
    if isinstance(chunks, int):
        if not shape:
            return ()
        return (max(1, chunks), *(max(1, s) for s in shape[1:]))
    out = tuple(int(c) for c in chunks)
    if len(out) != len(shape) or any(c < 1 for c in out):
        raise ValueError(f"chunks {out} do not fit an array of shape {shape}")
    return out


def _write_head(z: zarr.Array, data: np.ndarray, start: int = 0) -> None:
    """Write the first half of ``data``'s rows at ``start`` (a torn write, for fault injection)."""
    if data.ndim == 0:
        return
    half = (len(data) + 1) // 2
    z[start : start + half] = data[:half]


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, from /proc; None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (zombies and reused pids count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return False
        if proc_start is not None and start != proc_start:
            return False  # the pid was reused by another process
    return True


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


def _manifest_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
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


def _local_root(path: str | Path) -> Path:
    text = str(path)
    if "://" in text:
        if not text.startswith("file://"):
            raise UserError(
                f"job store {text}: only local folders are supported; give a folder path"
            )
        text = text.removeprefix("file://")
    return Path(text).expanduser().absolute()


# ----------------------------------------------------------------------------- the store


class JobStore:
    """A zarr v3 job store: manifest, tensors, completion records and the writer lock.

    Instances are cheap and picklable (a path and the manifest), so dask workers can receive one
    and write their own arrays and records. Only the process that called :meth:`acquire_lock`
    holds the lock; a pickled copy does not.
    """

    def __init__(self, root: Path, display: str, manifest: dict[str, Any]) -> None:
        """Use :meth:`create_or_open` or :meth:`open_existing` instead."""
        self._root = root
        self._display = display
        self._manifest = manifest
        self._lock_token: str | None = None

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, path: str | Path, manifest: dict[str, Any]) -> JobStore:
        """Open the job store at ``path``, creating it (with ``manifest``) if it does not exist.

        Raises UserError when the store was made with a different manifest, or when ``path`` is
        a non-empty folder (or a file) that is not a job store.
        """
        root = _local_root(path)
        display = str(path)
        try:
            normalized = json.loads(json.dumps(manifest))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the manifest must be JSON-serializable: {exc}") from exc
        if not isinstance(normalized, dict):
            raise TypeError("the manifest must be a dict")
        stored = cls._read_manifest(root, display, must_exist=False)
        if stored is None:
            cls._create(root, normalized)
            return cls(root, display, normalized)
        if stored != normalized:
            diffs = _manifest_diff(stored, normalized)
            if len(diffs) > 8:
                diffs = [*diffs[:8], f"and {len(diffs) - 8} more"]
            raise UserError(
                f"job store {display} was made with different options: {', '.join(diffs)}; "
                "use another --job folder or delete it"
            )
        return cls(root, display, stored)

    @classmethod
    def open_existing(cls, path: str | Path) -> JobStore:
        """Open an existing job store (for resume / status); UserError if it is not one."""
        root = _local_root(path)
        display = str(path)
        manifest = cls._read_manifest(root, display, must_exist=True)
        assert manifest is not None
        return cls(root, display, manifest)

    @staticmethod
    def _read_manifest(root: Path, display: str, *, must_exist: bool) -> dict[str, Any] | None:
        """The stored manifest; None for a missing or empty folder (unless ``must_exist``)."""
        if root.exists() and not root.is_dir():
            raise UserError(f"job store {display} is a file, not a folder: give a folder path")
        meta_path = root / "zarr.json"
        try:
            meta = _read_json(meta_path)
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
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        if (
            not isinstance(attrs, dict)
            or meta.get("zarr_format") != 3
            or meta.get("node_type") != "group"
            or _MARKER not in attrs
        ):
            raise UserError(
                f"{display} is a zarr store but not a neuqi job store: use another --job folder"
            )
        if attrs[_MARKER] != FORMAT_VERSION:
            raise UserError(
                f"job store {display} has format {attrs[_MARKER]!r}, this neuqi reads "
                f"{FORMAT_VERSION}: use the neuqi version that made it, or another --job folder"
            )
        manifest = attrs.get("manifest")
        if not isinstance(manifest, dict):
            raise UserError(
                f"job store {display} has no manifest in zarr.json: delete the folder to start over"
            )
        return manifest

    @staticmethod
    def _create(root: Path, manifest: dict[str, Any]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        zarr.create_group(
            LocalStore(root),
            attributes={_MARKER: FORMAT_VERSION, "manifest": manifest},
            zarr_format=3,
        )
        _fsync(root / "zarr.json")
        _fsync_dirs_up(root, root.parent)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock_token"] = None  # a copy never owns the lock
        return state

    def __repr__(self) -> str:
        return f"JobStore({self._display!r})"

    # -- properties -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """Absolute path of the store folder."""
        return self._root

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest the store was created with (a copy)."""
        return json.loads(json.dumps(self._manifest))

    # -- completion records ---------------------------------------------------------------

    def _record_path(self, key: str) -> Path:
        return self._root / _DONE / (_check_name(key, "record key") + ".json")

    def is_done(self, key: str) -> bool:
        """Whether the completion record ``key`` (e.g. ``"solve/3/mlp.up_proj"``) exists."""
        return self._record_path(key).is_file()

    def mark_done(
        self, key: str, info: dict[str, Any] | None = None, arrays: Iterable[str] = ()
    ) -> None:
        """Write the completion record ``key``, after fsync-ing the listed ``arrays``.

        The record (``{"key", "done_at", "arrays", "info"}``) appears atomically, so a reader
        sees it whole or not at all. Call this only after all of the work's data is written.
        """
        names = [_check_name(a, "array name") for a in arrays]
        for name in names:
            if not self.has_array(name):
                raise ValueError(f"mark_done({key!r}): array {name!r} does not exist")
            self.sync(name)
        path = self._record_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key.strip("/"), "done_at": _now(), "arrays": names, "info": info or {}}
        _write_json_atomic(path, record)
        _fsync_dirs_up(path.parent, self._root)

    def unmark(self, key: str) -> None:
        """Remove the completion record ``key`` (no error if absent), so the work is redone."""
        path = self._record_path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync(path.parent, directory=True)

    def record(self, key: str) -> dict[str, Any] | None:
        """The completion record ``key`` (``{"key", "done_at", "arrays", "info"}``), or None."""
        return _read_json(self._record_path(key))

    def records(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """All completion records whose key is ``prefix`` or lies under it, in natural order."""
        prefix = _check_prefix(prefix, "record prefix")
        done = self._root / _DONE
        out: dict[str, dict[str, Any]] = {}
        if prefix:
            own = done / (prefix + ".json")
            rec = _read_json(own) if own.is_file() else None
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
                rec = _read_json(Path(dirpath) / fname)
                if rec is not None:
                    out[key] = rec
        return {k: out[k] for k in sorted(out, key=_natural_key)}

    def progress(self) -> dict[str, dict[str, int]]:
        """Record counts grouped for a status table: ``{stage: {layer: count}}``.

        A key ``"solve/3/self_attn.q_proj"`` counts for stage ``solve``, layer ``"3"``; a key
        with a single part (``"export"``) counts under layer ``""``.
        """
        out: dict[str, dict[str, int]] = {}
        for key in self.records():
            parts = key.split("/")
            layer = parts[1] if len(parts) > 1 else ""
            stage = out.setdefault(parts[0], {})
            stage[layer] = stage.get(layer, 0) + 1
        return out

    # -- arrays ---------------------------------------------------------------------------

    def _zstore(self) -> LocalStore:
        return LocalStore(self._root)

    def _array_dir(self, name: str) -> Path:
        return self._root / _ARRAYS / name

    def _open(self, name: str, mode: str = "r") -> zarr.Array:
        name = _check_name(name, "array name")
        if not self.has_array(name):
            raise KeyError(f"job store {self._display} has no array {name!r}")
        return zarr.open_array(self._zstore(), path=f"{_ARRAYS}/{name}", mode=mode, zarr_format=3)

    def has_array(self, name: str) -> bool:
        """Whether an array ``name`` exists (possibly not fully written: check its record)."""
        meta_path = self._array_dir(_check_name(name, "array name")) / "zarr.json"
        try:
            meta = _read_json(meta_path)
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("node_type") == "array"

    def create_array(
        self,
        name: str,
        shape: Iterable[int],
        dtype: torch.dtype | str,
        chunks: int | Iterable[int] | None = None,
    ) -> None:
        """Create (replacing any old one) an empty array to fill with :meth:`write_rows`.

        ``chunks``: a full chunk shape, or an int = rows per chunk along the first axis, or None
        for about 64 MiB chunks along the first axis. Give each writer (batch, dask task) its own
        chunks: two writers of one chunk corrupt it.
        """
        name = _check_name(name, "array name")
        tdtype = _torch_dtype(dtype)
        ndtype = _numpy_dtype(tdtype)
        shape_t = tuple(int(s) for s in shape)
        chunk_t = _normalize_chunks(chunks, shape_t, ndtype.itemsize)
        self.delete(name)
        zarr.create_array(
            self._zstore(),
            name=f"{_ARRAYS}/{name}",
            shape=shape_t,
            dtype=ndtype,
            chunks=chunk_t,
            compressors=None,
            attributes={"torch_dtype": _dtype_name(tdtype)},
            zarr_format=3,
            overwrite=True,
        )

    def write_array(
        self, name: str, tensor: torch.Tensor, chunks: int | Iterable[int] | None = None
    ) -> None:
        """Store ``tensor`` as array ``name``, replacing any existing array of that name."""
        self.create_array(name, tensor.shape, tensor.dtype, chunks)
        data = _to_numpy(tensor)
        if data.size:
            z = self._open(name, "r+")
            faults.charge(data.nbytes, self._array_dir(name))
            faults.array_write(name, lambda: _write_head(z, data))
            z[...] = data

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor`` into rows ``start : start + len(tensor)`` of array ``name``."""
        z = self._open(name, "r+")
        want = _torch_dtype(z.attrs["torch_dtype"])
        if tensor.dtype != want:
            raise ValueError(f"write_rows({name!r}): tensor is {tensor.dtype}, the array {want}")
        if tuple(tensor.shape[1:]) != tuple(z.shape[1:]) or not 0 <= start <= z.shape[0] - len(
            tensor
        ):
            raise ValueError(
                f"write_rows({name!r}): rows {start}:{start + len(tensor)} of shape "
                f"{tuple(tensor.shape)} do not fit the array's shape {z.shape}"
            )
        if tensor.numel():
            data = _to_numpy(tensor)
            faults.charge(data.nbytes, self._array_dir(name))
            faults.array_write(name, lambda: _write_head(z, data, start))
            z[start : start + len(tensor)] = data

    def read_array(
        self, name: str, device: str | torch.device = "cpu", rows: slice | None = None
    ) -> torch.Tensor:
        """Read array ``name`` (or only ``rows`` of it) as a tensor of its original dtype."""
        z = self._open(name)
        dtype = _torch_dtype(z.attrs["torch_dtype"])
        data = z[...] if rows is None else z[rows]
        return _from_numpy(data, dtype).to(device)

    def array_shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name``."""
        return tuple(self._open(name).shape)

    def array_dtype(self, name: str) -> torch.dtype:
        """Torch dtype of array ``name``."""
        return _torch_dtype(self._open(name).attrs["torch_dtype"])

    def array_names(self, prefix: str = "") -> list[str]:
        """Names of all arrays at or under ``prefix``, in natural order."""
        prefix = _check_prefix(prefix, "array prefix")
        base = self._root / _ARRAYS
        top = base / prefix if prefix else base
        names = []
        for dirpath, dirnames, _ in os.walk(top):
            d = Path(dirpath)
            meta = None
            with contextlib.suppress(OSError, ValueError):
                meta = _read_json(d / "zarr.json")
            if isinstance(meta, dict) and meta.get("node_type") == "array":
                names.append(d.relative_to(base).as_posix())
                dirnames[:] = []  # chunks, not children
            else:
                dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        return sorted(names, key=_natural_key)

    def sync(self, name: str) -> None:
        """fsync every file and folder of array ``name`` (and the folders above it)."""
        top = self._array_dir(_check_name(name, "array name"))
        for dirpath, _, filenames in os.walk(top):
            for fname in filenames:
                _fsync(Path(dirpath) / fname)
            _fsync(Path(dirpath), directory=True)
        _fsync_dirs_up(top.parent, self._root)

    def delete(self, name: str) -> None:
        """Delete array ``name`` (or every array under group ``name``); no error if absent.

        The folder is first renamed away (atomic), so the array is never seen half-deleted.
        """
        path = self._array_dir(_check_name(name, "array name"))
        if not path.exists():
            return
        trash = self._root / _TRASH
        trash.mkdir(exist_ok=True)
        target = trash / uuid.uuid4().hex
        os.rename(path, target)
        shutil.rmtree(target, ignore_errors=True)

    def discard_incomplete(self, prefix: str) -> list[str]:
        """Delete every array under ``prefix`` before redoing work that has no record.

        Raises ValueError if a completion record lists one of these arrays (``unmark`` it
        first). Returns the deleted names.
        """
        names = self.array_names(prefix)
        if not names:
            return []
        recorded = {a: k for k, r in self.records().items() for a in r.get("arrays", [])}
        protected = [f"{n} (record {recorded[n]})" for n in names if n in recorded]
        if protected:
            raise ValueError(
                f"discard_incomplete({prefix!r}) would delete recorded arrays: "
                + ", ".join(protected)
            )
        for name in names:
            self.delete(name)
        return names

    # -- crash recovery -------------------------------------------------------------------

    def recover(self) -> int:
        """Remove debris of killed writers: zarr ``*.partial`` files, our ``.*.tmp`` files, and
        half-deleted arrays. Returns how many entries were removed.

        Only the lock holder may call it (``acquire_lock`` does): it would break a live
        writer's in-flight temporary files.
        """
        removed = 0
        trash = self._root / _TRASH
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
            removed += 1
        for dirpath, _, filenames in os.walk(self._root):
            for fname in filenames:
                if fname.endswith(".partial") or (fname.startswith(".") and fname.endswith(".tmp")):
                    with contextlib.suppress(FileNotFoundError):
                        (Path(dirpath) / fname).unlink()
                        removed += 1
        return removed

    # -- the writer lock ------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialize lock acquisitions among processes of this host (kernel-released flock)."""
        if fcntl is None:
            yield
            return
        with open(self._root / _GUARD, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError:  # filesystem without flock: best effort
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def lock_info(self) -> dict[str, Any] | None:
        """The current LOCK contents (``pid``, ``host``, ``started``), or None if unlocked."""
        try:
            info = _read_json(self._root / _LOCK)
        except (OSError, ValueError):
            return {"pid": None, "host": None, "started": None}
        return info if isinstance(info, dict) else None

    def lock_is_live(self) -> bool:
        """Whether some process (this one included) holds a live lock on this store."""
        info = self.lock_info()
        if info is None:
            return False
        if info.get("host") != socket.gethostname():
            return True
        pid = info.get("pid")
        return isinstance(pid, int) and _pid_alive(pid, info.get("proc_start"))

    def acquire_lock(self) -> None:
        """Become the one writer of this store, then :meth:`recover` its debris.

        UserError if a live process holds the lock (or one on another host, whose liveness can't
        be checked). A stale lock (its process gone, same host) is taken over.
        """
        if self._lock_token is not None:
            return
        lock = self._root / _LOCK
        host = socket.gethostname()
        token = uuid.uuid4().hex
        stat = _proc_stat(os.getpid())
        mine = {
            "pid": os.getpid(),
            "host": host,
            "started": _now(),
            "proc_start": stat[1] if stat else None,
            "token": token,
        }
        with self._guard():
            info = self.lock_info()
            if info is not None:
                pid, other_host, started = info.get("pid"), info.get("host"), info.get("started")
                if pid is None:
                    raise UserError(
                        f"job store {self._display} has an unreadable LOCK file: if no neuqi "
                        f"process uses it, delete {self._display}/LOCK"
                    )
                if other_host != host:
                    raise UserError(
                        f"job store {self._display} is in use by process {pid} on {other_host} "
                        f"(started {started}): wait for it or stop it; if it is gone, delete "
                        f"{self._display}/LOCK"
                    )
                if isinstance(pid, int) and _pid_alive(pid, info.get("proc_start")):
                    raise UserError(
                        f"job store {self._display} is in use by process {pid} on {other_host} "
                        f"(started {started}): wait for it or stop it"
                    )
            # Free, or stale: write ours to a temporary file and rename it over the old LOCK.
            # The guard makes the check-and-replace atomic among acquirers; without a guard
            # (no flock), a fresh LOCK is still created exclusively by os.link.
            tmp = self._root / f".LOCK.{token}.tmp"
            with open(tmp, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                if info is None:
                    try:
                        os.link(tmp, lock)
                    except FileExistsError:
                        raise UserError(
                            f"job store {self._display} was just locked by another process: "
                            "wait for it or stop it"
                        ) from None
                else:
                    os.replace(tmp, lock)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            _fsync(self._root, directory=True)
            self._lock_token = token
            self.recover()

    def release_lock(self) -> None:
        """Give up the lock if this object holds it (removes LOCK)."""
        if self._lock_token is None:
            return
        with self._guard():
            info = self.lock_info()
            if info is not None and info.get("token") == self._lock_token:
                (self._root / _LOCK).unlink()
                _fsync(self._root, directory=True)
        self._lock_token = None

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the writer lock."""
        return self._lock_token is not None

    @contextlib.contextmanager
    def locked(self) -> Iterator[JobStore]:
        """``with store.locked(): ...`` holds the writer lock for the block."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()
