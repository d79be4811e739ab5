"""Mixture-of-experts blocks run with one ``nn.Linear`` per expert projection.

transformers (5.x) fuses a layer's experts into 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), while checkpoints on disk keep one tensor per expert and projection
(``block_sparse_moe.experts.{e}.w1/w3/w2`` for Mixtral as published, ``mlp.experts.{e}.
gate_proj/up_proj/down_proj`` for Qwen-MoE and DeepSeek-V3). :func:`unfuse_experts` swaps each
fused experts module of a transformers layer or model for :class:`ExpertLinears`, whose
submodules carry the checkpoint's names (the MoE block too: Mixtral's ``block_sparse_moe``, which
transformers renames ``mlp``), so that every expert's projection is just another linear: read
alone, solved alone, hooked alone for its Hessian. The router (``{block}.gate``) and the rest of
the MoE block stay transformers' own code.

Hessian calibration (``--moe-calibration``): with ``routed`` each expert's linears see only the
tokens the router sends to them (their Hessian is the routed tokens'); with ``all``
(:func:`calibrate_all_tokens`) every expert is also run over all tokens while the Hessian is
accumulated (its output for the unrouted tokens is discarded, so the layer's output is unchanged).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from neuqi.model.architectures import ArchSpec

__all__ = [
    "MOE_CALIBRATION",
    "MOE_MIN_TOKENS",
    "Expert",
    "ExpertLinears",
    "calibrate_all_tokens",
    "unfuse_experts",
]

#: ``--moe-calibration`` choices: the tokens an expert's Hessian is accumulated over.
MOE_CALIBRATION = ("routed", "all")
#: An expert that receives fewer calibration tokens than this uses the layer's all-token
#: statistics instead (:func:`neuqi.stages.hessian.write_hessian`).
MOE_MIN_TOKENS = 64


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its three linears under the checkpoint's names."""

    def __init__(self, hidden: int, intermediate: int, names: tuple[str, str, str],
                 act: nn.Module) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """A layer's routed experts as a list of :class:`Expert` (``experts.{e}.<name>``), called as
    transformers' fused experts are: ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    Tokens are gathered per expert in the same order and summed with ``index_add_`` as
    transformers does, so the output equals the fused module's to rounding.
    """

    all_tokens = False  # set by calibrate_all_tokens while the Hessian is accumulated

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            if self.all_tokens:
                y = expert(hidden)[token_idx]
            elif token_idx.numel():
                y = expert(hidden[token_idx])
            else:
                continue
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _fused(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj")
            and isinstance(getattr(module, "down_proj", None), nn.Parameter))


def unfuse_experts(root: nn.Module, arch: ArchSpec) -> nn.Module:
    """Replace every fused experts module under ``root`` (a decoder layer or a whole model) by an
    :class:`ExpertLinears` with ``arch``'s per-expert names, built on the same device (meta for
    a layer being built) and holding the fused module's weights where it has any; returns
    ``root``. Its MoE block is registered under the checkpoint's block name
    (``arch.moe.block``, e.g. Mixtral's published ``block_sparse_moe``), so that the module
    names, the state dict and the checkpoint's tensor names are one set; transformers' forward
    still finds it as ``mlp``."""
    if arch.moe is None:
        return root
    for name, module in list(root.named_modules()):
        if not _fused(module):
            continue
        experts, two_i, hidden = module.gate_up_proj.shape
        device = module.gate_up_proj.device
        with torch.device(device):
            new = ExpertLinears(
                Expert(hidden, two_i // 2, arch.moe.expert_linears, module.act_fn)
                for _ in range(experts)
            )
        if device.type != "meta":  # a model with weights (a test checkpoint being written)
            new.to(module.gate_up_proj.dtype)
            _copy_fused(module, new)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
        _name_block(root, parent, arch.moe.block)
    return root


def _copy_fused(fused: nn.Module, experts: ExpertLinears) -> None:
    """The fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` into each expert."""
    gate_up_proj = cast(torch.Tensor, fused.gate_up_proj)
    down_proj = cast(torch.Tensor, fused.down_proj)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            gate, up, down = (getattr(expert, n) for n in cast(Expert, expert).names)
            g, u = gate_up_proj[e].chunk(2, dim=0)
            gate.weight.copy_(g)
            up.weight.copy_(u)
            down.weight.copy_(down_proj[e])


def _name_block(root: nn.Module, path: str, block: str) -> None:
    """Register the MoE block at ``path`` (``...layers.{i}.mlp``) under its decoder layer as
    ``block``; the layer keeps ``mlp`` as a plain attribute (not a submodule) for its forward."""
    layer_path, _, child = path.rpartition(".")
    if not child or child == block:
        return
    layer = root.get_submodule(layer_path) if layer_path else root
    module = layer._modules.pop(child)
    layer.add_module(block, module)
    object.__setattr__(layer, child, module)  # seen by `self.mlp`, not by named_modules


def calibrate_all_tokens(layer: nn.Module, on: bool) -> None:
    """Run every expert of ``layer`` over all tokens (``on``) or only its routed ones."""
    for module in layer.modules():
        if isinstance(module, ExpertLinears):
            module.all_tokens = on
