"""Supported architectures, as data: tensor names and the linear layout of each family.

Pure data and a lookup; no torch modules. :mod:`neuqi.model.checkpoint` reads names from here and
:mod:`neuqi.model.layers` builds the blocks, so both depend on this module and not on each other. A new
model family starts here: an :class:`ArchSpec` (or a family added to one) and its place in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from neuqi.util.errors import UserError

__all__ = [
    "ARCHITECTURES", "GEMMA", "GEMMA2", "GEMMA3", "LLAMA_LIKE", "MOE_FAMILIES", "PHI3",
    "SUPPORTED_FAMILIES", "ArchSpec", "MoELayout", "arch_for",
]


@dataclass(frozen=True)
class MoELayout:
    """Where a mixture-of-experts model's experts are (filled from the config by :func:`arch_for`).

    ``expert_linears``: the checkpoint's per-expert names of (gate, up, down), e.g. Mixtral's
    ``("w1", "w3", "w2")``; an expert's weight is ``{block}.experts.{e}.{name}.weight``.
    ``block``: the MoE block's module name in the checkpoint: ``mlp``, or Mixtral's
    ``block_sparse_moe`` as published (transformers renames it to ``mlp`` on load and back on
    save); ``other_blocks``: the other names a checkpoint of the family may use (Mixtral re-saved
    in transformers' names: ``mlp``), picked by :meth:`ArchSpec.for_names`. ``shared``: the
    shared expert's module (``mlp.shared_expert`` / ``mlp.shared_experts``) or ``""``.
    ``sparse_layers``: the layers whose MLP is the MoE block (the others are dense MLPs).
    The router (``{block}.gate``) and Qwen2-MoE's ``shared_expert_gate`` stay in full precision.
    """

    experts: int
    expert_linears: tuple[str, str, str]
    sparse_layers: tuple[int, ...]
    shared: str = ""
    block: str = "mlp"
    other_blocks: tuple[str, ...] = ()

    @property
    def router(self) -> str:
        """The router's module name in a decoder layer (``mlp.gate``, ``block_sparse_moe.gate``)."""
        return f"{self.block}.gate"

    def expert(self, e: int, linear: str) -> str:
        """Expert ``e``'s projection ``linear`` (a name of ``expert_linears``) in a layer."""
        return f"{self.block}.experts.{e}.{linear}"


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
    # What the dense families beyond LLaMA change (:mod:`neuqi.model.families` acts on these):
    # model_type -> transformers.models.<module>, where they differ (gemma3_text -> gemma3).
    modules: tuple[tuple[str, str], ...] = ()
    scaled_embedding: bool = False  # embeddings times sqrt(hidden), in the model dtype (Gemma)
    rope_per_layer_type: bool = False  # one rotary table per config.layer_types kind (Gemma 3)
    final_softcap_key: str | None = None  # config key: logits = c * tanh(logits / c) (Gemma 2)
    attn_softcap_key: str | None = None  # config key: attention soft-capping; needs eager
    moe: MoELayout | None = None  # mixture-of-experts families: set per config by arch_for

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index``'s MLP is a mixture of experts."""
        return self.moe is not None and index in self.moe.sparse_layers

    def groups(self, index: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``linear_groups`` of decoder layer ``index`` (an MoE layer: attention, the shared
        expert's ``mlp_in``/``shared_out``, then each expert's ``e{e}_in``/``e{e}_out``)."""
        if not self.is_moe_layer(index):
            return self.linear_groups
        assert self.moe is not None
        return _moe_groups(self.linear_groups, self.moe)

    def linears_of(self, index: int) -> tuple[str, ...]:
        """The quantized linears of decoder layer ``index``, in execution order."""
        return tuple(name for _, names in self.groups(index) for name in names)

    def group_in(self, index: int, linear: str) -> str:
        """The input (Hessian) group of ``linear`` in decoder layer ``index``."""
        return _group_by_linear(self.groups(index))[linear]

    def for_names(self, names: Collection[str]) -> ArchSpec:
        """This spec in the MoE block name that a checkpoint's tensor ``names`` use (Mixtral:
        ``block_sparse_moe`` as published, or ``mlp``); the published name where none of them
        holds the first sparse layer's first expert (its absence is then reported as missing)."""
        moe = self.moe
        if moe is None or not moe.other_blocks or not moe.sparse_layers:
            return self
        prefix = self.layer_prefix(moe.sparse_layers[0])
        for block in (moe.block, *moe.other_blocks):
            if f"{prefix}{block}.experts.0.{moe.expert_linears[0]}.weight" in names:
                return self.with_block(block)
        return self

    def with_block(self, block: str) -> ArchSpec:
        """This spec with the MoE block named ``block`` (one of the family's names)."""
        moe = self.moe
        if moe is None or block == moe.block:
            return self
        names = (moe.block, *moe.other_blocks)
        if block not in names:
            raise UserError(f"MoE block name {block!r}: this family's checkpoints use "
                            f"{' or '.join(names)}")
        others = tuple(b for b in names if b != block)
        return replace(self, moe=replace(moe, block=block, other_blocks=others))

    def layer_prefix(self, index: int) -> str:
        """Prefix of decoder layer ``index``'s tensor names, with the trailing dot."""
        return f"{self.layers_prefix}.{index}."

    @property
    def linears(self) -> tuple[str, ...]:
        """All linear names of a decoder layer, in execution order."""
        return tuple(name for _, names in self.linear_groups for name in names)

    def group_of(self, linear: str) -> str:
        """The input (Hessian) group a linear of a dense layer belongs to (any layer:
        :meth:`group_in`)."""
        return _group_by_linear(self.linear_groups)[linear]

    def class_prefix(self, family: str) -> str:
        """The transformers class-name prefix of ``family`` (``"llama"`` -> ``"Llama"``)."""
        return dict(self.class_prefixes)[family]

    def module_of(self, family: str) -> str:
        """The transformers.models sub-package of ``family`` (``"gemma3_text"`` -> ``"gemma3"``)."""
        return dict(self.modules).get(family, family)

    def attn_implementation(self, config: Any) -> str:
        """``eager`` where the config soft-caps attention logits (SDPA cannot), else ``sdpa``."""
        key = self.attn_softcap_key
        return "eager" if key is not None and _get(config, key) is not None else "sdpa"

    def final_softcap(self, config: Any) -> float | None:
        """The final-logit soft-capping constant, or None."""
        key = self.final_softcap_key
        value = None if key is None else _get(config, key)
        return None if value is None else float(value)


# Built once per layout: asked for every linear of every layer (a DeepSeek-V3 MoE layer has ~500
# input groups and ~770 linears).
@functools.cache
def _moe_groups(linear_groups: tuple[tuple[str, tuple[str, ...]], ...], moe: MoELayout
                ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = [(g, names) for g, names in linear_groups if not g.startswith("mlp")]
    if moe.shared:
        out += [("mlp_in", (f"{moe.shared}.gate_proj", f"{moe.shared}.up_proj")),
                ("shared_out", (f"{moe.shared}.down_proj",))]
    gate, up, down = moe.expert_linears
    for e in range(moe.experts):
        out += [(f"e{e}_in", (moe.expert(e, gate), moe.expert(e, up))),
                (f"e{e}_out", (moe.expert(e, down),))]
    return tuple(out)


@functools.cache
def _group_by_linear(groups: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, str]:
    return {name: group for group, names in groups for name in names}


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

_MLP_GROUPS = LLAMA_LIKE.linear_groups[2:]
_MOE_LIKE = ArchSpec(
    name="moe",
    families=("mixtral", "qwen2_moe", "qwen3_moe"),
    class_prefixes=(("mixtral", "Mixtral"), ("qwen2_moe", "Qwen2Moe"), ("qwen3_moe", "Qwen3Moe")),
    linear_groups=LLAMA_LIKE.linear_groups,
)
_DEEPSEEK = ArchSpec(
    name="deepseek-v3",
    families=("deepseek_v3",),
    class_prefixes=(("deepseek_v3", "DeepseekV3"),),
    linear_groups=(  # multi-head latent attention (q_lora_rank set: q_a/q_b, else q_proj)
        ("attn_in", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
        ("q_b_in", ("self_attn.q_b_proj",)),
        ("kv_b_in", ("self_attn.kv_b_proj",)),
        ("attn_out", ("self_attn.o_proj",)),
        *_MLP_GROUPS,
    ),
)
MOE_FAMILIES: tuple[str, ...] = (*_MOE_LIKE.families, *_DEEPSEEK.families)

_ATTN_MLP = LLAMA_LIKE.linear_groups
GEMMA = ArchSpec(name="gemma", families=("gemma",), class_prefixes=(("gemma", "Gemma"),),
                 linear_groups=_ATTN_MLP, scaled_embedding=True)
# Gemma 2: sandwich norms, local/global layers, attention and final-logit soft-capping.
GEMMA2 = ArchSpec(
    name="gemma2", families=("gemma2",), class_prefixes=(("gemma2", "Gemma2"),),
    linear_groups=_ATTN_MLP, scaled_embedding=True,
    final_softcap_key="final_logit_softcapping", attn_softcap_key="attn_logit_softcapping",
)
# Gemma 3 (text): as Gemma 2 plus q/k norms and a rotary base per layer kind (local / global).
GEMMA3 = ArchSpec(
    name="gemma3", families=("gemma3_text",), class_prefixes=(("gemma3_text", "Gemma3"),),
    modules=(("gemma3_text", "gemma3"),), linear_groups=_ATTN_MLP, scaled_embedding=True,
    rope_per_layer_type=True,
    final_softcap_key="final_logit_softcapping", attn_softcap_key="attn_logit_softcapping",
)
# Phi-3: q/k/v and gate/up are fused tensors in the checkpoint and quantized as stored. Groups
# run along the input dimension, so no group ever spans the q|k|v or gate|up boundary (rows).
PHI3 = ArchSpec(
    name="phi3", families=("phi3",), class_prefixes=(("phi3", "Phi3"),),
    linear_groups=(
        ("attn_in", ("self_attn.qkv_proj",)),
        ("attn_out", ("self_attn.o_proj",)),
        ("mlp_in", ("mlp.gate_up_proj",)),
        ("mlp_out", ("mlp.down_proj",)),
    ),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_LIKE, GEMMA, GEMMA2, GEMMA3, PHI3, _MOE_LIKE,
                                      _DEEPSEEK)
# Known model types neuqi refuses with a pointer to what it does quantize.
_HINTS = {
    "gemma3": "the multimodal Gemma 3 (language_model + vision tower); neuqi quantizes the "
              "text-only gemma3_text checkpoints",
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f for a in ARCHITECTURES for f in a.families)

# Config keys that mark a mixture-of-experts model even under a supported model_type.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def arch_for(config: Any, names: Collection[str] | None = None) -> ArchSpec:
    """The ArchSpec of a transformers config (or a config.json dict); UserError if unsupported.
    ``names``: the checkpoint's tensor names, where known: the MoE block is then named as they
    name it (:meth:`ArchSpec.for_names`), else as the family's published checkpoints do."""
    if names is not None:
        return arch_for(config).for_names(names)
    model_type = _get(config, "model_type")
    archs = _get(config, "architectures") or []
    shown = f"model_type {model_type!r}" + (f" ({', '.join(map(str, archs))})" if archs else "")
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type in MOE_FAMILIES:
        return _moe_arch(config, model_type)
    for arch in ARCHITECTURES:
        if model_type in arch.families:
            if any(_get(config, k) for k in _MOE_KEYS):
                raise UserError(
                    f"config.json: {shown} is a mixture-of-experts model under a dense "
                    f"model_type, which neuqi does not support; supported model_type: {supported}"
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
            if _get(config, "use_bidirectional_attention"):  # EmbeddingGemma: not a causal LM
                raise UserError(f"config.json: {shown} uses bidirectional attention (an embedding "
                                f"model); neuqi quantizes causal language models")
            return arch
    hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
    raise UserError(
        f"config.json: architecture {shown} is not supported{hint}; supported model_type: "
        f"{supported}"
    )


def _moe_arch(config: Any, model_type: str) -> ArchSpec:
    """The ArchSpec of an MoE config: its experts and which layers are sparse (defaults as
    transformers' config classes when config.json leaves a key out)."""
    layers = int(_get(config, "num_hidden_layers", 0) or 0)
    if model_type == "deepseek_v3":
        first_dense = int(_get(config, "first_k_dense_replace", 3))
        layout = MoELayout(int(_get(config, "n_routed_experts", None)
                               or _get(config, "num_local_experts", None) or 256),
                           ("gate_proj", "up_proj", "down_proj"),
                           tuple(range(first_dense, layers)),
                           "mlp.shared_experts" if _get(config, "n_shared_experts", 1) else "")
        groups = _DEEPSEEK.linear_groups
        if _get(config, "q_lora_rank", 1536) is None:
            groups = (("attn_in", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
                      *groups[2:])
        return replace(_DEEPSEEK, linear_groups=groups, moe=layout)
    if model_type == "mixtral":
        # published as block_sparse_moe; transformers' own name (mlp) also read
        layout = MoELayout(int(_get(config, "num_local_experts", 8)), ("w1", "w3", "w2"),
                           tuple(range(layers)), block="block_sparse_moe", other_blocks=("mlp",))
    else:
        experts = int(_get(config, "num_experts", None) or _get(config, "num_local_experts", None)
                      or (60 if model_type == "qwen2_moe" else 128))
        step = int(_get(config, "decoder_sparse_step", 1) or 1)
        dense = set(_get(config, "mlp_only_layers", None) or ())
        sparse = tuple(i for i in range(layers)
                       if i not in dense and experts > 0 and (i + 1) % step == 0)
        shared = "mlp.shared_expert" if model_type == "qwen2_moe" else ""
        layout = MoELayout(experts, ("gate_proj", "up_proj", "down_proj"), sparse, shared)
    return replace(_MOE_LIKE, moe=layout)
