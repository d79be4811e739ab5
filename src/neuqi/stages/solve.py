"""Stage `solve`: per-group scales and zero-points of one linear (NeUQI or a baseline)."""

from __future__ import annotations

import torch

from neuqi.pipeline.store import JobStore
from neuqi.solver import quantize_tensor
from neuqi.stages.common import Q_PARTS, q_name


def run_solve(
    store: JobStore, layer_index: int, linear: str, weight: torch.Tensor, h_diag: torch.Tensor,
    *, bits: int, group_size: int, method: str, device: torch.device, weight_name: str,
    backend: str = "auto",
) -> tuple[list[str], float]:
    """Quantize ``weight`` with ``h_diag`` (solver ``backend``: neuqi.solver.BACKENDS), store
    codes/scale/zero_point/loss; return the array names and the total weighted loss."""
    q = quantize_tensor(
        weight, h_diag, bits=bits, group_size=group_size, method=method, device=device,
        name=weight_name, backend=backend,
    )
    names = []
    for part in Q_PARTS:
        name = q_name(layer_index, linear, part)
        store.write_array(name, getattr(q, part).cpu())
        names.append(name)
    return names, float(q.loss.sum())
