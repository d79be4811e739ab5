"""GPTQ's parts of the `hessian` and `solve` stages: the full input Hessians in the job store, and
the per-linear solve with error compensation (`neuqi quantize --gptq`).

The full Hessian ``H = XᵀX / tokens`` of every distinct input of a layer is accumulated in float32
on the run's device, in a fixed order, and stored as ``layers/{i}/H/{group}``, chunked by rows and
written from the device one row block at a time, so the host never holds a second full copy. It is
read back the same way, into a tensor on the device. The runner deletes a layer's Hessians once all
of the layer's linears are solved (a 70B model's would otherwise fill the disk).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neuqi.pipeline.store import JobStore
from neuqi.quant.gptq import DAMP, LAZY_MINMAX, gptq_quantize, refine
from neuqi.quant.solver import quantize_tensor
from neuqi.stages.common import Q_PARTS, q_name
from neuqi.stages.solve import row_blocks

HESSIAN_BLOCK_BYTES = 16 * 2**20  # rows per chunk of a stored Hessian: about 16 MiB


def hessians_name(layer: int) -> str:
    """Folder of the full Hessians of layer ``layer`` (deleted with :meth:`JobStore.delete`)."""
    return f"layers/{layer}/H"


def hessian_name(layer: int, group: str) -> str:
    """Full Hessian ``[in, in]`` of one input of layer ``layer`` (group of ArchSpec.linear_groups)."""
    return f"{hessians_name(layer)}/{group}"


def _block_rows(d: int) -> int:
    return max(1, HESSIAN_BLOCK_BYTES // (4 * d))


def accumulate_hessian(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + xᵀx`` for inputs ``x [..., d]``, in float32 (in place when ``total`` exists)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if total is None:
        return x.T @ x
    return total.addmm_(x.T, x)


def write_hessian(store: JobStore, name: str, hessian: torch.Tensor) -> None:
    """Store ``hessian [d, d]`` (float32) in row blocks, one chunk per block."""
    d = hessian.shape[0]
    rows = _block_rows(d)
    store.create_array(name, hessian.shape, torch.float32, chunks=rows)
    for start in range(0, d, rows):
        store.write_rows(name, start, hessian[start:start + rows].to(torch.float32).cpu())


def read_hessian(store: JobStore, name: str, device: torch.device) -> torch.Tensor:
    """The stored Hessian ``name``, on ``device``, read one row block at a time."""
    d = store.array_shape(name)[0]
    out = torch.empty(d, d, dtype=torch.float32, device=device)
    rows = _block_rows(d)
    for start in range(0, d, rows):
        stop = min(start + rows, d)
        out[start:stop] = store.read_array(name, device=device, rows=slice(start, stop))
    return out


def run_gptq_solve(
    store: JobStore, layer_index: int, linear: str, weight: torch.Tensor, h_diag: torch.Tensor,
    hessian: torch.Tensor, *, bits: int, group_size: int, method: str, act_order: bool,
    block_size: int, device: torch.device, weight_name: str, rows: int = 0,
    dtype: torch.dtype | None = None, backend: str = "auto", params: str = "static",
    refit: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """GPTQ for one linear against ``hessian``: each group's (s, z) from ``method`` with
    ``h_diag``, solved once from the original weight (``params`` "static") or when GPTQ reaches
    the group, from the weights as compensated so far ("lazy"; ``minmax-lazy`` always is). With
    ``refit``, each row then keeps the better (by output error) of that and GPTQ's lazy Min-Max,
    and its scales and zero-points are re-solved with the codes fixed (``neuqi.quant.gptq.refine``).
    Stores codes/scale/zero_point/loss as `run_solve` does (loss: ``sum_i h_i (w_i - ŵ_i)²`` per
    group, the same definition) and returns the array names and the record's info: ``loss`` (its
    total), ``output_error`` (``tr(ΔHΔᵀ)``, what GPTQ minimises) and ``damp`` (the dampening
    fraction that made ``H`` positive definite; None: none did, the columns were rounded).

    ``rows`` (the memory budget's; 0: all): GPTQ runs on blocks of that many weight rows, each
    cast to ``dtype`` on the device in its turn (rows are independent given ``H``; the inverse
    factor is recomputed per block, time traded for memory)."""
    lazy = "minmax" if method == LAZY_MINMAX else method if params == "lazy" else None
    parts: dict[str, list[torch.Tensor]] = {part: [] for part in Q_PARTS}
    output_error, damp_used = 0.0, 0.0
    h = h_diag.to(device=device, dtype=torch.float32)
    for block in row_blocks(weight.shape[0], weight.shape[1], group_size, rows):
        w = weight[block].to(device=device, dtype=dtype or weight.dtype)
        scale = zero = None
        if lazy is None:
            init = quantize_tensor(w, h_diag, bits=bits, group_size=group_size, method=method,
                                   device=device, name=weight_name, backend=backend)
            scale, zero = init.scale, init.zero_point
            del init
        res = gptq_quantize(
            w, hessian, scale, zero, bits=bits, group_size=group_size, act_order=act_order,
            block_size=block_size, lazy=lazy, h_diag=h_diag, backend=backend, device=device,
            name=weight_name,
        )
        if refit:
            other = None
            if lazy != "minmax":
                other = gptq_quantize(
                    w, hessian, bits=bits, group_size=group_size, act_order=act_order,
                    block_size=block_size, lazy="minmax", device=device, name=weight_name)
            res = refine(w, hessian, res, other)
            del other
        out_features = res.codes.shape[0]
        diff2 = (w.to(torch.float32) - res.dequantize()).pow(2).mul_(h)
        del w
        loss = diff2.view(out_features, res.scale.shape[1], -1).sum(-1)
        del diff2
        for part, value in (("codes", res.codes), ("scale", res.scale),
                            ("zero_point", res.zero_point), ("loss", loss)):
            parts[part].append(value.cpu())
        output_error += res.output_error
        damp_used = max(damp_used, res.damp_used)
        del res, loss
    names = []
    for part in Q_PARTS:
        name = q_name(layer_index, linear, part)
        value = torch.cat(parts[part]) if len(parts[part]) > 1 else parts[part][0]
        store.write_array(name, value)
        names.append(name)
    info = {"loss": float(sum(float(x.sum()) for x in parts["loss"])),
            "output_error": output_error,
            "damp": damp_used if math.isfinite(damp_used) else None}
    return names, info


def raised_damping_note(store: JobStore, layer: int, linears: tuple[str, ...]) -> str:
    """For the layer's log line: the linears whose Hessian needed more than the default damping."""
    raised = []
    for linear in linears:
        record = store.record(f"solve/{layer}/{linear}")
        assert record is not None, f"solve/{layer}/{linear} is not done"
        damp = record["info"].get("damp", DAMP)
        if damp is None or damp > DAMP:
            what = "none worked, rounded" if damp is None else f"{damp:g}"
            raised.append(f"{linear.split('.')[-1]} {what}")
    return f"; damping raised: {', '.join(raised)}" if raised else ""
