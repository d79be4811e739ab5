"""Run a quantization job: the order of the stages, resuming, progress and logging.

The job store is the only memory between stages: each stage's completion record is written after
its data is durable, and a stage without its record is redone from its stored inputs. Every stage
is deterministic, so a job killed anywhere and resumed gives bitwise the output of an
uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from neuqi.calib import calibration_windows, load_calibration_text
from neuqi.checkpoint import Checkpoint, load_tokenizer, resolve_model
from neuqi.errors import UserError, disk_full_is_user_error
from neuqi.models import LLAMA_LIKE
from neuqi.output import check_output_target, is_neuqi_output
from neuqi.pipeline import plan, tasks
from neuqi.pipeline.config import QuantizeConfig, default_job_dir, text_sha256
from neuqi.pipeline.executor import (
    Executor,
    InProcessExecutor,
    check_scheduler,
    is_remote,
    open_executor,
    resolve_device,
)
from neuqi.pipeline.store import JobStore
from neuqi.pipeline.tasks import KILL_AFTER_ENV
from neuqi.solver import check_group_size
from neuqi.stages.common import acts_name, fp_acts_name
from neuqi.stages.forward import create_next_acts
from neuqi.stages.gptq import hessian_name, hessians_name, raised_damping_note
from neuqi.stages.hessian import batch_starts, write_hessian
from neuqi.stages.pack import run_pack

__all__ = ["KILL_AFTER_ENV", "Job", "quantize", "resolve_device", "resume", "status"]


def quantize(
    config: QuantizeConfig, job: str | Path | None = None, device: str = "auto",
    console: Console | None = None, scheduler: str | None = None,
) -> Path:
    """Quantize ``config.model`` into ``config.out``, resuming the job store ``job`` if it exists
    (default: ``<out>.job``). ``scheduler``: None to compute in this process, ``local[:N]`` or a
    dask scheduler address to run the tasks on a dask cluster (same result). Returns the output
    folder."""
    console = console or Console(stderr=True)
    config.validate()
    check_scheduler(scheduler)
    if not is_remote(scheduler):
        resolve_device(device)  # refuse a bad device before any work
    ckpt = Checkpoint.open(resolve_model(config.model))
    for i in range(ckpt.layer_count):  # refuse a bad group size before any work
        for linear in ckpt.arch.linears:
            name = f"{ckpt.arch.layer_prefix(i)}{linear}.weight"
            check_group_size(ckpt.shape(name)[1], config.group_size, name)
    out = Path(config.out).expanduser()
    check_output_target(out)  # before any work, as the writer will at the end
    config, summary = _fit_budget(config, str(ckpt.path), device, scheduler)
    text = load_calibration_text(Path(config.calib).expanduser() if config.calib else None)
    windows = calibration_windows(load_tokenizer(ckpt.path), text, config.nsamples, config.seqlen, config.seed)
    if windows.max() >= ckpt.config.vocab_size:
        raise UserError(f"{ckpt.path}: the tokenizer gives ids beyond the model's vocabulary")
    manifest = config.manifest(ckpt.fingerprint(), text_sha256(text))
    job_dir = job or default_job_dir(out)
    with disk_full_is_user_error(f"job store {job_dir} or --out {out}"):
        store = JobStore.create_or_open(job_dir, manifest)
        with store.locked(), open_executor(scheduler, device) as executor:
            # after every refusal, so that bad input stays one line
            console.print(summary, soft_wrap=True, highlight=False, markup=False)
            return Job(store, ckpt, config, executor.device, console, executor).run(windows)


def _fit_budget(config: QuantizeConfig, model: str, device: str, scheduler: str | None
                ) -> tuple[QuantizeConfig, str]:
    """The job's memory plan (no probe): refuse a budget below what it cannot do without; give
    the config the knobs the tasks hold to (knobs already set, by a test or a benchmark, are
    kept); return it and the plan's one-line summary."""
    dev = str(resolve_device(device)) if not is_remote(scheduler) else (
        "cpu" if device == "auto" else device)
    found = plan.make_plan(config, dev, model=model, with_probe=False)
    plan.refuse_unless_fits(found)
    return replace(config, max_memory=found.budget,
                   memory_knobs=config.memory_knobs or found.knobs.encode()), found.summary()


def resume(
    job: str | Path, device: str = "auto", console: Console | None = None,
    scheduler: str | None = None,
) -> Path:
    """Continue the job in store ``job`` with the options it was made with."""
    store = JobStore.open_existing(job)
    if "neuqi_distill" in store.manifest:
        raise UserError(f"{job}: is the job store of `neuqi distill`; run that distill command "
                        f"again to resume it")
    return quantize(QuantizeConfig.from_manifest(store.manifest), job, device, console, scheduler)


@dataclass
class Pending:
    """The solve tasks of one layer: linear -> future of its loss; ``fresh``: the linears that
    were not solved yet when submitted."""

    index: int
    started: float
    futures: dict[str, Any]
    fresh: set[str]


