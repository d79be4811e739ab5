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

A job store is a local folder (a path or a ``file://`` URL), whose durability rests on ``fsync``,
``rename`` and process ids of this host, or a prefix on object storage (``s3://bucket/prefix`` or
another fsspec URL, :mod:`neuqi.pipeline.location`), where every object is written in one PUT
(atomic and durable once it returns), no ``rename`` is needed, and the writer lock is a lease
(:class:`neuqi.pipeline.lock.LeaseLock`).

The pieces, one module each: :mod:`neuqi.pipeline.manifest` (the root ``zarr.json``, the format
version, the manifest check), :mod:`neuqi.pipeline.lock` (the writer lock),
:mod:`neuqi.pipeline.arrays` (tensors as zarr arrays), :mod:`neuqi.util.durable` (fsync, atomic JSON).
This module holds the completion records and the array operations, behind :class:`JobStore`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import zarr

from neuqi.pipeline import arrays as arr
from neuqi.pipeline.location import LEASE_PROTOCOLS, Location, storage_errors
from neuqi.pipeline.lock import LeaseLock, WriterLock
from neuqi.pipeline.manifest import (
    FORMAT_VERSION,
    create_root,
    normalize,
    read_manifest,
    refuse_other,
)
from neuqi.pipeline.records import check_name, check_prefix, natural_key, records_at
from neuqi.util import faults
from neuqi.util.durable import fsync, fsync_dirs_up, now, read_json, write_json_atomic
from neuqi.util.errors import UserError

__all__ = ["FORMAT_VERSION", "JobStore"]

_ARRAYS = "arrays"
_DONE = "done"
_TRASH = ".trash"

# ----------------------------------------------------------------------------- the store


class JobStore:
    """A zarr v3 job store: manifest, tensors, completion records and the writer lock.

    Instances are cheap and picklable (a location and the manifest), so dask workers can
    receive one and write their own arrays and records. Only the process that called
    :meth:`acquire_lock` holds the lock; a pickled copy does not.
    """

    def __init__(self, loc: Location, display: str, manifest: dict[str, Any]) -> None:
        """Use :meth:`create_or_open` or :meth:`open_existing` instead."""
        self._loc = loc
        self._root = loc.local if loc.local is not None else Path(loc.root)
        self._display = display
        self._manifest = manifest
        self._arrays: dict[str, zarr.Array] = {}  # opened arrays of a remote store
        self._lock: WriterLock | LeaseLock = (
            WriterLock(self._root, display) if loc.local is not None else LeaseLock(loc, display))

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, path: str | Path, manifest: dict[str, Any],
                       storage_options: dict[str, Any] | None = None) -> JobStore:
        """Open the job store at ``path`` (a folder or a URL, with fsspec ``storage_options``),
        creating it (with ``manifest``) if it does not exist.

        Raises UserError when the store was made with a different manifest, or when ``path`` is
        a non-empty folder (or a file, or a prefix with objects) that is not a job store.
        """
        loc = Location(path, storage_options)
        display = str(path) if loc.local is not None else loc.url
        normalized = normalize(manifest)
        loc.check()
        stored = read_manifest(loc, display, must_exist=False)
        if stored is None:
            create_root(loc, normalized)
            return cls(loc, display, normalized)
        refuse_other(stored, normalized, display)
        return cls(loc, display, stored)

    @classmethod
    def open_existing(cls, path: str | Path,
                      storage_options: dict[str, Any] | None = None) -> JobStore:
        """Open an existing job store (for resume / status); UserError if it is not one."""
        loc = Location(path, storage_options)
        display = str(path) if loc.local is not None else loc.url
        loc.check()
        manifest = read_manifest(loc, display, must_exist=True)
        assert manifest is not None
        return cls(loc, display, manifest)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return f"JobStore({self._display!r})"

    # -- properties -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """Absolute path of the store folder (of a local store; see :attr:`where`)."""
        if self._loc.local is None:
            raise ValueError(f"job store {self._display} is not a local folder: use .where")
        return self._root

    @property
    def where(self) -> str:
        """The store as messages name it: its absolute folder, or its URL."""
        return self._loc.url

    @property
    def location(self) -> Location:
        return self._loc

    def size_bytes(self) -> int:
        """Bytes the store holds (files of the folder, or objects under the prefix)."""
        if self._loc.local is None:
            return self._loc.size()
        total = 0
        for dirpath, _, files in os.walk(self._root):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest the store was created with (a copy)."""
        return json.loads(json.dumps(self._manifest))

    # -- completion records ---------------------------------------------------------------

    def _record_path(self, key: str) -> Path:
        return self._root / _DONE / (check_name(key, "record key") + ".json")

    def _record_rel(self, key: str) -> str:
        return f"{_DONE}/{check_name(key, 'record key')}.json"

    def is_done(self, key: str) -> bool:
        """Whether the completion record ``key`` (e.g. ``"solve/3/mlp.up_proj"``) exists."""
        if self._loc.local is None:
            return self._loc.exists(self._record_rel(key))
        return self._record_path(key).is_file()

    def mark_done(
        self, key: str, info: dict[str, Any] | None = None, arrays: Iterable[str] = ()
    ) -> None:
        """Write the completion record ``key``, after fsync-ing the listed ``arrays``.

        The record (``{"key", "done_at", "arrays", "info"}``) appears atomically, so a reader
        sees it whole or not at all. Call this only after all of the work's data is written.
        """
        names = [check_name(a, "array name") for a in arrays]
        if isinstance(self._lock, LeaseLock):
            self._lock.check()  # a holder whose lease was taken over writes no more records
        for name in names:
            if not self.has_array(name):
                raise ValueError(f"mark_done({key!r}): array {name!r} does not exist")
            self.sync(name)
        record = {"key": key.strip("/"), "done_at": now(), "arrays": names, "info": info or {}}
        if self._loc.local is None:
            self._loc.write_json(self._record_rel(key), record)
            return
        path = self._record_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
        fsync_dirs_up(path.parent, self._root)

    def unmark(self, key: str) -> None:
        """Remove the completion record ``key`` (no error if absent), so the work is redone."""
        if self._loc.local is None:
            self._loc.remove(self._record_rel(key))
            return
        path = self._record_path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync(path.parent, directory=True)

    def record(self, key: str) -> dict[str, Any] | None:
        """The completion record ``key`` (``{"key", "done_at", "arrays", "info"}``), or None."""
        if self._loc.local is None:
            return self._loc.read_json(self._record_rel(key))  # type: ignore[no-any-return]
        return read_json(self._record_path(key))

    def records(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """All completion records whose key is ``prefix`` or lies under it, in natural order."""
        return records_at(self._loc, prefix)

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

    def _zstore(self) -> Any:
        return self._loc.zarr_store()

    def _array_dir(self, name: str) -> Path:
        return self._root / _ARRAYS / name

    def _open(self, name: str, mode: str = "r") -> zarr.Array:
        name = check_name(name, "array name")
        cached = self._arrays.get(name)
        if cached is not None:
            return cached
        if not self.has_array(name):
            raise KeyError(f"job store {self._display} has no array {name!r}")
        if self._loc.local is not None:
            return zarr.open_array(self._zstore(), path=f"{_ARRAYS}/{name}", mode=mode,
                                   zarr_format=3)
        # an open costs several requests on object storage: kept while this object creates and
        # deletes the array itself (arrays are rewritten only whole, under a new record)
        z = zarr.open_array(self._array_store(name), mode="r+", zarr_format=3)
        self._arrays[name] = z
        return z

    def _array_store(self, name: str) -> Any:
        """A remote array's own zarr store, rooted at its prefix: zarr then neither reads nor
        writes the groups above it (a dozen requests per array saved; the store lists its arrays
        by their ``zarr.json`` objects, not through groups)."""
        from zarr.storage import FsspecStore

        base = self._zstore()
        return FsspecStore(fs=base.fs, path=f"{base.path}/{_ARRAYS}/{name}")

    def _forget(self, name: str) -> None:
        name = name.strip("/")
        for key in [k for k in self._arrays if k == name or k.startswith(name + "/")]:
            del self._arrays[key]

    def has_array(self, name: str) -> bool:
        """Whether an array ``name`` exists (possibly not fully written: check its record)."""
        if check_name(name, "array name") in self._arrays:
            return True
        meta_path = self._array_dir(check_name(name, "array name")) / "zarr.json"
        try:
            meta = (self._loc.read_json(f"{_ARRAYS}/{name.strip('/')}/zarr.json")
                    if self._loc.local is None else read_json(meta_path))
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
        name = check_name(name, "array name")
        tdtype = arr.torch_dtype(dtype)
        ndtype = arr.numpy_dtype(tdtype)
        shape_t = tuple(int(s) for s in shape)
        chunk_t = arr.normalize_chunks(chunks, shape_t, ndtype.itemsize)
        if self._loc.local is not None:
            self.delete(name)
        else:  # zarr's overwrite below empties the array's prefix: one listing, not two
            self._forget(name)
        local = self._loc.local is not None
        created = zarr.create_array(
            self._zstore() if local else self._array_store(name),
            name=f"{_ARRAYS}/{name}" if local else None,
            shape=shape_t,
            dtype=ndtype,
            chunks=chunk_t,
            compressors=None,
            attributes={"torch_dtype": arr.dtype_name(tdtype)},
            zarr_format=3,
            overwrite=True,
        )
        if not local:
            self._arrays[name] = created

    def write_array(
        self, name: str, tensor: torch.Tensor, chunks: int | Iterable[int] | None = None
    ) -> None:
        """Store ``tensor`` as array ``name``, replacing any existing array of that name."""
        self.create_array(name, tensor.shape, tensor.dtype, chunks)
        data = arr.to_numpy(tensor)
        if data.size:
            z = self._open(name, "r+")
            faults.charge(data.nbytes, self._array_dir(name))
            faults.array_write(name, lambda: arr.write_head(z, data))
            z[...] = data

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor`` into rows ``start : start + len(tensor)`` of array ``name``."""
        z = self._open(name, "r+")
        want = arr.torch_dtype(str(z.attrs["torch_dtype"]))
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
            data = arr.to_numpy(tensor)
            faults.charge(data.nbytes, self._array_dir(name))
            faults.array_write(name, lambda: arr.write_head(z, data, start))
            z[start : start + len(tensor)] = data

    def read_array(
        self, name: str, device: str | torch.device = "cpu", rows: slice | None = None
    ) -> torch.Tensor:
        """Read array ``name`` (or only ``rows`` of it) as a tensor of its original dtype."""
        z = self._open(name)
        dtype = arr.torch_dtype(str(z.attrs["torch_dtype"]))
        data = z[...] if rows is None else z[rows]
        return arr.from_numpy(data, dtype).to(device)

    def array_shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name``."""
        return tuple(self._open(name).shape)

    def array_dtype(self, name: str) -> torch.dtype:
        """Torch dtype of array ``name``."""
        return arr.torch_dtype(str(self._open(name).attrs["torch_dtype"]))

    def array_names(self, prefix: str = "") -> list[str]:
        """Names of all arrays at or under ``prefix``, in natural order."""
        prefix = check_prefix(prefix, "array prefix")
        if self._loc.local is None:
            return self._remote_array_names(prefix)
        base = self._root / _ARRAYS
        top = base / prefix if prefix else base
        names = []
        for dirpath, dirnames, _ in os.walk(top):
            d = Path(dirpath)
            meta = None
            with contextlib.suppress(OSError, ValueError):
                meta = read_json(d / "zarr.json")
            if isinstance(meta, dict) and meta.get("node_type") == "array":
                names.append(d.relative_to(base).as_posix())
                dirnames[:] = []  # chunks, not children
            else:
                dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        return sorted(names, key=natural_key)

    def _remote_array_names(self, prefix: str) -> list[str]:
        top = f"{_ARRAYS}/{prefix}" if prefix else _ARRAYS
        metas = [p for p in self._loc.files(top) if p.endswith("/zarr.json")]
        names = []
        for rel, data in self._loc.read_many(metas).items():
            with contextlib.suppress(ValueError):
                meta = json.loads(data)
                if isinstance(meta, dict) and meta.get("node_type") == "array":
                    names.append(rel.removeprefix(f"{_ARRAYS}/").removesuffix("/zarr.json"))
        return sorted(names, key=natural_key)

    def sync(self, name: str) -> None:
        """fsync every file and folder of array ``name`` (and the folders above it); nothing
        to do on object storage, where a PUT is durable once it returns."""
        if self._loc.local is None:
            return
        top = self._array_dir(check_name(name, "array name"))
        for dirpath, _, filenames in os.walk(top):
            for fname in filenames:
                fsync(Path(dirpath) / fname)
            fsync(Path(dirpath), directory=True)
        fsync_dirs_up(top.parent, self._root)

    def delete(self, name: str) -> None:
        """Delete array ``name`` (or every array under group ``name``); no error if absent.

        The folder is first renamed away (atomic), so the array is never seen half-deleted. On
        object storage the arrays' ``zarr.json`` objects go first, then their chunks.
        """
        if self._loc.local is None:
            self._forget(name)
            rels = self._loc.files(f"{_ARRAYS}/{check_name(name, 'array name')}")
            self._loc.remove_files([r for r in rels if r.endswith("/zarr.json")])
            self._loc.remove_files([r for r in rels if not r.endswith("/zarr.json")])
            return
        path = self._array_dir(check_name(name, "array name"))
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
        if self._loc.local is None:
            return 0  # no temporary objects: every object is written in one PUT
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

    # -- the writer lock (neuqi.pipeline.lock) --------------------------------------------

    def lock_info(self) -> dict[str, Any] | None:
        """The current LOCK contents (``pid``, ``host``, ``started``), or None if unlocked."""
        return self._lock.info()

    def lock_is_live(self) -> bool:
        """Whether some process (this one included) holds a live lock on this store."""
        return self._lock.is_live()

    def acquire_lock(self) -> None:
        """Become the one writer of this store, then :meth:`recover` its debris.

        UserError if a live process holds the lock (or one on another host, whose liveness can't
        be checked). A stale lock (its process gone, same host) is taken over. On object storage
        the lock is a lease (:class:`neuqi.pipeline.lock.LeaseLock`), on S3 only.
        """
        if self._loc.local is None and self._loc.protocol not in LEASE_PROTOCOLS:
            raise UserError(
                f"job store {self._display}: {self._loc.protocol}:// has no conditional write "
                f"neuqi can lock a job with; use s3:// (or an S3-compatible endpoint) or a folder")
        with storage_errors(self._loc):
            if self._lock.acquire():
                self.recover()

    def release_lock(self) -> None:
        """Give up the lock if this object holds it (removes LOCK)."""
        self._lock.release()

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the writer lock."""
        return self._lock.held

    @contextlib.contextmanager
    def locked(self) -> Iterator[JobStore]:
        """``with store.locked(): ...`` holds the writer lock for the block."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()
