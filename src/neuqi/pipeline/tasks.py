"""The units of work an executor runs: thin wrappers that call the stages.

Every task takes picklable arguments (the job store, the checkpoint, the job's options, layer
index, ...), builds what it computes with itself (the decoder layer, on its own device), and is
idempotent: a task whose completion record exists returns at once, and a task that a dead worker
left half-done is simply run again (its arrays are rewritten before its record is written). The
same functions run in this process with the in-process executor, so a distributed run computes
exactly what a local one does.
"""

from __future__ import annotations

import functools
import math
import os
import signal
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from neuqi.model.checkpoint import Checkpoint
from neuqi.model.layers import build_layer, build_rotary
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.store import JobStore
from neuqi.quant.solver import dequantize
from neuqi.stages.common import distilled_norms, h_name, quant_params
from neuqi.stages.distill import load_distilled_norms, run_distill, run_forward_fp
from neuqi.stages.embed import run_embed
from neuqi.stages.forward import forward_rows
from neuqi.stages.gptq import hessian_name, read_hessian, run_gptq_solve
from neuqi.stages.hessian import BatchSums, batch_sums, write_full_hessians
from neuqi.stages.layer import load_layer
from neuqi.stages.solve import run_solve
from neuqi.util.errors import UserError

# Fault injection for the crash tests: SIGKILL this process after that many completion records.
KILL_AFTER_ENV = "NEUQI_FAULT_KILL_AFTER_RECORDS"
# With this also set (a file path), only the first process to create that file is killed, and it
# dies with its task half-done (data written, record not): for killing one dask worker mid-run.
KILL_ONCE_ENV = "NEUQI_FAULT_KILL_ONCE_FILE"
_records_written = 0


# Peak device memory of the tasks run in this process, by the completion record they belong to
# (a stage of a layer), for the tasks on a CUDA device: ``torch.cuda.max_memory_allocated``, reset
# when each task starts. mark() puts it in the record's info as ``device_peak_bytes``, so that a
# run can be held against its plan (`neuqi status`). Tasks run on dask workers keep theirs there.
_PEAKS: dict[str, int] = {}
_RUNNING: dict[str, torch.device] = {}


def _record_of(fn_name: str, args: tuple[Any, ...]) -> str:
    """The completion record a task's work belongs to (``args``: the task's own arguments)."""
    stage = fn_name.removesuffix("_task")
    if stage == "embed":
        return "embed"
    if stage == "solve":
        return solve_key(args[3], args[4])
    return f"{stage}/{args[3]}"


def on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run task ``fn`` (arguments ``store, ckpt, config, ...``, ``device`` last) measuring its
    peak device memory on CUDA, and turn a CUDA out-of-memory error into a one-line UserError
    that names the stage and the smallest budget the job works in (finished work is kept, so the
    same command resumes)."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        dev = torch.device(args[-1])
        key = _record_of(fn.__name__, args)
        if dev.type != "cuda":
            return fn(*args)
        torch.cuda.reset_peak_memory_stats(dev)
        _RUNNING[key] = dev
        try:
            result = fn(*args)
        except torch.OutOfMemoryError:
            raise out_of_memory(key, args[1], args[2], dev) from None
        finally:
            _RUNNING.pop(key, None)
        _PEAKS[key] = max(_PEAKS.get(key, 0), torch.cuda.max_memory_allocated(dev))
        return result

    return run


def out_of_memory(key: str, ckpt: Checkpoint, config: QuantizeConfig,
                  device: torch.device) -> UserError:
    """The one-line error of a CUDA out-of-memory in the task of record ``key``."""
    from neuqi.pipeline.plan import GiB, fmt, make_plan

    torch.cuda.empty_cache()
    budget = config.max_memory
    try:
        floor = make_plan(config, str(device), with_probe=False, model=str(ckpt.path)).floor
        smallest = f"; the smallest budget this job works in is {fmt(floor)}"
        lower = f" (down to --max-memory {math.ceil(floor / GiB * 10) / 10}GiB)"
    except Exception:  # noqa: BLE001 - the message must not fail on the way out
        smallest = lower = ""
    planned = f"under a --max-memory {fmt(budget)} plan" if budget else "under the default budget"
    return UserError(
        f"CUDA out of memory in stage {key} on {device} {planned}{smallest}: free the GPU (other "
        f"processes on it count) or give a lower --max-memory{lower}, and run the same command "
        "again; finished work is kept")