@dataclass
class Job:
    """The order of the work. Each unit is a task of :mod:`neuqi.pipeline.tasks` handed to the
    executor: the batches of a layer's Hessian and forward pass (split over the workers), and
    every linear's solve (all of a layer's at once). Layers follow one another; without
    sequential quantization a layer's solves run on while later layers are calibrated. The
    output is packed in this process at the end."""

    store: JobStore
    ckpt: Checkpoint
    config: QuantizeConfig
    device: torch.device
    console: Console
    executor: Executor | None = None

    def __post_init__(self) -> None:
        if self.executor is None:
            self.executor = InProcessExecutor(self.device)

    # -- bookkeeping ---------------------------------------------------------------------------

    def mark(self, key: str, arrays: list[str], info: dict[str, Any] | None = None) -> None:
        tasks.mark(self.store, key, arrays, info)

    def units(self) -> tuple[int, int]:
        """(done, total) units of work: embed, per layer hessian + solves + forward, pack."""
        n, linears = self.ckpt.layer_count, self.ckpt.arch.linears
        total = 1 + n * (1 + len(linears)) + (n - 1) + 1
        if self.config.distill_steps:
            total += 2 * n  # forward_fp and distill per layer
        done = len(self.store.records())
        return min(done, total), total

    def submit(self, fn: Any, *args: Any, key: str) -> Any:
        """``fn(store, ckpt, config, *args, device)`` on the executor."""
        assert self.executor is not None
        return self.executor.submit(fn, self.store, self.ckpt, self.config, *args,
                                    str(self.device), key=key)

    # -- the job -------------------------------------------------------------------------------

    def run(self, windows: torch.Tensor) -> Path:
        cfg, ckpt, store = self.config, self.ckpt, self.store
        n = ckpt.layer_count
        done, total = self.units()
        if done:
            self.console.print(f"resuming job {store.path}: {done}/{total} steps already done")
        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("quantize", total=total, completed=done)

            def step(description: str) -> None:
                progress.update(task, advance=1, description=description)

            if not store.is_done("embed"):
                self.submit(tasks.embed_task, windows, key="embed").result()
                step("embed")
            pending: list[Pending] = []  # layers whose solves are submitted, oldest first
            for i in range(n):
                last = i == n - 1
                started = time.perf_counter()
                if store.is_done(f"forward/{i}") or (last and self._solved(i) and (
                        not cfg.distill_steps or store.is_done(f"distill/{i}"))):
                    # its solves may be unfinished when they overlapped later layers
                    pending.append(self._submit_solves(i, started))
                    store.delete(acts_name(i))
                    store.delete(fp_acts_name(i))
                    continue
                if not store.is_done(f"hessian/{i}"):
                    progress.update(task, description=f"layer {i + 1}/{n} hessian")
                    # GPTQ's float32 full Hessians are summed in one task: one order, one result
                    sums = [s for f in self._submit_batches(tasks.hessian_task, i, "hessian",
                                                            whole=cfg.gptq)
                            for s in f.result()]
                    arrays = write_hessian(store, i, ckpt.arch, sums)
                    if cfg.gptq:
                        arrays += [hessian_name(i, g) for g, _ in ckpt.arch.linear_groups]
                    self.mark(f"hessian/{i}", arrays)
                    step(f"layer {i + 1}/{n} hessian")
                pending.append(self._submit_solves(i, started))
                if (cfg.sequential and not last) or cfg.distill_steps:
                    # the forward pass needs the quantized weights, distillation the codes
                    for future in pending[-1].futures.values():
                        future.result()
                if cfg.distill_steps:
                    self._distill_layer(i, progress, task, step)
                if not last:
                    progress.update(task, description=f"layer {i + 1}/{n} forward")
                    dst = create_next_acts(store, i, cfg.torch_dtype)
                    for f in self._submit_batches(tasks.forward_task, i, "forward"):
                        f.result()
                    self.mark(f"forward/{i}", [dst])
                    step(f"layer {i + 1}/{n} forward")
                store.delete(acts_name(i))
                store.delete(fp_acts_name(i))
                self._finish_solves(pending, progress, step, wait=False)
            self._finish_solves(pending, progress, step, wait=True)
            store.delete(fp_acts_name(n))  # the last layer's distillation target
            out = Path(cfg.out).expanduser()
            if not (store.is_done("pack") and is_neuqi_output(out)):
                progress.update(task, description="pack")
                info = {
                    "bits": cfg.bits, "group_size": cfg.group_size, "method": cfg.method,
                    "calibration": {
                        "source": cfg.calib or "shipped", "nsamples": cfg.nsamples,
                        "seqlen": cfg.seqlen, "seed": cfg.seed,
                    },
                    "sequential": cfg.sequential,
                }
                if cfg.distill_steps:
                    info["distill"] = {"mode": "block-wise", "steps": cfg.distill_steps,
                                       "lr": cfg.distill_lr, "norms": cfg.distill_norms}
                if cfg.gptq:
                    info["gptq"] = {"act_order": cfg.act_order, "block_size": cfg.gptq_block_size}
                run_pack(store, ckpt, out, info)
                if not store.is_done("pack"):
                    self.mark("pack", [], {"out": str(out)})
                    step("pack")
            progress.update(task, completed=total, description="done")
        self.console.print(f"quantized model written to {out}")
        return out

    def _solved(self, i: int) -> bool:
        return all(self.store.is_done(f"solve/{i}/{lin}") for lin in self.ckpt.arch.linears)

    def _distill_layer(self, i: int, progress: Progress, task: Any, step: Any) -> None:
        """Stages forward_fp/i (the full-precision stream) and distill/i, after layer i's solves."""
        store, n = self.store, self.ckpt.layer_count
        if not store.is_done(f"forward_fp/{i}"):
            progress.update(task, description=f"layer {i + 1}/{n} forward fp")
            self.submit(tasks.forward_fp_task, i, key=f"forward_fp/{i}").result()
            step(f"layer {i + 1}/{n} forward fp")
        fresh = not store.is_done(f"distill/{i}")
        if fresh:
            progress.update(task, description=f"layer {i + 1}/{n} distill")
        info = self.submit(tasks.distill_task, i, key=f"distill/{i}").result()
        if fresh:
            step(f"layer {i + 1}/{n} distill")
        progress.console.print(
            f"layer {i + 1}/{n}: distilled, mse {info['mse_before']:.4g} -> "
            f"{info['mse_after']:.4g}"
        )

    def _submit_batches(self, fn: Any, i: int, what: str, whole: bool = False) -> list[Any]:
        """``fn`` over layer ``i``'s calibration batches, split in one run per worker (one run
        in all if ``whole``)."""
        total = self.store.array_shape(acts_name(i))[0]
        parts = 1 if whole else self.executor.workers
        runs = tasks.split(batch_starts(total, self.config.batch_size), parts)
        return [self.submit(fn, i, starts, key=f"{what}/{i}/{starts[0]}") for starts in runs]

    def _submit_solves(self, i: int, started: float) -> Pending:
        """A solve task for every linear of layer ``i`` (a done one just reads its record)."""
        futures, fresh = {}, set()
        for group, linears in self.ckpt.arch.linear_groups:
            for linear in linears:
                if not self.store.is_done(tasks.solve_key(i, linear)):
                    fresh.add(linear)
                futures[linear] = self.submit(tasks.solve_task, i, linear, group,
                                              key=tasks.solve_key(i, linear))
        return Pending(i, started, futures, fresh)

    def _finish_solves(self, pending: list[Pending], progress: Progress, step: Any, *,
                       wait: bool) -> None:
        """Collect the solves of the layers in ``pending``, oldest first (all of them if ``wait``,
        else only while the oldest layer's are done), and report each layer's losses."""
        n = self.ckpt.layer_count
        while pending and (wait or all(f.done() for f in pending[0].futures.values())):
            layer = pending.pop(0)
            i, losses = layer.index, {}
            for linear, future in layer.futures.items():
                losses[linear] = future.result()
                if linear in layer.fresh:
                    step(f"layer {i + 1}/{n} {linear}")
            self.store.delete(hessians_name(i))  # GPTQ's: only this layer's solves need them
            if not layer.fresh:
                continue  # reported by the run that solved it
            summary = ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in losses.items())
            what = "output error" if self.config.gptq else "weighted loss"
            summary += raised_damping_note(self.store, i, self.ckpt.arch.linears)
            progress.console.print(
                f"layer {i + 1}/{n}: {what} {summary} "
                f"({time.perf_counter() - layer.started:.1f} s)"
            )


