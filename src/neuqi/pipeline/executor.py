"""Where a job's tasks run: in this process (the default) or on a dask.distributed cluster.

The runner hands every unit of work (a function of :mod:`neuqi.pipeline.tasks` and picklable
arguments) to an :class:`Executor` and waits on the futures it gets back; the stage code never
knows which executor runs it. Scheduling, retries and worker failures are dask's business, not
ours:

- ``--scheduler local[:N]`` starts a ``distributed.LocalCluster`` of N single-threaded worker
  processes on this machine (N defaults to the number of GPUs with ``--device cuda``, else the
  number of CPU cores);
- ``--scheduler tcp://HOST:PORT`` (or any other dask address) joins a running cluster whose
  workers see the model folder under the same path, and the job store under the same path or
  at the same object-storage URL (``s3://...``: then they share nothing else with the client).

Tasks that compute on a GPU ask for ``resources={"GPU": 1}``: a remote cluster's GPU workers must
be started with ``dask worker ADDRESS --resources GPU=1`` (``--nthreads 1``: one task per GPU).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, Self, TypeVar

import torch

from neuqi.util.allocator import tune_allocator
from neuqi.util.devices import resolve_device
from neuqi.util.errors import UserError

T = TypeVar("T")

#: Times dask re-runs a task that raised; a worker that died is handled by the scheduler itself
#: (its tasks are re-run elsewhere, up to ``distributed.scheduler.allowed-failures`` times).
RETRIES = 2
_LOCAL = re.compile(r"local(?::(\d+))?")
_CONNECT_TIMEOUT_S = 30


def check_scheduler(scheduler: str | None) -> None:
    """UserError unless ``scheduler`` is None, ``local``, ``local:N`` or a dask address."""
    if scheduler is None or is_remote(scheduler):
        return
    match = _LOCAL.fullmatch(scheduler)
    if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
        raise UserError(
            f"--scheduler {scheduler}: use local, local:N (N >= 1 workers) or the address of a "
            "dask scheduler such as tcp://HOST:8786"
        )


def is_remote(scheduler: str | None) -> bool:
    """Whether ``scheduler`` names an existing cluster (``tcp://``, ``tls://``, ...)."""
    return scheduler is not None and "://" in scheduler


class Executor(Protocol):
    """Runs tasks; the runner submits, then waits on the futures in the order it needs them."""

    device: torch.device  # where tasks compute, as seen by the workers

    @property
    def workers(self) -> int:
        """How many tasks can run at once: the runner splits batches this many ways."""
        ...

    def submit(self, fn: Callable[..., T], *args: Any, key: str) -> Future[T]:
        """Run ``fn(*args)``; ``key`` names the task in logs and on the dask dashboard."""
        ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs each task at once, in this process: the default, and the reference of every result."""

    workers = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def submit(self, fn: Callable[..., T], *args: Any, key: str) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_worker(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a dask worker process, with the allocator settings of the CLI."""
    tune_allocator()
    return fn(*args)


class DaskExecutor:
    """Submits tasks to a dask.distributed cluster (``Client.submit``, never ``pure``).

    ``client`` is the dask client; ``cluster`` the LocalCluster this executor started, if any
    (closed with it).
    """

    def __init__(self, client: Any, device: torch.device, cluster: Any = None) -> None:
        self.client = client
        self.cluster = cluster
        self.device = device

    @property
    def workers(self) -> int:
        return max(1, len(_worker_info(self.client)))

    def submit(self, fn: Callable[..., T], *args: Any, key: str) -> Future[T]:
        resources = {"GPU": 1} if self.device.type == "cuda" else None
        return self.client.submit(  # type: ignore[no-any-return]
            _in_worker, fn, *args, key=f"neuqi-{key}-{uuid.uuid4().hex}", pure=False,
            retries=RETRIES, resources=resources,
        )

    def close(self) -> None:
        # On a loaded machine a nanny can miss distributed's fixed 5 s close timeout after it has
        # already killed its worker process; the job's results are written by then, so a
        # TimeoutError while closing is not the job's failure.
        with contextlib.suppress(TimeoutError):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(TimeoutError):
                self.cluster.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_executor(scheduler: str | None, device: str) -> InProcessExecutor | DaskExecutor:
    """The executor for ``--scheduler`` (None: in-process) and ``--device``; close it after use
    (it is a context manager)."""
    check_scheduler(scheduler)
    if scheduler is None:
        return InProcessExecutor(resolve_device(device))
    from distributed import Client, LocalCluster

    if not is_remote(scheduler):
        dev = resolve_device(device)
        match = _LOCAL.fullmatch(scheduler)
        assert match is not None
        default = torch.cuda.device_count() if dev.type == "cuda" else (os.cpu_count() or 1)
        n = int(match.group(1)) if match.group(1) else default
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit=None, resources={"GPU": 1} if dev.type == "cuda" else None,
        )
        return DaskExecutor(Client(cluster), dev, cluster)
    try:
        client = Client(scheduler, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise UserError(
            f"--scheduler {scheduler}: cannot reach the dask scheduler ({exc}); start one with "
            "`dask scheduler` or use --scheduler local"
        ) from None
    try:
        dev = _remote_device(client, scheduler, device)
    except BaseException:
        client.close()
        raise
    return DaskExecutor(client, dev)


def _remote_device(client: Any, scheduler: str, device: str) -> torch.device:
    """``--device`` on a remote cluster: cuda when asked (or, for auto, when a worker declares a
    GPU resource), and then some worker must declare one, or the GPU tasks would wait forever."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: choose auto, cpu or cuda")
    workers = _worker_info(client).values()
    gpus = sum(w.get("resources", {}).get("GPU", 0) for w in workers)
    if device == "auto":
        return torch.device("cuda" if gpus else "cpu")
    if device.startswith("cuda") and not gpus:
        raise UserError(
            f"--device {device}: no worker of {scheduler} declares a GPU; start the GPU workers "
            "with `dask worker ADDRESS --resources GPU=1`"
        )
    return torch.device(device)


def _worker_info(client: Any) -> dict[str, Any]:
    """Every worker's info (some dask versions list only the first few unless asked)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # dask before 2025: no n_workers, and all workers listed
        info = client.scheduler_info()
    return dict(info["workers"])
