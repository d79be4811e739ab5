"""Where a job store lives: a local folder, or an fsspec URL such as ``s3://bucket/prefix``.

The one place that turns ``--job`` (and ``--storage-options``) into something to read and write:

- a path or a ``file://`` URL is a local folder (:attr:`Location.local`), written with ``fsync``
  and ``rename`` as before;
- any other URL goes through fsspec (``s3://`` needs s3fs: ``pip install 'neuqi[s3]'``): the
  plain files (manifest, completion records, lease) through one synchronous filesystem object,
  the zarr arrays through zarr's ``FsspecStore`` on the same URL and options. An object store's
  PUT is atomic and durable when it returns, so a record is written in one PUT, never renamed.

Credentials come from the environment (``AWS_*`` variables, ``~/.aws``) or from the storage
options. The options are never printed: :class:`Location`'s ``repr`` and every message name the
URL only. Only the standard library at import (``neuqi status`` must answer at once).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuqi.model.remote import is_url
from neuqi.util.errors import UserError

__all__ = ["Location", "parse_storage_options", "storage_errors"]

#: What fsspec protocols are written with a writer lease (a conditional PUT): see lock.py.
LEASE_PROTOCOLS = ("s3", "s3a")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options JSON`` as a dict (UserError naming the option otherwise)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--storage-options: not valid JSON ({exc.msg} at character {exc.pos}); "
                        "give a JSON object such as '{\"endpoint_url\": \"http://HOST:9000\"}'"
                        ) from None
    if not isinstance(value, dict):
        raise UserError("--storage-options: give a JSON object such as "
                        "'{\"endpoint_url\": \"http://HOST:9000\"}'")
    return value


class Location:
    """A job store's place: ``local`` (a folder) or ``protocol`` + ``root`` (``bucket/prefix``)
    on an fsspec filesystem. Picklable (dask workers receive it inside the JobStore); the
    filesystem objects are made again on the other side."""

    def __init__(self, where: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        text = str(where)
        self._options = dict(storage_options or {})
        self._fs: Any = None
        self._zstore: Any = None
        if not is_url(text):
            self.local: Path | None = Path(text.removeprefix("file://")).expanduser().absolute()
            self.protocol = "file"
            self.root = str(self.local)
            self.url = str(self.local)
            return
        self.local = None
        self.protocol = text.split("://", 1)[0].lower()
        self.url = text.rstrip("/")
        try:
            import fsspec
        except ImportError:
            raise UserError(f"job store {self.url}: object storage needs fsspec (and s3fs for "
                            f"s3://): pip install 'neuqi[s3]'") from None
        try:
            cls = fsspec.get_filesystem_class(self.protocol)
        except (ImportError, ValueError) as exc:
            raise UserError(f"job store {self.url}: no filesystem for {self.protocol}:// "
                            f"({_first_line(exc)}); install it (s3://: pip install "
                            f"'neuqi[s3]') or give a local folder") from None
        self.root = str(cls._strip_protocol(self.url)).rstrip("/")
        if not self.root or (self.protocol in LEASE_PROTOCOLS and "/" not in self.root):
            raise UserError(f"job store {self.url}: give a prefix inside the bucket, such as "
                            f"{self.protocol}://BUCKET/jobs/NAME")

    def __repr__(self) -> str:  # never the storage options: they may hold credentials
        return f"Location({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = state["_zstore"] = None
        return state

    @property
    def remote(self) -> bool:
        return self.local is None

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def fs(self) -> Any:
        """The synchronous fsspec filesystem of a remote location (manifest, records, lease)."""
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem(self.protocol, **self._options)
        return self._fs

    def zarr_store(self) -> Any:
        """The zarr store of the location's root: ``LocalStore`` or ``FsspecStore``."""
        if self._zstore is None:
            if self.local is not None:
                from zarr.storage import LocalStore

                self._zstore = LocalStore(self.local)
            else:
                from zarr.storage import FsspecStore

                self._zstore = FsspecStore.from_url(self.url, storage_options=self._options)
        return self._zstore

    # -- plain files of a remote location (a local one uses neuqi.util.durable) --------------

    def key(self, rel: str) -> str:
        """The filesystem path of ``rel`` (``done/embed.json``) under the root."""
        return f"{self.root}/{rel}" if rel else self.root

    def show(self, rel: str = "") -> str:
        """``rel`` as the user would name it: the URL or path joined with ``rel``."""
        return f"{self.url}/{rel}" if rel else self.url

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self.key(rel)))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any | None:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_json(self, rel: str, obj: Any) -> None:
        """One PUT: atomic and durable on an object store once it returns."""
        self.fs.pipe_file(self.key(rel), json.dumps(obj, indent=1, sort_keys=True).encode())

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.key(rel)))

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(rel))

    def files(self, rel: str = "") -> list[str]:
        """Every file at or under ``rel``, relative to the root (one listing, no folders)."""
        top = self.key(rel)
        try:
            found = self.fs.find(top, withdirs=False)
        except FileNotFoundError:
            return []
        base = self.root + "/"
        return sorted(str(p).removeprefix(base) for p in found if str(p).startswith(base))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The contents of the files ``rels`` (fetched concurrently); missing ones left out."""
        if not rels:
            return {}
        got = self.fs.cat([self.key(r) for r in rels], on_error="omit")
        base = self.root + "/"
        return {str(k).removeprefix(base): bytes(v) for k, v in got.items()
                if not isinstance(v, BaseException)}

    def remove_files(self, rels: list[str]) -> None:
        if rels:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self.key(r) for r in rels])

    def size(self) -> int:
        """Bytes stored under the root."""
        try:
            return int(self.fs.du(self.root, total=True))
        except FileNotFoundError:
            return 0

    def check(self) -> None:
        """Refuse, in one line and before any work, a location that cannot be reached, a missing
        bucket or denied access (a local folder is checked where it is written)."""
        if self.local is not None:
            return
        with storage_errors(self):
            if self.protocol in LEASE_PROTOCOLS:
                bucket = self.root.split("/", 1)[0]
                self.fs.call_s3("head_bucket", Bucket=bucket)
            else:
                self.fs.exists(self.key("zarr.json"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _error_code(exc: BaseException) -> str:
    """The S3 error code or HTTP status of a botocore error (or its cause), else ''."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            code = str(err.get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code or str(status or "")
    return ""


