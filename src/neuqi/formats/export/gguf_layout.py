"""The GGUF layout of each model family, as data: :data:`LAYOUTS` maps a ``model_type`` to its
:class:`Layout` (llama.cpp's architecture name, the q/k row permutation, the norm shift, the
family's metadata keys and the configs llama.cpp would run differently from transformers).
The writer (:mod:`neuqi.formats.export.gguf`) reads this table and nothing else about a family;
a new family is a row here and, where llama.cpp needs keys beyond LLaMA's, one ``_keys`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuqi.util.errors import UserError


def head_dim(c: Any) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def rope_parameters(c: Any, kind: str | None = None) -> dict[str, Any]:
    """The rope parameters of ``c`` (of layer kind ``kind`` where they are per kind)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if kind is not None and isinstance(rope.get(kind), dict):
        return rope[kind]
    if "rope_theta" not in rope and getattr(c, "rope_theta", None) is not None:
        rope["rope_theta"] = c.rope_theta
    return rope


def _defaultrope_parameters(c: Any, kind: str | None = None) -> str | None:
    rope = rope_parameters(c, kind)
    kind_name = rope.get("rope_type") or "default"
    if kind_name != "default":
        return f"rope_type {kind_name!r} (llama.cpp's file would need its scaling, not written)"
    return None


def _swa_pattern(c: Any, every: int) -> str | None:
    """llama.cpp's Gemma 2/3 fix the layer kinds: layer ``i`` is local unless ``(i + 1) % every
    == 0`` (llama_hparams::set_swa_pattern)."""
    want = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
            for i in range(c.num_hidden_layers)]
    got = list(getattr(c, "layer_types", None) or want)
    if got != want:
        full = [i for i, kind in enumerate(got) if kind != "sliding_attention"]
        return (f"layer_types global at layers {full} of {len(got)} (llama.cpp fixes one global "
                f"layer in every {every}, the others local)")
    return None


def _query_scale(c: Any, layers_27b: int) -> str | None:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the
    27B (known by its layer count); transformers by 1/sqrt(query_pre_attn_scalar)."""
    want = (c.hidden_size // c.num_attention_heads if c.num_hidden_layers == layers_27b
            else head_dim(c))
    if float(c.query_pre_attn_scalar) != float(want):
        return (f"query_pre_attn_scalar {c.query_pre_attn_scalar} (llama.cpp scales this "
                f"model's queries by 1/sqrt({want}))")
    return None


def _gelu_tanh(c: Any) -> str | None:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        return f"hidden_activation {act!r} (llama.cpp's Gemma uses the tanh GELU)"
    return None


def _all_sparse(c: Any) -> str | None:
    from neuqi.model.architectures import arch_for

    moe = arch_for(c).moe
    if moe is not None and tuple(moe.sparse_layers) != tuple(range(c.num_hidden_layers)):
        dense = sorted(set(range(c.num_hidden_layers)) - set(moe.sparse_layers))
        return (f"dense MLP layers {dense} among the MoE ones (mlp_only_layers / "
                f"decoder_sparse_step; llama.cpp has experts in every layer)")
    return None


def _phi3_rope_dims(c: Any) -> int:
    """convert_hf_to_gguf's Phi3MiniModel: ``int(partial_rotary_factor * hidden) // heads``."""
    factor = float(rope_parameters(c).get("partial_rotary_factor",
                                getattr(c, "partial_rotary_factor", None) or 1.0))
    return int(factor * c.hidden_size) // c.num_attention_heads


def _phi3_orig_ctx(c: Any) -> int | None:
    orig = (rope_parameters(c).get("original_max_position_embeddings")
            or getattr(c, "original_max_position_embeddings", None))
    return None if orig is None else int(orig)


