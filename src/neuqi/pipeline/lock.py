"""The job store's writer lock: one process of one host writes a store at a time.

``LOCK`` holds ``{pid, host, started, proc_start, token}`` of the writer. A lock whose process is
gone (same host; zombies and reused pids count as gone) is stale and taken over; a lock of another
host cannot be checked and is respected. ``LOCK.guard`` is ``flock``-ed for the instant of a
check-and-replace, so two acquirers never both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuqi.util.durable import fsync, now, read_json
from neuqi.util.errors import UserError

try:  # POSIX only; without it the stale-lock takeover is merely less race-proof.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = "LOCK"
GUARD = "LOCK.guard"


def proc_stat(pid: int) -> tuple[str, int] | None:
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


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (zombies and reused pids count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return False
        if proc_start is not None and start != proc_start:
            return False  # the pid was reused by another process
    return True


class WriterLock:
    """The ``LOCK`` file of the store folder ``root`` (``display``: the path as the user gave it).

    Picklable; a pickled copy never owns the lock.
    """

    def __init__(self, root: Path, display: str) -> None:
        self._root = root
        self._display = display
        self._token: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_token"] = None
        return state

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._token is not None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialize lock acquisitions among processes of this host (kernel-released flock)."""
        if fcntl is None:
            yield
            return
        with open(self._root / GUARD, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError:  # filesystem without flock: best effort
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def info(self) -> dict[str, Any] | None:
        """The current LOCK contents (``pid``, ``host``, ``started``), or None if unlocked."""
        try:
            info = read_json(self._root / LOCK)
        except (OSError, ValueError):
            return {"pid": None, "host": None, "started": None}
        return info if isinstance(info, dict) else None

    def is_live(self) -> bool:
        """Whether some process (this one included) holds a live lock."""
        info = self.info()
        if info is None:
            return False
        if info.get("host") != socket.gethostname():
            return True
        pid = info.get("pid")
        return isinstance(pid, int) and pid_alive(pid, info.get("proc_start"))

    def acquire(self) -> bool:
        """Take the lock; True if this call took it, False if this object already held it.

        UserError if a live process holds it (or one on another host, whose liveness can't be
        checked). A stale lock (its process gone, same host) is taken over.
        """
        if self._token is not None:
            return False
        lock = self._root / LOCK
        host = socket.gethostname()
        token = uuid.uuid4().hex
        stat = proc_stat(os.getpid())
        mine = {
            "pid": os.getpid(),
            "host": host,
            "started": now(),
            "proc_start": stat[1] if stat else None,
            "token": token,
        }
        with self._guard():
            info = self.info()
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
                if isinstance(pid, int) and pid_alive(pid, info.get("proc_start")):
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
            fsync(self._root, directory=True)
            self._token = token
        return True

    def release(self) -> None:
        """Give up the lock if this object holds it (removes LOCK)."""
        if self._token is None:
            return
        with self._guard():
            info = self.info()
            if info is not None and info.get("token") == self._token:
                (self._root / LOCK).unlink()
                fsync(self._root, directory=True)
        self._token = None