def describe(exc: BaseException, loc: Location) -> str | None:
    """A one-line message for a storage error on ``loc``; None when it is not one."""
    names = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    code = _error_code(exc)
    where = f"job store {loc.url}"
    endpoint = loc.storage_options.get("endpoint_url") or (
        loc.storage_options.get("client_kwargs") or {}).get("endpoint_url")
    at = f" at {endpoint}" if isinstance(endpoint, str) else ""
    if code in ("NoSuchBucket",) or (isinstance(exc, FileNotFoundError) and "bucket" in str(exc)):
        return (f"{where}: the bucket does not exist{at}; create it first or check the URL and "
                f"--storage-options endpoint_url")
    if code in ("404",) and loc.protocol in LEASE_PROTOCOLS:
        return f"{where}: the bucket does not exist{at}; create it first or check the URL"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken") or isinstance(exc, PermissionError):
        return (f"{where}: access denied{at} ({code or 'permission'}); check the credentials "
                f"(AWS_* environment, ~/.aws, or --storage-options key/secret)")
    if "botocore" in names or "aiobotocore" in names or "aiohttp" in names or (
            isinstance(exc, (ConnectionError, TimeoutError))):
        return (f"{where}: cannot reach the object store{at} ({type(exc).__name__}); check the "
                f"endpoint and the network, then run the same command again; finished steps "
                f"are kept")
    if isinstance(exc, OSError) and loc.remote:
        return f"{where}: storage error ({_first_line(exc)}); run the same command again"
    return None


@contextlib.contextmanager
def storage_errors(loc: Location) -> Iterator[None]:
    """Turn an object store's errors raised in the block into one-line UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if loc.local is not None:
            raise
        message = describe(exc, loc)
        if message is None:
            raise
        raise UserError(message) from None