def _longrope_attn_factor(c: Any) -> float:
    """LongRoPE's cos/sin scale as convert_hf_to_gguf writes it (transformers' default too):
    ``sqrt(1 + log(s) / log(orig))`` with ``s = max_position_embeddings / orig``, 1 if s <= 1."""
    orig = _phi3_orig_ctx(c) or int(c.max_position_embeddings)
    scale = c.max_position_embeddings / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def _phi3_refuse(c: Any) -> str | None:
    rope = rope_parameters(c)
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind not in ("longrope", "su"):
        return _defaultrope_parameters(c)
    half = _phi3_rope_dims(c) // 2
    if len(rope.get("long_factor") or ()) != half or len(rope.get("short_factor") or ()) != half:
        return f"longrope factors not of length {half} (half the rotated dimensions)"
    ours = _longrope_attn_factor(c)
    orig = _phi3_orig_ctx(c) or int(c.max_position_embeddings)
    factor = float(rope.get("factor") or c.max_position_embeddings / orig)
    theirs = rope.get("attention_factor")  # transformers' scale, as _compute_longrope_parameters
    if theirs is None:
        theirs = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
    if not math.isclose(float(theirs), ours, rel_tol=1e-6):
        return (f"longrope attention scale {float(theirs):.6g} (llama.cpp's phi3: "
                f"sqrt(1 + log(max_position_embeddings / original) / log(original)) = {ours:.6g})")
    return None


def _phi3_keys(w: Any, c: Any) -> None:
    import gguf

    w.add_rope_dimension_count(_phi3_rope_dims(c))
    if _phi3_orig_ctx(c):
        w.add_rope_scaling_orig_ctx_len(_phi3_orig_ctx(c))
    w.add_sliding_window(int(getattr(c, "sliding_window", None) or 0))  # 0: no sliding window
    rope = rope_parameters(c)
    if (rope.get("rope_type") or "default") in ("longrope", "su"):
        # LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): the per-dimension frequency divisors as two
        # F32 tensors (llama.cpp picks long or short by its context size), the cos/sin scale key
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(c))
        for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                          (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            w.add_tensor(f"{gguf.TENSOR_NAMES[kind]}.weight",
                         np.asarray(rope[key], dtype=np.float32))


def _gemma_refuse(c: Any) -> str | None:
    """Gemma 1 (llama.cpp's ``gemma``): the head is the token embedding, no attention biases,
    queries scaled by 1/sqrt(head_dim) as transformers does, the tanh GELU, plain RoPE."""
    if not getattr(c, "tie_word_embeddings", True):
        return "an untied lm_head (llama.cpp's gemma has no output tensor)"
    if getattr(c, "attention_bias", False):
        return "attention_bias (llama.cpp's gemma has no attention biases)"
    return _defaultrope_parameters(c) or _gelu_tanh(c)


def _gemma2_refuse(c: Any) -> str | None:
    if not getattr(c, "tie_word_embeddings", True):
        return "an untied lm_head (llama.cpp's gemma2 has no output tensor)"
    if getattr(c, "attn_logit_softcapping", None) is None:
        return "no attn_logit_softcapping (llama.cpp's gemma2 always soft-caps attention)"
    if getattr(c, "final_logit_softcapping", None) is None:
        return "no final_logit_softcapping (llama.cpp's gemma2 always soft-caps the logits)"
    return (_defaultrope_parameters(c) or _swa_pattern(c, 2) or _query_scale(c, 46) or _gelu_tanh(c))


def _gemma2_keys(w: Any, c: Any) -> None:
    w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(c.final_logit_softcapping))
    w.add_sliding_window(int(c.sliding_window))


def _gemma3_refuse(c: Any) -> str | None:
    if getattr(c, "attn_logit_softcapping", None) is not None:
        return "attn_logit_softcapping (llama.cpp's gemma3 does not soft-cap attention)"
    local = rope_parameters(c, "sliding_attention")
    if float(local.get("rope_theta", getattr(c, "rope_local_base_freq", 10000.0))) != 10000.0:
        return (f"local rope base {local.get('rope_theta')} (llama.cpp's gemma3 fixes 10000 for "
                f"the sliding layers)")
    if _defaultrope_parameters(c, "sliding_attention"):
        return "rope scaling on the sliding layers (llama.cpp's gemma3 scales the global ones)"
    if (rope_parameters(c, "full_attention").get("rope_type") or "default") not in ("default", "linear"):
        return _defaultrope_parameters(c, "full_attention")
    if _swa_pattern(c, 6) or _query_scale(c, 62) or _gelu_tanh(c):
        return _swa_pattern(c, 6) or _query_scale(c, 62) or _gelu_tanh(c)
    if getattr(c, "final_logit_softcapping", None) is not None:  # its local/global graph
        return "final_logit_softcapping (llama.cpp's gemma3 does not soft-cap the logits)"
    return None


