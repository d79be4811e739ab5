"""Speed-up of the solve stage on a dask LocalCluster of 1 and of 2 worker processes.

    python benchmarks/scaling.py [--workers 1,2] [--layers 4] [--hidden 256] [--intermediate 768]
        [--heads 4] [--kv-heads 2] [--vocab 1024] [--method neuqi] [--bits 4] [--group-size 128]
        [--nsamples 8] [--seqlen 128] [--seed 0] [--workdir DIR] [--keep]

It writes a synthetic LLaMA checkpoint with :mod:`neuqi.model.synthetic` (a small default shape so that the CPU solve takes about a minute), runs the job once in this process with
``--no-sequential`` to get every layer's Hessians (with ``minmax`` solves, which are quick; without
sequential quantization the Hessians do not depend on the solves), then, for each worker count,
starts a ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)``, removes the solve
records and times the solve tasks of all layers (``--method``), submitted at once through the
package's :class:`~neuqi.pipeline.executor.DaskExecutor` as the runner does. Cluster start and the
workers' first imports are not timed. Tensors of ``COMPILE_MIN_WEIGHTS`` or more are solved with
``torch.compile``, whose compilation (per worker, per shape) would be timed: the default shape
stays below it. Printed: the seconds per worker count, the speed-up over one worker, and whether
every worker count gave bitwise the same codes, scales and zero-points.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client, LocalCluster
from rich.console import Console

from neuqi.model.checkpoint import Checkpoint
from neuqi.model.synthetic import Shape, build_checkpoint
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.executor import DaskExecutor
from neuqi.pipeline.runner import quantize
from neuqi.pipeline.store import JobStore
from neuqi.pipeline.tasks import solve_key, solve_task
from neuqi.stages.common import Q_PARTS, q_name


def _warm_up(method: str, bits: int, group_size: int) -> None:
    """Import what a solve task needs (transformers comes with the pickled checkpoint's config)
    and run the solver once on a small tensor, so the timing starts with ready workers."""
    import transformers  # noqa: F401

    import neuqi.pipeline.tasks  # noqa: F401
    from neuqi.quant.solver import quantize_tensor

    g = torch.Generator().manual_seed(0)
    cols = group_size if group_size > 0 else 64
    weight = torch.randn(8, cols, generator=g)
    quantize_tensor(weight, torch.rand(cols, generator=g) + 0.1, bits=bits,
                    group_size=group_size, method=method, device="cpu", compile=False)


def solve_all(executor: DaskExecutor, store: JobStore, ckpt: Checkpoint,
              config: QuantizeConfig) -> float:
    """Seconds to solve every linear of every layer (records removed first)."""
    for key in store.records("solve"):
        store.unmark(key)
    started = time.perf_counter()
    futures = [
        executor.submit(solve_task, store, ckpt, config, i, linear, group, "cpu",
                        key=solve_key(i, linear))
        for i in range(ckpt.layer_count)
        for group, linears in ckpt.arch.linear_groups
        for linear in linears
    ]
    for future in futures:
        future.result()
    return time.perf_counter() - started


def solved(store: JobStore, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {
        q_name(i, linear, part): store.read_array(q_name(i, linear, part))
        for i in range(ckpt.layer_count) for linear in ckpt.arch.linears for part in Q_PARTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--method", default="neuqi", choices=["minmax", "neuqi", "neuqi-int"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the checkpoint and job go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    if not counts or min(counts) < 1:
        parser.error("--workers: give one or more positive counts, e.g. 1,2")

    tmp = tempfile.mkdtemp(prefix="neuqi-scaling-") if args.workdir is None else None
    workdir = Path(tmp) if tmp else args.workdir.expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report(args, counts, workdir)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"\nkept {tmp}")


def report(args: argparse.Namespace, counts: list[int], workdir: Path) -> None:
    print(f"host: {platform.platform()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, torch {torch.__version__}")
    shape = Shape(args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    model = workdir / "model"
    if not (model / "config.json").is_file():
        build_checkpoint(model, shape, args.layers, seqlen=args.seqlen, seed=args.seed,
                         max_shard_bytes=200_000_000)
    config = QuantizeConfig(
        model=str(model), out=str(workdir / "out"), bits=args.bits, group_size=args.group_size,
        method="minmax", nsamples=args.nsamples, seqlen=args.seqlen, sequential=False,
    )
    started = time.perf_counter()
    quantize(config, workdir / "job", "cpu", Console(stderr=True, quiet=True))
    print(f"Hessians of {args.layers} layers (hidden {args.hidden}, intermediate "
          f"{args.intermediate}) in this process: {time.perf_counter() - started:.1f} s")
    store = JobStore.open_existing(workdir / "job")
    ckpt = Checkpoint.open(model)
    solve_config = dataclasses.replace(config, method=args.method)
    n_tasks = args.layers * len(ckpt.arch.linears)
    seconds: dict[int, float] = {}
    results = []
    for n in counts:
        with (
            LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                         dashboard_address=None, memory_limit=None) as cluster,
            Client(cluster) as client,
        ):
            client.run(_warm_up, args.method, args.bits, args.group_size)
            executor = DaskExecutor(client, torch.device("cpu"))
            seconds[n] = solve_all(executor, store, ckpt, solve_config)
        results.append(solved(store, ckpt))
        print(f"{n} worker(s): solve stage ({n_tasks} tasks, --method {args.method} "
              f"--bits {args.bits} --group-size {args.group_size}) {seconds[n]:.1f} s")
    base = counts[0]
    for n in counts[1:]:
        print(f"speed-up {n} vs {base} worker(s): {seconds[base] / seconds[n]:.2f}x")
    same = all(
        all(torch.equal(results[0][k], r[k]) for k in results[0]) for r in results[1:]
    )
    print(f"bitwise the same solve results for every worker count: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