def mark(store: JobStore, key: str, arrays: list[str], info: dict[str, Any] | None = None) -> None:
    """Write completion record ``key`` (after its ``arrays`` are durable), with the peak device
    memory of its tasks in this process when they ran on CUDA."""
    global _records_written
    peak = _PEAKS.pop(key, None)
    if key in _RUNNING:
        peak = max(peak or 0, torch.cuda.max_memory_allocated(_RUNNING[key]))
    if peak is not None:
        info = {**(info or {}), "device_peak_bytes": int(peak)}
    _records_written += 1
    after = os.environ.get(KILL_AFTER_ENV)
    kill = after is not None and _records_written >= int(after)
    once = os.environ.get(KILL_ONCE_ENV)
    if kill and once and _claim(once):
        os.kill(os.getpid(), signal.SIGKILL)
    store.mark_done(key, info, arrays)
    if kill and not once:
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@on_device
def embed_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, windows: torch.Tensor, device: str,
) -> None:
    if not store.is_done("embed"):
        arrays = run_embed(store, ckpt, windows, config.torch_dtype, config.batch_size,
                           torch.device(device))
        mark(store, "embed", arrays)


@on_device
def hessian_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int,
    starts: list[int], device: str,
) -> list[BatchSums]:
    """Per-batch partial Hessian sums of the batches beginning at ``starts`` (CPU, float64). A
    GPTQ job's task covers every batch and also stores the full Hessians."""
    dev = torch.device(device)
    knobs = config.knobs
    layer = load_layer(ckpt, layer_index, dev, config.torch_dtype,
                       linear_at_a_time=knobs.linear_at_a_time, mlp_chunk=knobs.mlp_chunk)
    rotary = build_rotary(ckpt.config, dev)
    full: dict[str, torch.Tensor] | None = {} if config.gptq else None
    sums = batch_sums(store, layer_index, layer, ckpt.arch, rotary, config.batch_size, dev,
                      starts, full, windows=knobs.windows,
                      moe_all=config.moe_calibration == "all")
    if full is not None:  # the runner gives a GPTQ job's Hessian all batches in one task
        write_full_hessians(store, layer_index, full, sums)
    return sums


def solve_key(layer_index: int, linear: str) -> str:
    return f"solve/{layer_index}/{linear}"


@on_device
def solve_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int, linear: str,
    group: str, device: str,
) -> float:
    """Solve one linear from its weight and its input group's Hessian; return its loss (with
    GPTQ: its output error, what GPTQ minimises)."""
    key = solve_key(layer_index, linear)
    if not store.is_done(key):
        dev = torch.device(device)
        knobs = config.knobs
        name = f"{ckpt.arch.layer_prefix(layer_index)}{linear}.weight"
        rows = knobs.gptq_rows if config.gptq else knobs.solve_rows
        # in row blocks: the weight stays as stored, on the host, each block cast on the device
        weight = (ckpt.read(name) if rows else
                  ckpt.read(name, device=dev, dtype=config.torch_dtype))
        h = store.read_array(h_name(layer_index, group), device=dev)
        if config.gptq:
            hessian = read_hessian(store, hessian_name(layer_index, group), dev)
            arrays, info = run_gptq_solve(
                store, layer_index, linear, weight, h, hessian, bits=config.bits,
                group_size=config.group_size, method=config.method, act_order=config.act_order,
                block_size=config.gptq_block_size, device=dev, weight_name=name, rows=rows,
                dtype=config.torch_dtype, backend=config.solver_backend,
                params=config.gptq_params, refit=config.gptq_refit,
            )
        else:
            arrays, loss = run_solve(
                store, layer_index, linear, weight, h, bits=config.bits,
                group_size=config.group_size, method=config.method, device=dev, weight_name=name,
                rows=rows, dtype=config.torch_dtype, backend=config.solver_backend,
            )
            info = {"loss": loss}
        mark(store, key, arrays, info)
    record = store.record(key)
    assert record is not None
    return float(record["info"].get("output_error", record["info"]["loss"]))


