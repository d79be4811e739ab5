"""Supported architectures, as data: tensor names and the linear layout of each family.

Pure data and a lookup; no torch modules. :mod:`neuqi.checkpoint` reads names from here and
:mod:`neuqi.models` builds the blocks, so both depend on this module and not on each other. A new
model family starts here: an :class:`ArchSpec` (or a family added to one) and its place in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuqi.errors import UserError

__all__ = ["ARCHITECTURES", "LLAMA_LIKE", "SUPPORTED_FAMILIES", "ArchSpec", "arch_for"]


@dataclass(frozen=True)
class ArchSpec:
    """Tensor names and linear layout shared by a set of model families (``config.model_type``).

    ``linear_groups`` is ordered as the layer runs: ``(input_name, (linear, ...))``; the linears of
    one group read the same input, so they share one Hessian.  Linear names are relative to a
    decoder layer (``self_attn.q_proj``); the tensor is ``f"{layer_prefix(i)}{name}.weight"``.
    """

    name: str
    families: tuple[str, ...]
    # model_type -> prefix of the transformers classes: transformers.models.<family>.modeling_<family>
    # .<Prefix>DecoderLayer / <Prefix>RMSNorm / <Prefix>RotaryEmbedding.
    class_prefixes: tuple[tuple[str, str], ...]
    linear_groups: tuple[tuple[str, tuple[str, ...]], ...]
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def layer_prefix(self, index: int) -> str:
        """Prefix of decoder layer ``index``'s tensor names, with the trailing dot."""
        return f"{self.layers_prefix}.{index}."

    @property
    def linears(self) -> tuple[str, ...]:
        """All linear names of a decoder layer, in execution order."""
        return tuple(name for _, names in self.linear_groups for name in names)

    def group_of(self, linear: str) -> str:
        """The input (Hessian) group a linear belongs to."""
        for group, names in self.linear_groups:
            if linear in names:
                return group
        raise KeyError(linear)

    def class_prefix(self, family: str) -> str:
        """The transformers class-name prefix of ``family`` (``"llama"`` -> ``"Llama"``)."""
        return dict(self.class_prefixes)[family]


LLAMA_LIKE = ArchSpec(
    name="llama-like",
    families=("llama", "mistral", "qwen2", "qwen3"),
    class_prefixes=(
        ("llama", "Llama"),
        ("mistral", "Mistral"),
        ("qwen2", "Qwen2"),
        ("qwen3", "Qwen3"),
    ),
    linear_groups=(
        ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("attn_out", ("self_attn.o_proj",)),
        ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp_out", ("mlp.down_proj",)),
    ),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_LIKE,)
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f for a in ARCHITECTURES for f in a.families)

# Config keys that mark a mixture-of-experts model even under a supported model_type.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def arch_for(config: Any) -> ArchSpec:
    """The ArchSpec of a transformers config (or a config.json dict); UserError if unsupported."""
    model_type = _get(config, "model_type")
    archs = _get(config, "architectures") or []
    shown = f"model_type {model_type!r}" + (f" ({', '.join(map(str, archs))})" if archs else "")
    supported = ", ".join(SUPPORTED_FAMILIES)
    for arch in ARCHITECTURES:
        if model_type in arch.families:
            if any(_get(config, k) for k in _MOE_KEYS):
                raise UserError(
                    f"config.json: {shown} is a mixture-of-experts model, which neuqi does not "
                    f"support; supported dense families: {supported}"
                )
            heterogeneous = (
                bool(config.get("per_layer_config"))
                if isinstance(config, Mapping)
                else bool(getattr(config, "is_heterogeneous", False))
            )
            if heterogeneous:
                raise UserError(
                    f"config.json: {shown} has per_layer_config (layers of different shapes), "
                    f"which neuqi does not support"
                )
            return arch
    raise UserError(
        f"config.json: architecture {shown} is not supported; supported model_type: {supported}"
    )
