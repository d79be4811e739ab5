"""Names in the job store and small helpers shared by the stages."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from neuqi.pipeline.store import JobStore


def acts_name(layer: int) -> str:
    """Inputs of decoder layer ``layer`` for every calibration window: ``[N, seqlen, hidden]``."""
    return f"acts/{layer}"


def h_name(layer: int, group: str) -> str:
    """Hessian diagonal of one input of layer ``layer`` (``group`` as in ArchSpec.linear_groups)."""
    return f"layers/{layer}/h/{group}"


def q_name(layer: int, linear: str, part: str) -> str:
    """Quantized parameters of one linear: part in codes, scale, zero_point, loss."""
    return f"layers/{layer}/q/{linear}/{part}"


Q_PARTS = ("codes", "scale", "zero_point", "loss")


def batches(store: JobStore, name: str, batch_size: int, device: torch.device) -> Iterator[
    tuple[int, torch.Tensor]
]:
    """(first row, rows) of array ``name`` in batches of ``batch_size`` rows, on ``device``."""
    total = store.array_shape(name)[0]
    for start in range(0, total, batch_size):
        rows = slice(start, min(start + batch_size, total))
        yield start, store.read_array(name, device=device, rows=rows)