def status(job: str | Path) -> dict[str, Any]:
    """Progress of the job in store ``job``: per stage, how many steps are done of how many."""
    store = JobStore.open_existing(job)
    config = QuantizeConfig.from_manifest(store.manifest)
    records = store.records()
    layers = sorted({int(k.split("/")[1]) for k in records if k.count("/") >= 1} | {0})
    try:
        ckpt = Checkpoint.open(resolve_model(config.model))
        n, linears = ckpt.layer_count, len(ckpt.arch.linears)
    except UserError:  # the model folder is gone: count from the records and the common layout
        n, linears = max(layers) + 1, len(LLAMA_LIKE.linears)
    stages = {
        "embed": (sum(k == "embed" for k in records), 1),
        "hessian": (sum(k.startswith("hessian/") for k in records), n),
        "solve": (sum(k.startswith("solve/") for k in records), n * linears),
        "forward": (sum(k.startswith("forward/") for k in records), n - 1),
        **({"distill": (sum(k.startswith("distill/") for k in records), n)}
           if config.distill_steps else {}),
        "pack": (sum(k == "pack" for k in records), 1),
    }
    done = sum(d for d, _ in stages.values())
    total = sum(t for _, t in stages.values())
    return {
        "job": str(store.path),
        "model": config.model,
        "out": config.out,
        "options": store.manifest["options"],
        "stages": {k: {"done": d, "total": t} for k, (d, t) in stages.items()},
        "done": done,
        "total": total,
        "complete": stages["pack"][0] == 1,
        "lock": store.lock_info() if store.lock_is_live() else None,
    }
