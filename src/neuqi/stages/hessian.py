"""Stage `hessian`: the diagonal of each linear input's calibration Hessian, for one layer.

For every distinct input of the layer (q/k/v share one, gate/up share one, o and down have their
own) it accumulates ``sum x_j²`` over all calibration tokens by running the full-precision layer
over the layer's stored inputs, then ``h_j = mean x_j² + 1% of the mean of the diagonal`` (the
damping of the design note). Accumulation is in float64, in a fixed order, so it is reproducible.
With ``full`` (GPTQ) it also stores each input's full Hessian ``XᵀX / tokens`` (`neuqi.stages.gptq`).
"""

from __future__ import annotations

import torch
from torch import nn

from neuqi.models import ArchSpec, layer_forward, position_embeddings_for
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import acts_name, batches, h_name
from neuqi.stages.gptq import accumulate_hessian, hessian_name, write_hessian

DAMPING = 0.01  # fraction of the mean diagonal added to every h_j (design note, section 2)


def run_hessian(
    store: JobStore, layer_index: int, layer: nn.Module, arch: ArchSpec, rotary: nn.Module,
    batch_size: int, device: torch.device, full: bool = False,
) -> list[str]:
    sums: dict[str, torch.Tensor] = {}
    full_sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    hooks = []
    for group, linears in arch.linear_groups:
        module = layer.get_submodule(linears[0])

        def hook(_module: nn.Module, args: tuple, group: str = group) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            sq = (x * x).sum(0)
            sums[group] = sq if group not in sums else sums[group] + sq
            tokens[group] = tokens.get(group, 0) + x.shape[0]
            if full:
                full_sums[group] = accumulate_hessian(full_sums.get(group), args[0])

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for _, hidden in batches(store, acts_name(layer_index), batch_size, device):
                layer_forward(layer, hidden, position_embeddings_for(rotary, hidden))
    finally:
        for handle in hooks:
            handle.remove()
    names = []
    for group, _ in arch.linear_groups:
        h = sums[group] / tokens[group]
        h = h + DAMPING * h.mean()
        name = h_name(layer_index, group)
        store.write_array(name, h.to(torch.float32).cpu())
        names.append(name)
        if full:
            name = hessian_name(layer_index, group)
            write_hessian(store, name, full_sums.pop(group).div_(tokens[group]))
            names.append(name)
    return names
