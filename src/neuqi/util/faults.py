"""Fault injection for the crash, resume and full-disk tests: environment variables, no cost unset.

Each hook reads one environment variable; when it is unset the hook is a dictionary lookup and
a return. The counters are per process, so every `neuqi` subprocess of a test counts from 1.

``NEUQI_FAULT_KILL_AFTER_RECORDS=N``
    SIGKILL the process right after its N-th completion record (implemented in
    :meth:`neuqi.pipeline.runner.Job.mark`; the name is repeated here as :data:`KILL_AFTER_RECORDS`).
``NEUQI_FAULT_KILL_IN_WRITE=N`` or ``=GLOB:N``
    SIGKILL the process in the middle of its N-th job-store array write (``write_array`` or
    ``write_rows``), counting only arrays whose name matches the ``fnmatch`` pattern GLOB when
    one is given (e.g. ``layers/1/q/*:3``, ``acts/2:1``): the first half of the rows is written
    to the zarr chunks, the rest is not, and the stage's completion record never comes. A torn
    array, as a pre-emption leaves it.
``NEUQI_FAULT_KILL_IN_OUTPUT=N`` or ``=GLOB:N``
    SIGKILL the process in the middle of writing the N-th file of the output folder (shards,
    config.json, neuqi.json, the index, copied tokenizer files), counting only file names
    matching GLOB when given: the file is cut to half its bytes first, as a kill during the
    write leaves it.
``NEUQI_FAULT_DISK_FULL_AFTER_BYTES=N``
    Raise ``OSError(ENOSPC)`` from the job store and output writers once more than N bytes in
    all would have been written by this process (array data, records, output files).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DISK_FULL_AFTER_BYTES",
    "KILL_AFTER_RECORDS",
    "KILL_IN_OUTPUT",
    "KILL_IN_WRITE",
    "array_write",
    "charge",
    "output_file_written",
]

KILL_AFTER_RECORDS = "NEUQI_FAULT_KILL_AFTER_RECORDS"
KILL_IN_WRITE = "NEUQI_FAULT_KILL_IN_WRITE"
KILL_IN_OUTPUT = "NEUQI_FAULT_KILL_IN_OUTPUT"
DISK_FULL_AFTER_BYTES = "NEUQI_FAULT_DISK_FULL_AFTER_BYTES"

_counts = {KILL_IN_WRITE: 0, KILL_IN_OUTPUT: 0}
_bytes_written = 0


def _armed(var: str) -> int | None:
    value = os.environ.get(var)
    return int(value) if value else None


def _hit(var: str, name: str) -> bool:
    """Count one event on ``name`` for ``var``; whether it is the one to fail."""
    value = os.environ.get(var)
    if not value:
        return False
    pattern, _, count = value.rpartition(":")
    if pattern and not fnmatch.fnmatchcase(name, pattern):
        return False
    _counts[var] += 1
    return _counts[var] == int(count)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def array_write(name: str, write_first_half: Callable[[], None]) -> None:
    """Call before each write to job-store array ``name``; on the armed one, write half and die."""
    if _hit(KILL_IN_WRITE, name):
        write_first_half()
        _kill()


def output_file_written(path: Path) -> None:
    """Call after each file of the output folder is written; on the armed one, tear it and die."""
    if _hit(KILL_IN_OUTPUT, path.name):
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
            os.fsync(f.fileno())
        _kill()


def charge(nbytes: int, path: Path | str) -> None:
    """Call before writing ``nbytes`` to ``path``: ENOSPC once the armed budget is spent."""
    global _bytes_written
    limit = _armed(DISK_FULL_AFTER_BYTES)
    if limit is None:
        return
    _bytes_written += int(nbytes)
    if _bytes_written > limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