def _gemma3_keys(w: Any, c: Any) -> None:
    import gguf

    full = rope_parameters(c, "full_attention")
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))  # the global layers'
    if (full.get("rope_type") or "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    w.add_sliding_window(int(c.sliding_window))


def experts_keys(w: Any, c: Any) -> None:
    from neuqi.model.architectures import arch_for

    moe = arch_for(c).moe
    assert moe is not None
    w.add_expert_count(moe.experts)
    w.add_expert_used_count(int(c.num_experts_per_tok))
    width = getattr(c, "moe_intermediate_size", None)
    if width:
        w.add_expert_feed_forward_length(int(width))
    shared = getattr(c, "shared_expert_intermediate_size", None)
    if shared:
        w.add_expert_shared_feed_forward_length(int(shared))


def _deepseek_refuse(c: Any) -> str | None:
    """DeepSeek-V3 as llama.cpp's ``deepseek2`` runs it: rotary on interleaved pairs (its NORM
    rope = transformers' ``rope_interleave``), no attention biases, sigmoid routing (transformers'
    DeepseekV3 always uses it). YaRN only where llama.cpp's attention scale is transformers':
    llama.cpp scales q·k by ``(1 + yarn_log_mul·ln s)² / sqrt(d)`` with ``yarn_log_mul = 0.1 ·
    mscale_all_dim`` and leaves cos/sin unscaled, which is transformers' computation when
    ``mscale == mscale_all_dim`` (its cos/sin factor ``mscale(s, mscale) / mscale(s,
    mscale_all_dim)`` is then 1) and no ``attention_factor`` overrides it."""
    if not getattr(c, "rope_interleave", True):
        return "rope_interleave False (llama.cpp's deepseek2 rotates interleaved pairs)"
    if getattr(c, "attention_bias", False):
        return "attention_bias (llama.cpp's deepseek2 has no attention biases)"
    score = getattr(c, "scoring_func", None) or "sigmoid"
    if score != "sigmoid":
        return f"scoring_func {score!r} (transformers' DeepseekV3 routes by sigmoid)"
    rope = rope_parameters(c)
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        return _defaultrope_parameters(c)
    if rope.get("attention_factor") is not None:
        return ("a yarn attention_factor (llama.cpp's deepseek2 derives its attention scale from "
                "mscale_all_dim alone)")
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if not m_all or float(m or 0.0) != float(m_all):
        return (f"yarn mscale {m} and mscale_all_dim {m_all} (llama.cpp's deepseek2 runs "
                f"transformers' scaling only where both are equal and set)")
    if not rope.get("original_max_position_embeddings"):
        return "yarn without original_max_position_embeddings"
    return None


def _deepseek_keys(w: Any, c: Any) -> None:
    """convert_hf_to_gguf's DeepseekV2Model (and TextModel) keys: MLA written as MQA with one KV
    head of width kv_lora_rank + rope dims, the first dense layers, shared experts, the expert
    groups, sigmoid gating, routed scaling, top-k renormalization, YaRN."""
    import gguf

    rank, rope_dims = int(c.kv_lora_rank), int(c.qk_rope_head_dim)
    w.add_head_count_kv(1)
    w.add_key_length(rank + rope_dims)
    w.add_value_length(rank)
    w.add_key_length_mla(int(c.qk_nope_head_dim) + rope_dims)
    w.add_value_length_mla(int(c.v_head_dim))
    w.add_kv_lora_rank(rank)
    if getattr(c, "q_lora_rank", None) is not None:
        w.add_q_lora_rank(int(c.q_lora_rank))
    w.add_rope_dimension_count(rope_dims)
    w.add_leading_dense_block_count(int(c.first_k_dense_replace))
    w.add_expert_shared_count(int(getattr(c, "n_shared_experts", None) or 0))
    w.add_expert_weights_scale(float(c.routed_scaling_factor))
    if getattr(c, "norm_topk_prob", False):
        w.add_expert_weights_norm(True)
    if getattr(c, "n_group", None) is not None:
        w.add_expert_group_count(int(c.n_group))
    if getattr(c, "topk_group", None) is not None:
        w.add_expert_group_used_count(int(c.topk_group))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    rope = rope_parameters(c)
    if (rope.get("rope_type") or "default") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: 0.1 * mscale_all_dim, as the converter writes it
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))


