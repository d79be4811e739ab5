"""Stages of block-wise distillation (``neuqi quantize --distill-steps N``).

``forward_fp``: the full-precision layer over the full-precision inputs ``acts_fp/i`` gives
``acts_fp/i+1``: the next layer's full-precision inputs and this layer's distillation target.

``distill``: with the codes frozen, this layer's scales and zero-points (optionally its RMSNorm
weights) are trained so that the layer on the quantized model's inputs (``acts/i``) matches the
full-precision layer on the full-precision inputs (mean squared error, batch 1, AdamW with the
recipe of :mod:`neuqi.quant.distill`). The trained parameters are stored beside the solved ones
(``.../scale_d``, ``.../zero_point_d``, ``layers/i/norm/...``) and used by the sequential forward
and by pack once the ``distill/i`` record exists (:func:`neuqi.stages.common.quant_params`).

A killed layer is redone from the start; training is deterministic, so the result is the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuqi.model.layers import ArchSpec, layer_forward, position_embeddings_for
from neuqi.pipeline.store import JobStore
from neuqi.quant.distill import DistillSettings, Trainer, trainable_parameters, with_quant_linears
from neuqi.stages.common import (
    acts_name,
    batches,
    distilled_name,
    fp_acts_name,
    norm_name,
    q_name,
)

TRAIN_DTYPE = torch.float32


def run_forward_fp(
    store: JobStore, layer_index: int, layer: nn.Module, rotary: nn.Module, dtype: torch.dtype,
    batch_size: int, device: torch.device,
) -> list[str]:
    """``acts_fp/i+1`` from the full-precision ``layer`` over ``acts_fp/i``."""
    src, dst = fp_acts_name(layer_index), fp_acts_name(layer_index + 1)
    store.create_array(dst, store.array_shape(src), dtype, chunks=1)
    with torch.no_grad():
        for start, hidden in batches(store, src, batch_size, device):
            out = layer_forward(layer, hidden, position_embeddings_for(rotary, hidden))
            store.write_rows(dst, start, out.to(dtype).cpu())
    return [dst]


def run_distill(
    store: JobStore, layer_index: int, layer: nn.Module, arch: ArchSpec, rotary: nn.Module, *,
    group_size: int, steps: int, lr: float, norms: bool, seed: int, device: torch.device,
) -> tuple[list[str], dict[str, Any]]:
    """Train layer ``layer_index``'s continuous parameters; ``layer`` is the full-precision layer
    (left unchanged). Returns the stored array names and the record's info (MSE before/after)."""
    i = layer_index
    linears = {
        lin: tuple(store.read_array(q_name(i, lin, p), device=device)
                   for p in ("codes", "scale", "zero_point"))
        for lin in arch.linears_of(i)
    }
    student = with_quant_linears(layer, linears, group_size).to(TRAIN_DTYPE)
    params = trainable_parameters(student, norms)
    src, target = acts_name(i), fp_acts_name(i + 1)
    n = store.array_shape(src)[0]

    def pair(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(j, j + 1)
        x = store.read_array(src, device=device, rows=rows).to(TRAIN_DTYPE)
        y = store.read_array(target, device=device, rows=rows).to(TRAIN_DTYPE)
        return x, y

    def loss_of(j: int) -> torch.Tensor:
        x, y = pair(j)
        return F.mse_loss(layer_forward(student, x, position_embeddings_for(rotary, x)), y)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(j).double()) for j in range(n)) / n

    settings = DistillSettings(steps=steps, lr=lr, seed=seed)
    before = mean_loss()
    trainer = Trainer(params, settings, n, loss_of)
    trainer.train()
    after = mean_loss()

    names: list[str] = []
    for lin in arch.linears_of(i):
        module = student.get_submodule(lin)
        for part in ("scale", "zero_point"):
            name = distilled_name(i, lin, part)
            store.write_array(name, getattr(module, part).detach().to(torch.float32).cpu())
            names.append(name)
    norm_arrays: dict[str, str] = {}
    if norms:
        for pname, param in params.items():
            if pname.endswith(("scale", "zero_point")):
                continue
            name = norm_name(i, pname)
            store.write_array(name, param.detach().to(torch.float32).cpu())
            norm_arrays[pname] = name
            names.append(name)
    info = {"mse_before": before, "mse_after": after, "steps": steps, "norms": norm_arrays}
    return names, info


def load_distilled_norms(store: JobStore, layer: nn.Module, norms: dict[str, str]) -> None:
    """Give ``layer`` its distilled RMSNorm weights (relative name -> array name)."""
    with torch.no_grad():
        for pname, array in norms.items():
            param = layer.get_parameter(pname)
            param.copy_(store.read_array(array, device=param.device).to(param.dtype))
