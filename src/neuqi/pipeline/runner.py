"""Run a quantization job: the order of the stages, resuming, progress and logging.

The job store is the only memory between stages: each stage's completion record is written after
its data is durable, and a stage without its record is redone from its stored inputs. Every stage
is deterministic, so a job killed anywhere and resumed gives bitwise the output of an
uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
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
from neuqi.errors import UserError
from neuqi.models import LLAMA_LIKE, build_layer, build_rotary
from neuqi.output import check_output_target, is_neuqi_output
from neuqi.pipeline.config import QuantizeConfig, default_job_dir, text_sha256
from neuqi.pipeline.store import JobStore
from neuqi.solver import check_group_size, dequantize
from neuqi.stages.common import acts_name, distilled_norms, fp_acts_name, h_name, quant_params
from neuqi.stages.distill import load_distilled_norms, run_distill, run_forward_fp
from neuqi.stages.embed import run_embed
from neuqi.stages.forward import run_forward
from neuqi.stages.hessian import run_hessian
from neuqi.stages.pack import run_pack
from neuqi.stages.solve import run_solve

# Fault injection for the crash tests: SIGKILL this process after that many completion records.
KILL_AFTER_ENV = "NEUQI_FAULT_KILL_AFTER_RECORDS"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")
    return torch.device(device)


def quantize(
    config: QuantizeConfig, job: str | Path | None = None, device: str = "auto",
    console: Console | None = None,
) -> Path:
    """Quantize ``config.model`` into ``config.out``, resuming the job store ``job`` if it exists
    (default: ``<out>.job``). Returns the output folder."""
    console = console or Console(stderr=True)
    config.validate()
    dev = resolve_device(device)
    ckpt = Checkpoint.open(resolve_model(config.model))
    for i in range(ckpt.layer_count):  # refuse a bad group size before any work
        for linear in ckpt.arch.linears:
            name = f"{ckpt.arch.layer_prefix(i)}{linear}.weight"
            check_group_size(ckpt.shape(name)[1], config.group_size, name)
    out = Path(config.out).expanduser()
    check_output_target(out)  # before any work, as the writer will at the end
    text = load_calibration_text(Path(config.calib).expanduser() if config.calib else None)
    windows = calibration_windows(load_tokenizer(ckpt.path), text, config.nsamples, config.seqlen, config.seed)
    if windows.max() >= ckpt.config.vocab_size:
        raise UserError(f"{ckpt.path}: the tokenizer gives ids beyond the model's vocabulary")
    manifest = config.manifest(ckpt.fingerprint(), text_sha256(text))
    store = JobStore.create_or_open(job or default_job_dir(out), manifest)
    with store.locked():
        return Job(store, ckpt, config, dev, console).run(windows)


def resume(job: str | Path, device: str = "auto", console: Console | None = None) -> Path:
    """Continue the job in store ``job`` with the options it was made with."""
    store = JobStore.open_existing(job)
    if "neuqi_distill" in store.manifest:
        raise UserError(f"{job}: is the job store of `neuqi distill`; run that distill command "
                        f"again to resume it")
    return quantize(QuantizeConfig.from_manifest(store.manifest), job, device, console)


@dataclass
class Job:
    store: JobStore
    ckpt: Checkpoint
    config: QuantizeConfig
    device: torch.device
    console: Console
    records_written: int = 0
    kill_after: int | None = field(default=None)

    def __post_init__(self) -> None:
        value = os.environ.get(KILL_AFTER_ENV)
        self.kill_after = int(value) if value else None

    # -- bookkeeping ---------------------------------------------------------------------------

    def mark(self, key: str, arrays: list[str], info: dict[str, Any] | None = None) -> None:
        self.store.mark_done(key, info, arrays)
        self.records_written += 1
        if self.kill_after is not None and self.records_written >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def units(self) -> tuple[int, int]:
        """(done, total) units of work: embed, per layer hessian + solves + forward, pack."""
        n, linears = self.ckpt.layer_count, self.ckpt.arch.linears
        total = 1 + n * (1 + len(linears)) + (n - 1) + 1
        if self.config.distill_steps:
            total += 2 * n  # forward_fp and distill per layer
        done = len(self.store.records())
        return min(done, total), total

    # -- the job -------------------------------------------------------------------------------

    def run(self, windows: torch.Tensor) -> Path:
        cfg, ckpt, store = self.config, self.ckpt, self.store
        n = ckpt.layer_count
        dtype = cfg.torch_dtype
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
                arrays = run_embed(store, ckpt, windows, dtype, cfg.batch_size, self.device)
                self.mark("embed", arrays)
                step("embed")
            rotary = build_rotary(ckpt.config, self.device)
            for i in range(n):
                last = i == n - 1
                if store.is_done(f"forward/{i}") or (last and self._solved(i) and (
                        not cfg.distill_steps or store.is_done(f"distill/{i}"))):
                    store.delete(acts_name(i))
                    store.delete(fp_acts_name(i))
                    continue
                started = time.perf_counter()
                layer = build_layer(ckpt, i, self.device, dtype)
                if not store.is_done(f"hessian/{i}"):
                    progress.update(task, description=f"layer {i + 1}/{n} hessian")
                    arrays = run_hessian(store, i, layer, ckpt.arch, rotary, cfg.batch_size,
                                         self.device)
                    self.mark(f"hessian/{i}", arrays)
                    step(f"layer {i + 1}/{n} hessian")
                losses = self._solve_layer(i, layer, progress, task, step)
                if cfg.distill_steps:
                    self._distill_layer(i, layer, rotary, progress, task, step)
                if not last:
                    progress.update(task, description=f"layer {i + 1}/{n} forward")
                    if cfg.sequential:
                        self._load_quantized_weights(i, layer)
                    arrays = run_forward(store, i, layer, rotary, dtype, cfg.batch_size,
                                         self.device)
                    self.mark(f"forward/{i}", arrays)
                    step(f"layer {i + 1}/{n} forward")
                store.delete(acts_name(i))
                store.delete(fp_acts_name(i))
                summary = ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in losses.items())
                progress.console.print(
                    f"layer {i + 1}/{n}: weighted loss {summary} "
                    f"({time.perf_counter() - started:.1f} s)"
                )
                del layer
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
                run_pack(store, ckpt, out, info)
                if not store.is_done("pack"):
                    self.mark("pack", [], {"out": str(out)})
                    step("pack")
            progress.update(task, completed=total, description="done")
        self.console.print(f"quantized model written to {out}")
        return out

    def _solved(self, i: int) -> bool:
        return all(self.store.is_done(f"solve/{i}/{lin}") for lin in self.ckpt.arch.linears)

    def _solve_layer(self, i: int, layer: torch.nn.Module, progress: Progress, task: Any,
                     step: Any) -> dict[str, float]:
        cfg, store, arch = self.config, self.store, self.ckpt.arch
        n = self.ckpt.layer_count
        losses: dict[str, float] = {}
        for group, linears in arch.linear_groups:
            h = None
            for linear in linears:
                key = f"solve/{i}/{linear}"
                if not store.is_done(key):
                    progress.update(task, description=f"layer {i + 1}/{n} {linear}")
                    if h is None:
                        h = store.read_array(h_name(i, group), device=self.device)
                    weight = layer.get_submodule(linear).weight
                    arrays, loss = run_solve(
                        store, i, linear, weight, h, bits=cfg.bits, group_size=cfg.group_size,
                        method=cfg.method, device=self.device,
                        weight_name=f"{arch.layer_prefix(i)}{linear}.weight",
                    )
                    self.mark(key, arrays, {"loss": loss})
                    step(f"layer {i + 1}/{n} {linear}")
                losses[linear] = store.record(key)["info"]["loss"]
        return losses

    def _distill_layer(self, i: int, layer: torch.nn.Module, rotary: torch.nn.Module,
                       progress: Progress, task: Any, step: Any) -> None:
        """Stages forward_fp/i (the full-precision stream) and distill/i; ``layer`` is still
        full precision here."""
        cfg, store, n = self.config, self.store, self.ckpt.layer_count
        if not store.is_done(f"forward_fp/{i}"):
            arrays = run_forward_fp(store, i, layer, rotary, cfg.torch_dtype, cfg.batch_size,
                                    self.device)
            self.mark(f"forward_fp/{i}", arrays)
            step(f"layer {i + 1}/{n} forward fp")
        if not store.is_done(f"distill/{i}"):
            progress.update(task, description=f"layer {i + 1}/{n} distill")
            arrays, info = run_distill(
                store, i, layer, self.ckpt.arch, rotary, group_size=cfg.group_size,
                steps=cfg.distill_steps, lr=cfg.distill_lr, norms=cfg.distill_norms,
                seed=cfg.seed, device=self.device,
            )
            self.mark(f"distill/{i}", arrays, info)
            step(f"layer {i + 1}/{n} distill")
        info = store.record(f"distill/{i}")["info"]
        progress.console.print(
            f"layer {i + 1}/{n}: distilled, mse {info['mse_before']:.4g} -> "
            f"{info['mse_after']:.4g}"
        )

    def _load_quantized_weights(self, i: int, layer: torch.nn.Module) -> None:
        """Give the layer's linears their dequantized weights (sequential quantization), and its
        norms their distilled weights when it was distilled with them."""
        for linear in self.ckpt.arch.linears:
            codes, scale, zero = quant_params(self.store, i, linear, self.device)
            module = layer.get_submodule(linear)
            deq = dequantize(codes, scale, zero, self.config.group_size, module.weight.dtype)
            module.weight.data = deq
        load_distilled_norms(self.store, layer, distilled_norms(self.store, i))


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
