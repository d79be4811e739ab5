"""Stage `solve`: per-group scales and zero-points of one linear (NeUQI or a baseline)."""

from __future__ import annotations

import math

import torch

from neuqi.pipeline.store import JobStore
from neuqi.quant.solver import CHUNK_ELEMENTS, COARSE_STEPS, quantize_tensor
from neuqi.stages.common import Q_PARTS, q_name


def row_blocks(out_features: int, in_features: int, group_size: int, rows: int) -> list[slice]:
    """Slices of at most about ``rows`` rows (0: all), aligned to the solver's chunk of groups so
    that every chunk, and so the result, is the same as for the whole weight."""
    if not rows or rows >= out_features:
        return [slice(0, out_features)]
    per_row = in_features // group_size if group_size > 0 else 1
    chunk = max(1, CHUNK_ELEMENTS // (COARSE_STEPS * (group_size if group_size > 0
                                                      else in_features)))
    unit = chunk // math.gcd(chunk, per_row)
    step = max(unit, rows // unit * unit)
    return [slice(lo, min(lo + step, out_features)) for lo in range(0, out_features, step)]


def solve_rows(
    weight: torch.Tensor, h_diag: torch.Tensor, *, bits: int, group_size: int, method: str,
    device: torch.device, weight_name: str, rows: int = 0, dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """``quantize_tensor`` over blocks of ``rows`` rows (0: the whole weight at once), each cast
    to ``dtype`` on ``device`` when its turn comes; the parts on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {part: [] for part in Q_PARTS}
    for block in row_blocks(weight.shape[0], weight.shape[1], group_size, rows):
        w = weight[block].to(device=device, dtype=dtype or weight.dtype)
        q = quantize_tensor(
            w, h_diag, bits=bits, group_size=group_size, method=method, device=device,
            name=weight_name, backend=backend,
        )
        del w
        for part in Q_PARTS:
            parts[part].append(getattr(q, part).cpu())
        del q
    return {part: torch.cat(v) if len(v) > 1 else v[0] for part, v in parts.items()}


def run_solve(
    store: JobStore, layer_index: int, linear: str, weight: torch.Tensor, h_diag: torch.Tensor,
    *, bits: int, group_size: int, method: str, device: torch.device, weight_name: str,
    rows: int = 0, dtype: torch.dtype | None = None, backend: str = "auto",
) -> tuple[list[str], float]:
    """Quantize ``weight`` with ``h_diag`` (``rows`` rows at a time, in ``dtype``: the memory
    budget's), store codes/scale/zero_point/loss; return the array names and the total weighted
    loss. ``backend``: the solver's (neuqi.quant.solver.BACKENDS)."""
    parts = solve_rows(weight, h_diag, bits=bits, group_size=group_size, method=method,
                       device=device, weight_name=weight_name, rows=rows, dtype=dtype,
                       backend=backend)
    names = []
    for part in Q_PARTS:
        name = q_name(layer_index, linear, part)
        store.write_array(name, parts[part])
        names.append(name)
    return names, float(parts["loss"].sum())