def _topk_norm(want: bool | None) -> Callable[[Any], str | None]:
    """The refusal of an MoE family whose top-k router weights llama.cpp renormalizes (``want``
    True), does not (False), or as transformers always does (None: Mixtral)."""
    def refuse(c: Any) -> str | None:
        if want is not None and bool(getattr(c, "norm_topk_prob", False)) != want:
            return (f"norm_topk_prob {getattr(c, 'norm_topk_prob', None)} (llama.cpp "
                    f"{'renormalizes' if want else 'does not renormalize'} this family's top-k "
                    f"router weights)")
        return _defaultrope_parameters(c) or _all_sparse(c)
    return refuse


def _nothing(_c: Any) -> str | None:
    return None


def _no_keys(_w: Any, _c: Any) -> None:
    return None


@dataclass(frozen=True)
class Layout:
    """How a model family is written: llama.cpp's architecture (``gguf.MODEL_ARCH_NAMES``) and
    what differs from LLaMA's file. Tensor names come from the gguf package's map of that
    architecture (``self_attn.qkv_proj`` -> ``attn_qkv``, ``mlp.gate`` -> ``ffn_gate_inp``, ...);
    experts are stacked per layer and projection into ``ffn_{gate,up,down}_exps``."""

    arch: str
    permute_qk: bool = False  # convert_hf_to_gguf's q/k row permutation (LLaMA's rotary)
    norm_shift: float = 0.0  # added to every norm weight: Gemma's (1 + w) RMSNorm stored as w + 1
    keys: Callable[[Any, Any], None] = _no_keys  # the family's metadata beyond LLaMA's
    # why llama.cpp would run a config differently from transformers (the export is refused)
    refuse: Callable[[Any], str | None] = _nothing
    rope_warning: bool = False  # LLaMA-likes: a rope scaling is warned about, not refused


_LLAMA = Layout("llama", permute_qk=True, rope_warning=True)
# model_type -> its GGUF layout: the one place a family's file is described
LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": Layout("qwen2", rope_warning=True),
    "qwen3": Layout("qwen3", rope_warning=True),
    "phi3": Layout("phi3", keys=_phi3_keys, refuse=_phi3_refuse),
    "gemma": Layout("gemma", norm_shift=1.0, refuse=_gemma_refuse),
    "gemma2": Layout("gemma2", norm_shift=1.0, keys=_gemma2_keys, refuse=_gemma2_refuse),
    "gemma3_text": Layout("gemma3", norm_shift=1.0, keys=_gemma3_keys, refuse=_gemma3_refuse),
    # experts stacked into ffn_{gate,up,down}_exps; routers (ffn_gate_inp, Qwen2-MoE's shared
    # expert gate ffn_gate_inp_shexp) in F32; expert count and widths in the keys
    "mixtral": Layout("llama", permute_qk=True, refuse=_topk_norm(None)),
    "qwen2_moe": Layout("qwen2moe", refuse=_topk_norm(False)),
    "qwen3_moe": Layout("qwen3moe", refuse=_topk_norm(True)),
    # multi-head latent attention: kv_b_proj split into attn_k_b (transposed) / attn_v_b; the
    # first dense layers, shared experts (ffn_*_shexp), e_score_correction_bias as exp_probs_b
    "deepseek_v3": Layout("deepseek2", keys=_deepseek_keys, refuse=_deepseek_refuse),
}

def resolved(config: dict[str, Any] | Any) -> Any:
    """The transformers config of a config.json dict (its class's defaults filled in)."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(str(config.get("model_type")), **values)
    except Exception as e:  # noqa: BLE001 - whatever the config class rejects
        why = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
        raise UserError(f"config.json: transformers' {config.get('model_type')} config class "
                        f"rejects it ({why})") from None


def check_family(config: dict[str, Any] | str, where: object) -> None:
    """UserError (one line) for a model family this writer has no GGUF layout for, or a config
    of one that llama.cpp would run differently from transformers. ``config``: the config.json
    dict (or a bare model_type, which checks the family only)."""
    model_type = config if isinstance(config, str) else str(config.get("model_type"))
    if model_type not in LAYOUTS:
        raise UserError(
            f"{where}: model_type {model_type!r} has no GGUF export (GGUF: "
            f"{', '.join(sorted(LAYOUTS))}); use --format compressed-tensors"
        )
    if isinstance(config, str):
        return
    why = LAYOUTS[model_type].refuse(resolved(config))
    if why:
        raise UserError(f"{where}: {model_type} with {why}: no GGUF export that llama.cpp would "
                        f"run as transformers does; use --format compressed-tensors")
