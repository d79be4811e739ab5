"""A model folder on object storage (``s3://bucket/model``, any fsspec URL), read without a
copy of its shards: :class:`Remote` reads small files whole and a safetensors shard by byte ranges
(its header, then one tensor at a time). :func:`neuqi.model.checkpoint.open_model` opens it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from neuqi.util.errors import UserError


class Remote:
    """A model folder on object storage (``s3://bucket/model``, any fsspec URL): its files read
    whole when small, a safetensors shard by byte ranges (its header, then one tensor at a time;
    never a whole shard). Picklable: dask workers receive it inside the Checkpoint and read the
    tensors from the bucket themselves."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self._options = dict(storage_options or {})
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __repr__(self) -> str:  # never the options: they may hold credentials
        return f"Remote({self.url!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError:
                raise UserError(f"MODEL {self.url}: a model on object storage needs fsspec (and "
                                f"s3fs for s3://): pip install 'neuqi[s3]'") from None
            try:
                self._fs, root = url_to_fs(self.url, **self._options)
            except (ImportError, ValueError) as e:
                raise UserError(f"MODEL {self.url}: no filesystem for it ({e})") from None
            self._root = str(root).rstrip("/")
        return self._fs

    def show(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        self.fs  # noqa: B018 - opening the filesystem sets _root
        return f"{self._root}/{name}"

    def size(self, name: str) -> int:
        return int(self.fs.size(self._key(name)))

    def is_file(self, name: str) -> bool:
        return bool(self.fs.isfile(self._key(name)))

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``start:end`` of file ``name`` (one ranged GET; the whole file without them)."""
        return bytes(self.fs.cat_file(self._key(name), start=start, end=end))

    def listing(self) -> list[str]:
        """The file names of the folder (no subfolders)."""
        return sorted(str(p).rsplit("/", 1)[-1] for p in self.fs.ls(self._root, detail=False)
                      if self.fs.isfile(p))


def is_url(model: str) -> bool:
    """Whether ``model`` (a MODEL or a job store) names object storage, not a local path."""
    return "://" in model and not model.startswith("file://")


def remote_cache(url: str) -> Path:
    base = Path(os.environ.get("NEUQI_CACHE", Path.home() / ".cache" / "neuqi"))
    folder = base / "remote-models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder
