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

from neuqi.data.calib import calibration_windows, hub_max_chars, load_calibration_text, text_sha256
from neuqi.formats.output import check_output_target, is_neuqi_output
from neuqi.model.checkpoint import Checkpoint, load_tokenizer, open_model
from neuqi.model.moe import MOE_MIN_TOKENS
from neuqi.pipeline import plan, tasks
from neuqi.pipeline.config import QuantizeConfig, default_job_dir
from neuqi.pipeline.executor import (
    Executor,
    InProcessExecutor,
    check_scheduler,
    is_remote,
    open_executor,
)
from neuqi.pipeline.jobinfo import job_status
from neuqi.pipeline.location import Location, storage_errors
from neuqi.pipeline.store import JobStore
from neuqi.pipeline.tasks import KILL_AFTER_ENV
from neuqi.quant.solver import check_group_size
from neuqi.stages.common import acts_name, fp_acts_name
from neuqi.stages.forward import create_next_acts
from neuqi.stages.gptq import hessian_name, hessians_name, raised_damping_note
from neuqi.stages.hessian import batch_starts, write_hessian
from neuqi.stages.pack import run_pack
from neuqi.util.devices import resolve_device
from neuqi.util.errors import UserError, disk_full_is_user_error
from neuqi.util.progress import Log, Steps

__all__ = ["KILL_AFTER_ENV", "Job", "quantize", "resolve_device", "resume", "status"]


def quantize(
    config: QuantizeConfig, job: str | Path | None = None, device: str = "auto",
    console: Console | Log | None = None, scheduler: str | None = None, keep_job: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Quantize ``config.model`` into ``config.out``, resuming the job store ``job`` if it exists
    (default: ``<out>.job``; a folder, or a URL such as ``s3://bucket/prefix`` with fsspec
    ``storage_options``, which are never stored or printed). ``scheduler``: None to compute in this process, ``local[:N]`` or a
    dask scheduler address to run the tasks on a dask cluster (same result). Progress goes to
    ``console`` (a :class:`neuqi.util.progress.Log`, or a rich Console: a bar on a terminal, plain
    lines otherwise). After a complete run the job store's arrays are deleted (its options and
    completion records stay, so a rerun says it is complete) unless ``keep_job``. Returns the
    output folder."""
    log = Log.of(console)
    config.validate()
    check_scheduler(scheduler)
    if job is not None:  # an unreachable endpoint, a missing bucket: refused before any work
        Location(job, storage_options).check()
    local_device = None
    if not is_remote(scheduler):
        local_device = resolve_device(device)  # refuse a bad device before any work
    config = config.resolved(local_device)  # the solver backend the job records
    ckpt = open_model(config.model, storage_options)
    if ckpt.arch.moe is not None and (config.gptq or config.distill_steps):
        raise UserError(
            f"{ckpt.path}: {'--gptq' if config.gptq else '--distill-steps'} is not supported "
            f"for mixture-of-experts models (model_type {ckpt.config.model_type}); quantize "
            f"without it")
    for i in range(ckpt.layer_count):  # refuse a bad group size before any work
        for linear in ckpt.arch.linears_of(i):
            name = f"{ckpt.arch.layer_prefix(i)}{linear}.weight"
            check_group_size(ckpt.shape(name)[1], config.group_size, name)
    out = Path(config.out).expanduser()
    check_output_target(out)  # before any work, as the writer will at the end
    config, summary = _fit_budget(config, str(ckpt.path), device, scheduler)
    text = load_calibration_text(config.calib, field=config.calib_field,
                                 max_chars=hub_max_chars(config.nsamples, config.seqlen))
    windows = calibration_windows(load_tokenizer(ckpt.path), text, config.nsamples, config.seqlen, config.seed)
    if windows.max() >= ckpt.config.vocab_size:
        raise UserError(f"{ckpt.path}: the tokenizer gives ids beyond the model's vocabulary")
    manifest = config.manifest(ckpt.fingerprint(), text_sha256(text))
    job_dir = job or default_job_dir(out)
    with disk_full_is_user_error(f"job store {job_dir} or --out {out}"):
        store = JobStore.create_or_open(job_dir, manifest, storage_options)
        with (storage_errors(store.location), store.locked(),
              open_executor(scheduler, device) as executor):
            return Job(store, ckpt, config, executor.device, log, executor, keep_job,
                       summary).run(windows)


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
    job: str | Path, device: str = "auto", console: Console | Log | None = None,
    scheduler: str | None = None, keep_job: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Continue the job in store ``job`` with the options it was made with."""
    store = JobStore.open_existing(job, storage_options)
    if "neuqi_distill" in store.manifest:
        raise UserError(f"{job}: is the job store of `neuqi distill`; run that distill command "
                        f"again to resume it")
    return quantize(QuantizeConfig.from_manifest(store.manifest), job, device, console, scheduler,
                    keep_job, storage_options)


#: Completion record of a finished job whose arrays were deleted (not a step of the job).
PRUNED = "pruned"


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


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
    log: Log
    executor: Executor | None = None
    keep_job: bool = False  # else the arrays are deleted once the output is written
    plan_summary: str = ""  # the memory plan's line, printed when the work starts

    def __post_init__(self) -> None:
        if self.executor is None:
            self.executor = InProcessExecutor(self.device)

    # -- bookkeeping ---------------------------------------------------------------------------

    def mark(self, key: str, arrays: list[str], info: dict[str, Any] | None = None) -> None:
        tasks.mark(self.store, key, arrays, info)

    def units(self) -> tuple[int, int]:
        """(done, total) units of work: embed, per layer hessian + solves + forward, pack."""
        n, arch = self.ckpt.layer_count, self.ckpt.arch
        total = 1 + n + sum(len(arch.linears_of(i)) for i in range(n)) + (n - 1) + 1
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
        out = Path(cfg.out).expanduser()
        if store.is_done("pack") and is_neuqi_output(out):
            self.log.info(f"job {store.where} is complete: the output is {out} (nothing to do)")
            return out
        if store.is_done(PRUNED):
            raise UserError(
                f"--out {out} is missing, and job store {store.where} finished and deleted its "
                f"intermediate results (run without --keep-job): delete {store.where} and run the "
                f"command again to quantize from the start"
            )
        if self.plan_summary:  # after every refusal, so that bad input stays one line
            self.log.info(self.plan_summary)
        beyond = self.ckpt.beyond_layers
        if beyond:
            self.log.info(
                f"{len(beyond)} tensors of decoder layers past num_hidden_layers="
                f"{self.ckpt.layer_count} (such as {beyond[0]}; DeepSeek-V3's multi-token "
                f"prediction layer) are not part of the causal model: left out of the output"
            )
        done, total = self.units()
        if done:
            self.log.info(f"resuming job {store.where}: {done}/{total} steps already done")
        with self.log.steps(total, done) as steps:
            if not store.is_done("embed"):
                steps.stage("embed")
                self.submit(tasks.embed_task, windows, key="embed").result()
                steps.advance("embed")
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
                    steps.stage(f"layer {i + 1}/{n} hessian")
                    # GPTQ's float32 full Hessians are summed in one task: one order, one result
                    sums = [s for f in self._submit_batches(tasks.hessian_task, i, "hessian",
                                                            whole=cfg.gptq)
                            for s in f.result()]
                    moe: dict[str, Any] = {}
                    arrays = write_hessian(store, i, ckpt.arch, sums, moe)
                    if cfg.gptq:
                        arrays += [hessian_name(i, g) for g, _ in ckpt.arch.groups(i)]
                    self.mark(f"hessian/{i}", arrays, moe or None)
                    steps.advance(f"layer {i + 1}/{n} hessian")
                    if moe:
                        steps.say(moe_line(i, n, moe, cfg.moe_calibration), progress=True)
                pending.append(self._submit_solves(i, started))
                if (cfg.sequential and not last) or cfg.distill_steps:
                    # the forward pass needs the quantized weights, distillation the codes
                    for future in pending[-1].futures.values():
                        future.result()
                if cfg.distill_steps:
                    self._distill_layer(i, steps)
                if not last:
                    steps.stage(f"layer {i + 1}/{n} forward")
                    dst = create_next_acts(store, i, cfg.torch_dtype)
                    for f in self._submit_batches(tasks.forward_task, i, "forward"):
                        f.result()
                    self.mark(f"forward/{i}", [dst])
                    steps.advance(f"layer {i + 1}/{n} forward")
                store.delete(acts_name(i))
                store.delete(fp_acts_name(i))
                self._finish_solves(pending, steps, wait=False)
            self._finish_solves(pending, steps, wait=True)
            store.delete(fp_acts_name(n))  # the last layer's distillation target
            if not (store.is_done("pack") and is_neuqi_output(out)):
                steps.stage("pack")
                info = {
                    "bits": cfg.bits, "group_size": cfg.group_size, "method": cfg.method,
                    "calibration": {
                        "source": cfg.calib or "shipped", "nsamples": cfg.nsamples,
                        "seqlen": cfg.seqlen, "seed": cfg.seed,
                    },
                    "sequential": cfg.sequential,
                }
                if ckpt.arch.moe is not None:
                    info["moe"] = moe_summary(store, ckpt.arch, n, cfg.moe_calibration)
                if ckpt.beyond_layers:
                    info["left_out"] = {"tensors": len(ckpt.beyond_layers),
                                        "why": "decoder layers past num_hidden_layers"}
                if cfg.distill_steps:
                    info["distill"] = {"mode": "block-wise", "steps": cfg.distill_steps,
                                       "lr": cfg.distill_lr, "norms": cfg.distill_norms}
                if cfg.gptq:
                    info["gptq"] = {"act_order": cfg.act_order, "block_size": cfg.gptq_block_size,
                                    "params": "lazy" if cfg.method == "minmax-lazy"
                                    else cfg.gptq_params, "refit": cfg.gptq_refit}
                run_pack(store, ckpt, out, info)
                if not store.is_done("pack"):
                    self.mark("pack", [], {"out": str(out)})
                    steps.advance("pack")
            steps.finish()
        self.log.info(f"quantized model written to {out}")
        self._prune_or_keep()
        return out

    def _prune_or_keep(self) -> None:
        """Once the output is written: delete the job store's arrays (activations, Hessian
        diagonals, solved parameters), which nothing reads afterwards (`neuqi eval` and
        `neuqi export` read the output), unless --keep-job. The options and completion records
        stay: the same command or `neuqi resume` then says the job is complete."""
        store = self.store
        before = store.size_bytes()
        if self.keep_job:
            self.log.info(f"job store {store.where} kept whole ({_size(before)}; --keep-job): "
                          f"delete it when it is no longer needed")
            return
        # recorded first: a store killed while pruning is known to have lost its arrays
        store.mark_done(PRUNED, {"bytes_before": before})
        for top in sorted({name.split("/")[0] for name in store.array_names()}):
            store.delete(top)  # every array under it, and its groups
        after = store.size_bytes()
        self.log.info(
            f"job store {store.where}: deleted its intermediate arrays ({_size(before - after)}), "
            f"kept its options and completion records ({_size(after)}) so that the same command "
            f"or `neuqi resume` says the job is complete; --keep-job keeps everything"
        )

    def _solved(self, i: int) -> bool:
        return all(self.store.is_done(f"solve/{i}/{lin}") for lin in self.ckpt.arch.linears_of(i))

    def _distill_layer(self, i: int, steps: Steps) -> None:
        """Stages forward_fp/i (the full-precision stream) and distill/i, after layer i's solves."""
        store, n = self.store, self.ckpt.layer_count
        if not store.is_done(f"forward_fp/{i}"):
            steps.stage(f"layer {i + 1}/{n} forward fp")
            self.submit(tasks.forward_fp_task, i, key=f"forward_fp/{i}").result()
            steps.advance(f"layer {i + 1}/{n} forward fp")
        fresh = not store.is_done(f"distill/{i}")
        if fresh:
            steps.stage(f"layer {i + 1}/{n} distill")
        info = self.submit(tasks.distill_task, i, key=f"distill/{i}").result()
        if fresh:
            steps.advance(f"layer {i + 1}/{n} distill", report=False)
        steps.say(
            f"layer {i + 1}/{n}: distilled, mse {info['mse_before']:.4g} -> "
            f"{info['mse_after']:.4g}", progress=True,
        )

    def _submit_batches(self, fn: Any, i: int, what: str, whole: bool = False) -> list[Any]:
        """``fn`` over layer ``i``'s calibration batches, split in one run per worker (one run
        in all if ``whole``)."""
        total = self.store.array_shape(acts_name(i))[0]
        assert self.executor is not None
        parts = 1 if whole else self.executor.workers
        runs = tasks.split(batch_starts(total, self.config.batch_size), parts)
        return [self.submit(fn, i, starts, key=f"{what}/{i}/{starts[0]}") for starts in runs]

    def _submit_solves(self, i: int, started: float) -> Pending:
        """A solve task for every linear of layer ``i`` (a done one just reads its record)."""
        futures, fresh = {}, set()
        for group, linears in self.ckpt.arch.groups(i):
            for linear in linears:
                if not self.store.is_done(tasks.solve_key(i, linear)):
                    fresh.add(linear)
                futures[linear] = self.submit(tasks.solve_task, i, linear, group,
                                              key=tasks.solve_key(i, linear))
        return Pending(i, started, futures, fresh)

    def _finish_solves(self, pending: list[Pending], steps: Steps, *, wait: bool) -> None:
        """Collect the solves of the layers in ``pending``, oldest first (all of them if ``wait``,
        else only while the oldest layer's are done), and report each layer's losses."""
        n = self.ckpt.layer_count
        while pending and (wait or all(f.done() for f in pending[0].futures.values())):
            layer = pending.pop(0)
            i, losses = layer.index, {}
            for linear, future in layer.futures.items():
                losses[linear] = future.result()
                if linear in layer.fresh:  # one line per layer, below
                    steps.advance(f"layer {i + 1}/{n} {linear}", report=False)
            self.store.delete(hessians_name(i))  # GPTQ's: only this layer's solves need them
            if not layer.fresh:
                continue  # reported by the run that solved it
            summary = ", ".join(f"{_short(k)} {v:.3g}" for k, v in losses.items())
            what = "output error" if self.config.gptq else "weighted loss"
            summary += raised_damping_note(self.store, i, self.ckpt.arch.linears_of(i))
            steps.say(
                f"layer {i + 1}/{n}: {what} {summary} "
                f"({time.perf_counter() - layer.started:.1f} s)", progress=True,
            )


def _short(linear: str) -> str:
    """``q_proj``; an expert's ``e3.w1``; a shared expert's ``shared.down_proj``."""
    parts = linear.split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        return f"e{parts[parts.index('experts') + 1]}.{parts[-1]}"
    return f"shared.{parts[-1]}" if "shared_expert" in linear else parts[-1]


def moe_line(i: int, n: int, info: dict[str, Any], calibration: str) -> str:
    """The progress line of an MoE layer's Hessian: tokens per expert, experts that fell back."""
    tokens = info["expert_tokens"]
    return (f"layer {i + 1}/{n}: {len(tokens)} experts, calibration tokens ({calibration}) "
            f"min {min(tokens)} max {max(tokens)}; {len(info['experts_fallback'])} fell back to "
            f"the layer's all-token statistics (< {MOE_MIN_TOKENS} tokens)")


def moe_summary(store: JobStore, arch: Any, n: int, calibration: str) -> dict[str, Any]:
    """quant_info's ``moe``: the calibration, the fallback rule and, per MoE layer, each expert's
    calibration tokens and the experts that fell back (from the hessian records)."""
    layers = {}
    for i in range(n):
        record = store.record(f"hessian/{i}") if arch.is_moe_layer(i) else None
        if record and record.get("info"):
            layers[str(i)] = {k: record["info"][k] for k in ("expert_tokens", "experts_fallback")}
    return {"calibration": calibration, "min_tokens": MOE_MIN_TOKENS,
            "fallback": "router input over all tokens (gate/up), down-projection input pooled "
                        "over the layer's experts (down)",
            "router": "full precision", "layers": layers}


def status(job: str | Path) -> dict[str, Any]:
    """Progress of the job in store ``job`` (see :func:`neuqi.pipeline.jobinfo.job_status`)."""
    return job_status(job)
