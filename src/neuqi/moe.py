"""Mixture-of-experts blocks run with one ``nn.Linear`` per expert projection.

transformers (5.x) fuses a layer's experts into 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), while checkpoints on disk keep one tensor per expert and projection
(``mlp.experts.{e}.w1/w3/w2`` for Mixtral, ``gate_proj/up_proj/down_proj`` for Qwen-MoE and
DeepSeek-V3). :func:`unfuse_experts` swaps each fused experts module of a transformers layer or
model for :class:`ExpertLinears`, whose submodules carry the checkpoint's names, so that every
expert's projection is just another linear: read alone, solved alone, hooked alone for its
Hessian. The router (``mlp.gate``) and the rest of the MoE block stay transformers' own code.

Hessian calibration (``--moe-calibration``): with ``routed`` each expert's linears see only the
tokens the router sends to them (their Hessian is the routed tokens'); with ``all``
(:func:`calibrate_all_tokens`) every expert is also run over all tokens while the Hessian is
accumulated (its output for the unrouted tokens is discarded, so the layer's output is unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neuqi.architectures import ArchSpec

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
    a layer being built); returns ``root``."""
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
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    return root


def calibrate_all_tokens(layer: nn.Module, on: bool) -> None:
    """Run every expert of ``layer`` over all tokens (``on``) or only its routed ones."""
    for module in layer.modules():
        if isinstance(module, ExpertLinears):
            module.all_tokens = on


def experts_state_from_fused(state: dict[str, Any], arch: ArchSpec) -> dict[str, Any]:
    """A transformers state dict with fused experts (``...experts.gate_up_proj [E, 2I, H]``,
    ``...experts.down_proj [E, H, I]``) in the checkpoint's per-expert names."""
    assert arch.moe is not None
    gate, up, down = arch.moe.expert_linears
    out = {}
    for key, t in state.items():
        if key.endswith("experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            g, u = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.{gate}.weight"] = g[e].contiguous()
                out[f"{base}{e}.{up}.weight"] = u[e].contiguous()
        elif key.endswith("experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.{down}.weight"] = t[e].contiguous()
        else:
            out[key] = t
    return out
