"""The job store's writer lock: one process of one host writes a store at a time.

``LOCK`` holds ``{pid, host, started, proc_start, token}`` of the writer. A lock whose process is
gone (same host; zombies and reused pids count as gone) is stale and taken over; a lock of another
host cannot be checked and is respected. ``LOCK.guard`` is ``flock``-ed for the instant of a
check-and-replace, so two acquirers never both win.

On S3 (:class:`LeaseLock`) the ``LOCK`` object is a lease: created with a conditional PUT,
renewed while the job runs, and taken over only when stale (see its docstring for the rule).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
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


# ----------------------------------------------------------------------------- object storage

#: Seconds a writer's lease lasts without renewal (renewed every third of it); a test sets less.
LEASE_ENV = "NEUQI_LEASE_SECONDS"
DEFAULT_LEASE_S = 60.0


def lease_seconds() -> float:
    """The lease duration: ``NEUQI_LEASE_SECONDS`` or 60 s."""
    text = os.environ.get(LEASE_ENV)
    try:
        value = float(text) if text else DEFAULT_LEASE_S
    except ValueError:
        raise UserError(f"{LEASE_ENV}={text}: give a number of seconds") from None
    if not value > 0:
        raise UserError(f"{LEASE_ENV}={text}: give a positive number of seconds")
    return value


class _Conflict(Exception):
    """A conditional PUT or DELETE whose precondition failed (HTTP 412)."""


class LeaseLock:
    """The writer lock of a job store on S3: a ``LOCK`` object holding a lease.

    The rule (no two writers, ever): the lease is *created* with a conditional PUT
    (``If-None-Match: *``), so of two clients only one creates it; its holder rewrites it every
    third of its duration with ``If-Match: <its ETag>`` (a background thread), so a holder whose
    lease was taken over learns it at its next renewal and stops writing records
    (:meth:`check`). A lease present is refused unless it is stale, and a stale one is replaced
    with ``If-Match: <the stale ETag>``, so of two clients taking it over only one wins:

    - a lease of this host whose process is gone (as for the local lock) is stale at once;
    - any other lease is stale when it was last written more than its ``lease_s`` ago, both
      times read from the server (its ``Last-Modified`` against the ``Date`` of the same
      answer), so clients' clocks do not matter.

    Picklable; a pickled copy never holds the lease.
    """

    def __init__(self, loc: Any, display: str) -> None:
        self._loc = loc
        self._display = display
        self._token: str | None = None
        self._etag: str | None = None
        self._body: dict[str, Any] = {}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_token=None, _etag=None, _stop=None, _thread=None, lost=None)
        return state

    @property
    def held(self) -> bool:
        return self._token is not None

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self._loc.key(LOCK).partition("/")
        return bucket, key

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        bucket, key = self._bucket_key()
        try:
            return self._loc.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)  # type: ignore[no-any-return]
        except OSError as exc:
            code = ""
            for e in (exc.__cause__, exc.__context__):
                response = getattr(e, "response", None)
                if isinstance(response, dict):
                    code = str((response.get("Error") or {}).get("Code") or "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Conflict(code) from None
            if code in ("NoSuchKey", "404") or isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(key) from None
            raise

    def _put(self, body: dict[str, Any], **condition: str) -> str:
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        return str(self._call("put_object", Body=data, **condition)["ETag"])

    def _head(self) -> tuple[str, float] | None:
        """(ETag, age in seconds by the server's clock) of the LOCK object; None if absent."""
        try:
            head = self._call("head_object")
        except FileNotFoundError:
            return None
        date = (head.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
        age = 0.0
        if date:
            from email.utils import parsedate_to_datetime

            age = (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()
        return str(head["ETag"]), max(age, 0.0)

    def info(self) -> dict[str, Any] | None:
        try:
            info = self._loc.read_json(LOCK)
        except ValueError:
            return {"pid": None, "host": None, "started": None}
        return info if isinstance(info, dict) else None

    def _stale(self, info: dict[str, Any] | None, age: float) -> bool:
        if info is None:
            return True  # unreadable: nothing renews it
        if info.get("host") == socket.gethostname():
            pid = info.get("pid")
            if isinstance(pid, int) and not pid_alive(pid, info.get("proc_start")):
                return True
        try:
            lease = float(info.get("lease_s", DEFAULT_LEASE_S))
        except (TypeError, ValueError):
            lease = DEFAULT_LEASE_S
        return age > lease

    def is_live(self) -> bool:
        head = self._head()
        return head is not None and not self._stale(self.info(), head[1])

    def acquire(self) -> bool:
        """Take the lease; True if this call took it, False if this object already held it.
        UserError naming the holder if a live one holds it."""
        if self._token is not None:
            return False
        lease = lease_seconds()
        token = uuid.uuid4().hex
        stat = proc_stat(os.getpid())
        body = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
                "proc_start": stat[1] if stat else None, "token": token, "lease_s": lease,
                "renewed": now()}
        try:
            etag = self._put(body, IfNoneMatch="*")
        except _Conflict:
            head = self._head()
            info = self.info()
            if head is not None and not self._stale(info, head[1]):
                holder = info or {}
                raise UserError(
                    f"job store {self._display} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (started {holder.get('started')}, lease renewed "
                    f"{head[1]:.0f} s ago): wait for it or stop it; a lease not renewed for "
                    f"{holder.get('lease_s', DEFAULT_LEASE_S):g} s is taken over") from None
            try:
                etag = (self._put(body, IfMatch=head[0]) if head is not None
                        else self._put(body, IfNoneMatch="*"))
            except (_Conflict, FileNotFoundError):
                raise UserError(f"job store {self._display} was just locked by another "
                                f"process: wait for it or stop it") from None
        self._token, self._etag, self._body, self.lost = token, etag, body, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(lease, self._stop),
                                        name="neuqi-lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self, lease: float, stop: threading.Event) -> None:
        """Rewrite the lease every third of its duration, while this object holds it."""
        last = time.monotonic()
        while not stop.wait(lease / 3):
            try:
                body = {**self._body, "renewed": now()}
                self._etag = self._put(body, IfMatch=str(self._etag))
                last = time.monotonic()
            except (_Conflict, FileNotFoundError):
                self.lost = "another process took its lease over"
                return
            except Exception:  # noqa: BLE001 - the network: try again until the lease runs out
                if time.monotonic() - last > lease:
                    self.lost = f"its lease could not be renewed for {lease:g} s"
                    return

    def check(self) -> None:
        """UserError if this holder lost its lease (then it must not write)."""
        if self.lost is not None:
            raise UserError(f"job store {self._display}: this job stopped writing because "
                            f"{self.lost}; run the same command again when the store is free")

    def release(self) -> None:
        """Give up the lease if this object holds it (deletes LOCK if it is still ours)."""
        if self._token is None:
            return
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            with contextlib.suppress(Exception):
                self._call("delete_object", IfMatch=str(self._etag))
        self._token = self._etag = self._stop = self._thread = None