@on_device
def forward_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int,
    starts: list[int], device: str,
) -> None:
    """Rows of the next layer's inputs for the batches beginning at ``starts``; with sequential
    quantization through the layer's dequantized weights (its solves must be done)."""
    dev = torch.device(device)
    knobs = config.knobs
    if knobs.linear_at_a_time or knobs.mlp_chunk:
        source = None
        if config.sequential:
            def source(linear: str) -> torch.Tensor:
                codes, scale, zero = quant_params(store, layer_index, linear, dev)
                return dequantize(codes, scale, zero, config.group_size, config.torch_dtype)
        layer = load_layer(ckpt, layer_index, dev, config.torch_dtype, source=source,
                           linear_at_a_time=knobs.linear_at_a_time, mlp_chunk=knobs.mlp_chunk)
        if config.sequential:
            load_distilled_norms(store, layer, distilled_norms(store, layer_index))
    else:
        layer = build_layer(ckpt, layer_index, dev, config.torch_dtype)
        if config.sequential:
            load_quantized_weights(store, ckpt, config, layer_index, layer, dev)
    rotary = build_rotary(ckpt.config, dev)
    forward_rows(store, layer_index, layer, rotary, config.torch_dtype, config.batch_size, dev,
                 starts, windows=knobs.windows)


def load_quantized_weights(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int,
    layer: nn.Module, device: torch.device,
) -> None:
    """Give the layer's linears their dequantized weights (sequential quantization), and its
    norms their distilled weights when it was distilled with them."""
    for linear in ckpt.arch.linears_of(layer_index):
        codes, scale, zero = quant_params(store, layer_index, linear, device)
        weight = cast(torch.Tensor, layer.get_submodule(linear).weight)
        weight.data = dequantize(codes, scale, zero, config.group_size, weight.dtype)
    load_distilled_norms(store, layer, distilled_norms(store, layer_index))


@on_device
def forward_fp_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int, device: str,
) -> None:
    """Block-wise distillation's full-precision stream: ``acts_fp/i+1`` from ``acts_fp/i``."""
    key = f"forward_fp/{layer_index}"
    if not store.is_done(key):
        dev = torch.device(device)
        layer = build_layer(ckpt, layer_index, dev, config.torch_dtype)
        rotary = build_rotary(ckpt.config, dev)
        arrays = run_forward_fp(store, layer_index, layer, rotary, config.torch_dtype,
                                config.batch_size, dev)
        mark(store, key, arrays)


@on_device
def distill_task(
    store: JobStore, ckpt: Checkpoint, config: QuantizeConfig, layer_index: int, device: str,
) -> dict[str, Any]:
    """Block-wise distillation of one layer (its solves and ``forward_fp`` must be done); returns
    the record's info (MSE before and after)."""
    key = f"distill/{layer_index}"
    if not store.is_done(key):
        dev = torch.device(device)
        layer = build_layer(ckpt, layer_index, dev, config.torch_dtype)
        rotary = build_rotary(ckpt.config, dev)
        arrays, info = run_distill(
            store, layer_index, layer, ckpt.arch, rotary, group_size=config.group_size,
            steps=config.distill_steps, lr=config.distill_lr, norms=config.distill_norms,
            seed=config.seed, device=dev,
        )
        mark(store, key, arrays, info)
    record = store.record(key)
    assert record is not None
    return dict(record["info"])


def split(starts: list[int], parts: int) -> list[list[int]]:
    """``starts`` in at most ``parts`` contiguous runs of nearly equal length, in order."""
    parts = max(1, min(parts, len(starts)))
    size, extra = divmod(len(starts), parts)
    out, at = [], 0
    for p in range(parts):
        n = size + (p < extra)
        out.append(starts[at:at + n])
        at += n
    return out
