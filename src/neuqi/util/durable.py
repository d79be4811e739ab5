"""Crash-safe file primitives shared by the job store and the output writer.

The rule everything durable in neuqi follows: write to a temporary name, ``fsync`` the data, rename
over the final name, ``fsync`` the folder. A reader then sees the old file or the new one, whole,
never a torn one, even after SIGKILL or a power cut.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

from neuqi.util import faults


def fsync(path: Path, *, directory: bool = False) -> None:
    """fsync one file or folder; a missing path is skipped, and folders tolerate filesystems that
    refuse to sync them."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    except OSError:
        if directory:  # platforms without folder descriptors
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_dirs_up(start: Path, stop: Path) -> None:
    """fsync ``start`` and each parent folder up to and including ``stop``."""
    d = start
    while True:
        fsync(d, directory=True)
        if d == stop or d.parent == d:
            break
        d = d.parent


def write_json_atomic(path: Path, obj: Any) -> None:
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
    fsync(path.parent, directory=True)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def now() -> str:
    """The local time, ISO 8601 to the second, for records and locks."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
