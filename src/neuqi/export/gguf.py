"""Export to a GGUF file that llama.cpp runs (written with the ``gguf`` package).

Quantized linears:

* ``Q4_1`` / ``Q5_1``: blocks of 32 weights with an fp16 scale ``d`` and an fp16 offset ``m``,
  ``ŵ = d·q + m``. That is NeUQI's ``ŵ = s·(q - z)`` with group 32 and ``m = -s·z``, float
  zero-point included: an output quantized with 4 (5) bits and groups of 32, 64, 128, ... (each
  group is blocks of 32 with its (s, z)) is written with its own codes, losing only the fp16
  rounding of ``s`` and ``-s·z``. Other outputs (other bits, groups of 16) are re-solved at
  group 32 with the same method and Hessian.
* ``Q4_K`` / ``Q5_K`` / ``Q2_K``: super-blocks of 256 with quantized sub-block scales and minimums,
  solved under that constraint (:mod:`neuqi.export.kquants`). A row length that is not a multiple
  of 256 cannot be a K-quant: such tensors are written as Q4_1 (Q5_1 for Q5_K), as llama.cpp's own
  quantizer also falls back.

The other tensors are written as llama.cpp's converter writes them with ``--outtype q8_0``
(``convert_hf_to_gguf.py``): two-dimensional ones (the token embedding, an untied head) as
``Q8_0`` (blocks of 32 int8 with an fp16 scale; F16 when a row is not a multiple of 32), norms and
biases as F32. So the file is about the size of the native output or smaller (the token embedding
of a small model is a large part of it), not larger. Tensor names, metadata and
the tokenizer (``tokenizer.ggml.*``: a byte-level BPE tokenizer.json as ``gpt2``, a SentencePiece
tokenizer.model as ``llama``, :mod:`neuqi.export.spm`) follow llama.cpp's
``convert_hf_to_gguf.py``, including its row permutation of LLaMA's q/k projections (llama.cpp
applies rotary embeddings to interleaved pairs, transformers to halves).

Families (:data:`LAYOUTS`, the one table of what differs per family): LLaMA / Mistral / Mixtral
(``llama``), Qwen2 / Qwen3, Phi-3 (``phi3``: fused ``attn_qkv`` and ``ffn_up`` = gate | up), Gemma,
Gemma 2 / 3 (norms stored as 1 + w), Qwen2-MoE / Qwen3-MoE, DeepSeek-V3 (``deepseek2``: latent
attention with ``kv_b_proj`` split into ``attn_k_b`` / ``attn_v_b`` as the current converter does,
shared experts, the first dense layers, ``e_score_correction_bias`` as ``exp_probs_b``). A mixture
of experts' expert linears are stacked per layer and projection into 3-D
``ffn_{gate,up,down}_exps``; routers stay F32. What
llama.cpp fixes for an architecture instead of reading it from the file (Gemma's layer kinds and
query scale, Qwen-MoE's top-k renormalization, ...) is checked against the config, and a config
llama.cpp would run differently from transformers is refused (:func:`check_family`), as is a
tokenizer llama.cpp would tokenize differently (:func:`check_tokenizer`: a SentencePiece-style
tokenizer.json without its tokenizer.model, Unigram and normalizing SentencePiece models).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuqi.errors import UserError
from neuqi.export.common import AtomicTarget, ExportSource, NativeLinear
from neuqi.export.kquants import KSPECS, SUPER, KQuantized, solve_kquant
from neuqi.export.spm import check_model, processor, read_spec, vocabulary
from neuqi.solver import quantize_tensor

BLOCK = 32  # weights per Q4_1 / Q5_1 block
TYPES = ("Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q2_K")
_FALLBACK = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q2_K": "Q4_1"}
_BLOCK_BITS = {"Q4_1": 4, "Q5_1": 5}


# ------------------------------------------------------------------------------ the families
def _head_dim(c: Any) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _rope(c: Any, kind: str | None = None) -> dict[str, Any]:
    """The rope parameters of ``c`` (of layer kind ``kind`` where they are per kind)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if kind is not None and isinstance(rope.get(kind), dict):
        return rope[kind]
    if "rope_theta" not in rope and getattr(c, "rope_theta", None) is not None:
        rope["rope_theta"] = c.rope_theta
    return rope


def _default_rope(c: Any, kind: str | None = None) -> str | None:
    rope = _rope(c, kind)
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
            else _head_dim(c))
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
    from neuqi.architectures import arch_for

    moe = arch_for(c).moe
    if moe is not None and tuple(moe.sparse_layers) != tuple(range(c.num_hidden_layers)):
        dense = sorted(set(range(c.num_hidden_layers)) - set(moe.sparse_layers))
        return (f"dense MLP layers {dense} among the MoE ones (mlp_only_layers / "
                f"decoder_sparse_step; llama.cpp has experts in every layer)")
    return None


def _phi3_rope_dims(c: Any) -> int:
    """convert_hf_to_gguf's Phi3MiniModel: ``int(partial_rotary_factor * hidden) // heads``."""
    factor = float(_rope(c).get("partial_rotary_factor",
                                getattr(c, "partial_rotary_factor", None) or 1.0))
    return int(factor * c.hidden_size) // c.num_attention_heads


def _phi3_orig_ctx(c: Any) -> int | None:
    orig = (_rope(c).get("original_max_position_embeddings")
            or getattr(c, "original_max_position_embeddings", None))
    return None if orig is None else int(orig)


def _longrope_attn_factor(c: Any) -> float:
    """LongRoPE's cos/sin scale as convert_hf_to_gguf writes it (transformers' default too):
    ``sqrt(1 + log(s) / log(orig))`` with ``s = max_position_embeddings / orig``, 1 if s <= 1."""
    orig = _phi3_orig_ctx(c) or int(c.max_position_embeddings)
    scale = c.max_position_embeddings / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def _phi3_refuse(c: Any) -> str | None:
    rope = _rope(c)
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind not in ("longrope", "su"):
        return _default_rope(c)
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
    rope = _rope(c)
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
    return _default_rope(c) or _gelu_tanh(c)


def _gemma2_refuse(c: Any) -> str | None:
    if not getattr(c, "tie_word_embeddings", True):
        return "an untied lm_head (llama.cpp's gemma2 has no output tensor)"
    if getattr(c, "attn_logit_softcapping", None) is None:
        return "no attn_logit_softcapping (llama.cpp's gemma2 always soft-caps attention)"
    if getattr(c, "final_logit_softcapping", None) is None:
        return "no final_logit_softcapping (llama.cpp's gemma2 always soft-caps the logits)"
    return (_default_rope(c) or _swa_pattern(c, 2) or _query_scale(c, 46) or _gelu_tanh(c))


def _gemma2_keys(w: Any, c: Any) -> None:
    w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(c.final_logit_softcapping))
    w.add_sliding_window(int(c.sliding_window))


def _gemma3_refuse(c: Any) -> str | None:
    if getattr(c, "attn_logit_softcapping", None) is not None:
        return "attn_logit_softcapping (llama.cpp's gemma3 does not soft-cap attention)"
    local = _rope(c, "sliding_attention")
    if float(local.get("rope_theta", getattr(c, "rope_local_base_freq", 10000.0))) != 10000.0:
        return (f"local rope base {local.get('rope_theta')} (llama.cpp's gemma3 fixes 10000 for "
                f"the sliding layers)")
    if _default_rope(c, "sliding_attention"):
        return "rope scaling on the sliding layers (llama.cpp's gemma3 scales the global ones)"
    if (_rope(c, "full_attention").get("rope_type") or "default") not in ("default", "linear"):
        return _default_rope(c, "full_attention")
    if _swa_pattern(c, 6) or _query_scale(c, 62) or _gelu_tanh(c):
        return _swa_pattern(c, 6) or _query_scale(c, 62) or _gelu_tanh(c)
    if getattr(c, "final_logit_softcapping", None) is not None:  # its local/global graph
        return "final_logit_softcapping (llama.cpp's gemma3 does not soft-cap the logits)"
    return None


def _gemma3_keys(w: Any, c: Any) -> None:
    import gguf

    full = _rope(c, "full_attention")
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))  # the global layers'
    if (full.get("rope_type") or "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    w.add_sliding_window(int(c.sliding_window))


def _experts_keys(w: Any, c: Any) -> None:
    from neuqi.architectures import arch_for

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
    rope = _rope(c)
    kind = rope.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        return _default_rope(c)
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
    rope = _rope(c)
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
        return _default_rope(c) or _all_sparse(c)
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
ARCHS = LAYOUTS  # the families with a GGUF export (model_type -> Layout)
# an expert linear: model.layers.{bid}.mlp.experts.{e}.{proj}.weight (block_sparse_moe: Mixtral
# as published, before transformers renames it)
_EXPERT = re.compile(r"^(?P<layer>.+\.layers\.(?P<bid>\d+))\.(?:mlp|block_sparse_moe)\."
                     r"experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FLOAT_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # routers: F32


def _resolved(config: dict[str, Any] | Any) -> Any:
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
    why = LAYOUTS[model_type].refuse(_resolved(config))
    if why:
        raise UserError(f"{where}: {model_type} with {why}: no GGUF export that llama.cpp would "
                        f"run as transformers does; use --format compressed-tensors")


def check_tokenizer(folder: Path, *, missing_ok: bool = False) -> tuple[str, dict[str, Any]]:
    """Which vocabulary the GGUF gets, and the tokenizer.json of ``folder`` (``{}`` if none):
    ``("gpt2", tj)`` for a byte-level BPE tokenizer.json, ``("llama", tj)`` for a SentencePiece
    tokenizer with its tokenizer.model (:mod:`neuqi.export.spm`: a BPE model without
    normalization, the one tokenizer.json describes). UserError (one line) otherwise: a
    SentencePiece-style tokenizer.json (BPE with byte_fallback, Unigram) without tokenizer.model
    is refused, as llama.cpp's converter would write it (gguf's LlamaHfVocab) with the placeholder
    score -1000 for every token, with which llama.cpp merges pieces in another order than the
    tokenizer; written as gpt2 it would be mis-tokenized too."""
    tj_file, model_file = folder / "tokenizer.json", folder / "tokenizer.model"
    tj: dict[str, Any] = {}
    if tj_file.is_file():
        try:
            tj = json.loads(tj_file.read_text(encoding="utf-8"))
            model = tj.get("model") or {}
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{tj_file}: not a tokenizer.json (unreadable JSON)") from None
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return "gpt2", tj
        if model.get("type") != "BPE":
            raise UserError(f"{tj_file}: a {model.get('type')} tokenizer; llama.cpp's SentencePiece "
                            f"vocabulary merges pieces by score (BPE), so the GGUF export writes "
                            f"BPE tokenizers only; use --format compressed-tensors")
    elif not model_file.is_file():
        if missing_ok:
            return "", {}
        raise UserError(f"{tj_file}: missing; the GGUF export needs the Hugging Face "
                        f"tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece) "
                        f"beside the output")
    if not model_file.is_file():
        raise UserError(f"{tj_file}: a SentencePiece-style tokenizer (BPE with byte_fallback) "
                        f"without its tokenizer.model; the GGUF export needs tokenizer.model for "
                        f"the token scores (llama.cpp's converter would write -1000 for every "
                        f"token, and llama.cpp would merge pieces in another order)")
    check_model(model_file, tj)
    return "llama", tj


def default_type(source: ExportSource) -> str:
    """``--format gguf``: the block type that keeps the output's own codes."""
    bits = {int(i["bits"]) for i in source.output.quantized.values()}
    if bits == {4}:
        return "Q4_1"
    if bits == {5}:
        return "Q5_1"
    raise UserError(
        f"--format gguf: no GGUF block type stores {sorted(bits)}-bit codes with a float offset; "
        f"choose gguf-q4_1, gguf-q5_1, gguf-q4_k, gguf-q5_k or gguf-q2_k"
    )


# ------------------------------------------------------------------------------ block layouts
def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks: codes uint8 ``[N, 32]``, d and m ``[N]`` -> uint8 ``[N, 20]``."""
    c = codes.numpy().astype(np.uint8)
    qs = (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=-1)


def pack_q5_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q5_1 blocks -> uint8 ``[N, 24]``: d, m, the 32 fifth bits (little-endian), low nibbles."""
    c = codes.numpy().astype(np.uint8)
    qh = np.packbits((c >> 4) & 1, axis=-1, bitorder="little")
    qs = (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qh, qs], axis=-1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums."""
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def pack_kquant(k: KQuantized) -> np.ndarray:
    """Super-blocks of ``k`` -> uint8 ``[out * in/256, bytes]`` in ggml's layout."""
    out_f, in_f = k.codes.shape
    n = out_f * in_f // SUPER
    c = k.codes.numpy().astype(np.uint8).reshape(n, SUPER)
    d, dmin = _f16_bytes(k.d.reshape(n)), _f16_bytes(k.dmin.reshape(n))
    sc = k.sc.numpy().reshape(n, -1).astype(np.uint8)
    mn = k.mn.numpy().reshape(n, -1).astype(np.uint8)
    if k.spec.name == "Q2_K":
        q = c.reshape(n, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        scales = (sc & 0xF) | ((mn & 0xF) << 4)
        return np.concatenate([scales, qs.reshape(n, 64), d, dmin], axis=-1)
    q = c.reshape(n, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [d, dmin, _k_scales(sc, mn)]
    if k.spec.name == "Q5_K":
        bits = (c.reshape(n, 8, 32) >> 4) & 1  # sub-block j, element l -> bit j of byte l
        qh = np.zeros((n, 32), dtype=np.uint8)
        for j in range(8):
            qh |= (bits[:, j] << j).astype(np.uint8)
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


def own_block_params(lin: NativeLinear, bits: int) -> tuple[torch.Tensor, ...] | None:
    """The output's own codes, with its scales and zero-points ``[out, in/32]`` per block of 32:
    a group of ``k·32`` weights with one (s, z) is ``k`` blocks with that (s, z), so an output with
    ``bits`` bits and groups of 32, 64, 128, ... (or per channel, rows a multiple of 32) is written
    as it is. None when it has other bits or groups (then the export re-solves)."""
    g = lin.group_length
    if lin.bits != bits or g % BLOCK:
        return None
    k = g // BLOCK
    return (lin.codes, lin.scale.repeat_interleave(k, dim=1),
            lin.zero_point.repeat_interleave(k, dim=1))


# ------------------------------------------------------------------------------ the model
def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of convert_hf_to_gguf's ``permute``: GGUF row ``r`` is transformers row
    ``idx[r]`` (each head's two halves interleaved)."""
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def _pre_tokenizer(tokenizer_json: dict[str, Any], model_type: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (``tokenizer.ggml.pre``)."""
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return "qwen2"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model_type == "deepseek_v3" and "一-龥" in json.dumps(pre, ensure_ascii=False):
        return "deepseek-v3"  # its digit, CJK and word splits (llama.cpp's LLAMA_VOCAB_PRE_TYPE)
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for the plain GPT-2 byte-level split
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and "\\p{N}{1,3}" in json.dumps(steps[0]):
        return "llama-bpe"
    return "default"


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFExporter:
    """Writes one GGUF file: tensors go to the gguf package's spooled temporary file as they come
    (one tensor in memory at a time), header and metadata at :meth:`finalize`."""

    def __init__(self, source: ExportSource, out: str | Path, qtype: str) -> None:
        import gguf

        if qtype not in TYPES:
            raise UserError(f"--format gguf-{qtype.lower()}: choose one of {', '.join(TYPES)}")
        self.source = source
        self.qtype = qtype
        self.format_name = f"gguf-{qtype.lower()}"
        config = source.config()
        model_type = str(config.get("model_type"))
        check_family(config, source.path / "config.json")
        self.config = _resolved(config)
        self.model_type = model_type
        self.layout = LAYOUTS[model_type]
        self.arch, self.permute = self.layout.arch, self.layout.permute_qk
        self.n_head = int(self.config.num_attention_heads)
        self.n_kv = int(getattr(self.config, "num_key_value_heads", None) or self.n_head)
        self.n_layers = int(self.config.num_hidden_layers)
        from neuqi.architectures import arch_for

        moe = arch_for(self.config).moe
        self.expert_kinds: dict[str, Any] = {}  # checkpoint projection name -> MODEL_TENSOR
        if moe is not None:
            gate, up, down = moe.expert_linears
            self.expert_kinds = {gate: gguf.MODEL_TENSOR.FFN_GATE_EXP,
                                 up: gguf.MODEL_TENSOR.FFN_UP_EXP,
                                 down: gguf.MODEL_TENSOR.FFN_DOWN_EXP}
        self.n_experts = 0 if moe is None else moe.experts
        # stacked expert tensors being gathered: GGUF name -> (type, blocks by expert)
        self._experts: dict[str, tuple[str, list[np.ndarray | None]]] = {}
        self.names = gguf.get_tensor_name_map(
            next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), self.n_layers
        )
        self.target = AtomicTarget(out, folder=False, is_ours=_is_gguf)
        self.writer = gguf.GGUFWriter(None, self.arch, use_temp_file=True)
        self._notes: list[str] = []
        self.types: dict[str, str] = {}
        self.plain_types: dict[str, str] = {}  # 2-D tensors that are not quantized linears
        self.re_solved: list[str] = []  # linears not written with the output's own codes
        self.re_solve_why: set[str] = set()
        self.fallback: list[str] = []
        self._metadata()  # only kept until finalize; a bad tokenizer fails before any solve

    @property
    def notes(self) -> list[str]:
        notes = list(self._notes)
        for name, kind in sorted(self.plain_types.items()):
            notes.append(f"note: {name} written as {kind}, as llama.cpp's convert_hf_to_gguf.py "
                         f"--outtype q8_0 does (not in the weighted loss, which covers the "
                         f"quantized linears)")
        if self.fallback:
            kinds = sorted({self.types[n] for n in self.fallback if n in self.types})
            notes.append(
                f"note: {len(self.fallback)} linear(s) written as {'/'.join(kinds)} at group 32 "
                f"(re-solved, or rows not a multiple of {SUPER} for {self.qtype})"
            )
        return notes

    # --------------------------------------------------------------------------- tensors
    def _gguf_name(self, name: str) -> str:
        import gguf

        m = _EXPERT.match(name)
        if m and m["proj"] in self.expert_kinds:
            kind = self.expert_kinds[m["proj"]]
            return f"{gguf.TENSOR_NAMES[kind].format(bid=int(m['bid']))}.weight"
        if name.endswith("e_score_correction_bias"):  # the converter's rename: exp_probs_b.bias
            name = name[: -len("_bias")] + ".bias"
        new = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"{self.source.path}: tensor {name} has no GGUF name for {self.arch}")
        return new

    def _rows(self, name: str, rows: int) -> torch.Tensor | None:
        if not self.permute:
            return None
        if name.endswith("self_attn.q_proj.weight"):
            return qk_permutation(rows, self.n_head)
        if name.endswith("self_attn.k_proj.weight"):
            return qk_permutation(rows, self.n_kv)
        return None

    def add_linear(self, lin: NativeLinear) -> torch.Tensor:
        """Store ``lin``; return the weight llama.cpp will compute, float32 ``[out, in]`` in the
        transformers row order."""
        import gguf

        out_f, in_f = lin.codes.shape
        qtype = self.qtype
        if qtype in KSPECS and in_f % SUPER:
            qtype = _FALLBACK[qtype]
            self.fallback.append(lin.name)
        if qtype in KSPECS:
            weight = lin.require_weight(f"{qtype} (solved under its constraint)")
            k = solve_kquant(weight, lin.h_diag, KSPECS[qtype], method=lin.method or "neuqi",
                             device=self.source.device)
            k = KQuantized(k.codes.cpu(), k.d.cpu(), k.dmin.cpu(), k.sc.cpu(), k.mn.cpu(), k.spec)
            self.re_solved.append(lin.name)
            self.re_solve_why.add(f"{qtype}: solved under its quantized sub-block scales")
            approx = k.dequantize()
            blocks = pack_kquant(k).reshape(out_f, -1)
        else:
            codes, d, m = self._block_params(lin, _BLOCK_BITS[qtype])
            pack = pack_q4_1 if qtype == "Q4_1" else pack_q5_1
            blocks = pack(codes.reshape(-1, BLOCK), d.reshape(-1), m.reshape(-1))
            blocks = blocks.reshape(out_f, -1)
            d16, m16 = _fp16_t(d), _fp16_t(m)
            q = codes.to(torch.float32).view(out_f, -1, BLOCK)
            approx = (d16.unsqueeze(-1) * q + m16.unsqueeze(-1)).reshape(out_f, in_f)
        rows = self._rows(lin.name, out_f)
        if rows is not None:
            blocks = blocks[rows.numpy()]
        self.types[lin.name] = qtype
        if self.arch == "deepseek2" and lin.name.endswith("self_attn.kv_b_proj.weight"):
            self._add_kv_b(lin.name, qtype, blocks, approx)
            return approx
        expert = _EXPERT.match(lin.name)
        if expert and expert["proj"] in self.expert_kinds:
            self._add_expert(self._gguf_name(lin.name), int(expert["e"]), qtype, blocks)
        else:
            self.writer.add_tensor(self._gguf_name(lin.name), np.ascontiguousarray(blocks),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
        return approx

    def _add_kv_b(self, name: str, qtype: str, blocks: np.ndarray, approx: torch.Tensor) -> None:
        """DeepseekV2Model's split of ``kv_b_proj`` ``[heads·(nope + v), kv_lora_rank]`` for
        llama.cpp's absorbed MLA: ``attn_v_b`` ``[heads, v, rank]`` keeps the linear's blocks
        (rows along its input, as quantized); ``attn_k_b`` is transposed to ``[heads, rank,
        nope]``, across the quantization groups, so no block type holds the codes: it is written
        as the linear's dequantized weights in F32 (exactly what the blocks would give)."""
        import gguf

        c = self.config
        nope, v = int(c.qk_nope_head_dim), int(c.v_head_dim)
        base = name[: -len("kv_b_proj.weight")]
        k_b = approx.view(self.n_head, nope + v, -1)[:, :nope].transpose(1, 2)
        self.writer.add_tensor(self._gguf_name(f"{base}k_b_proj.weight"),
                               np.ascontiguousarray(k_b.numpy()))
        note = ("note: attn_k_b (kv_b_proj's key rows, transposed for llama.cpp's absorbed MLA) "
                "written as F32 of the quantized weights: its rows cross the quantization groups")
        if note not in self._notes:
            self._notes.append(note)
        v_b = blocks.reshape(self.n_head, nope + v, -1)[:, nope:]
        self.writer.add_tensor(self._gguf_name(f"{base}v_b_proj.weight"),
                               np.ascontiguousarray(v_b), raw_dtype=gguf.GGMLQuantizationType[qtype])

    def _add_expert(self, gname: str, e: int, qtype: str, blocks: np.ndarray) -> None:
        """Gather expert ``e``'s blocks of one layer's projection; the 3-D ``[experts, out,
        blocks]`` tensor llama.cpp reads is written when the layer's last expert has come."""
        import gguf

        kind, stack = self._experts.setdefault(gname, (qtype, [None] * self.n_experts))
        if kind != qtype:
            raise UserError(f"{gname}: experts of one projection written as {kind} and {qtype}; "
                            f"a stacked GGUF tensor has one type")
        stack[e] = blocks
        if all(b is not None for b in stack):
            self.writer.add_tensor(gname, np.ascontiguousarray(np.stack(stack)),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
            del self._experts[gname]

    def _block_params(self, lin: NativeLinear, bits: int) -> tuple[torch.Tensor, ...]:
        """Codes ``[out, in]`` and per-block d, m ``[out, in/32]`` (float32) for a 32-block type:
        the output's own (:func:`own_block_params`) when it has ``bits`` and groups of a multiple
        of 32, else re-solved at group 32."""
        own = own_block_params(lin, bits)
        if own is not None:
            codes, scale, zero = own
        else:
            if lin.codes.shape[1] % BLOCK:
                raise UserError(f"{lin.name}: {lin.codes.shape[1]} inputs is not a multiple of 32; "
                                f"GGUF block types cannot store it")
            weight = lin.require_weight(f"{bits}-bit blocks of 32 (a re-solve)")
            q = quantize_tensor(weight, lin.h_diag, bits=bits, group_size=BLOCK,
                                method=lin.method or "neuqi", device=self.source.device)
            codes, scale, zero = q.codes.cpu(), q.scale.cpu(), q.zero_point.cpu()
            if lin.name not in self.fallback:
                self.fallback.append(lin.name)
            self.re_solved.append(lin.name)
            group = "per channel" if lin.group_size == -1 else f"groups of {lin.group_size}"
            self.re_solve_why.add(f"{bits}-bit blocks of {BLOCK}, NeUQI at group {BLOCK}; the "
                                  f"output has {lin.bits} bits, {group}")
        return codes, scale, -scale * zero

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor that is not a quantized linear: Q8_0 (F16) if 2-D, else F32."""
        import gguf

        if name.endswith("rotary_emb.inv_freq"):
            return
        gname = self._gguf_name(name)
        data = tensor.to(torch.float32)
        if self.layout.norm_shift and name.endswith("norm.weight"):
            data = data + self.layout.norm_shift  # llama.cpp multiplies by the stored weight
        data = data.contiguous().numpy()
        if gname.endswith(_FLOAT_TENSORS):  # routers, as convert_hf_to_gguf keeps them
            self.writer.add_tensor(gname, data.reshape(-1) if data.shape[0] == 1 else data)
            self.plain_types[name] = "F32"
        elif data.ndim == 2 and data.shape[1] % BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            self.writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            self.plain_types[name] = "Q8_0"
        elif data.ndim == 2:
            self.writer.add_tensor(gname, data.astype(np.float16))
            self.plain_types[name] = "F16"
        else:
            self.writer.add_tensor(gname, data)

    # --------------------------------------------------------------------------- metadata
    def _metadata(self) -> None:
        import gguf

        w, c = self.writer, self.config
        hidden = int(c.hidden_size)
        head_dim = _head_dim(c)
        rope = _rope(c)
        w.add_name(str(getattr(c, "_name_or_path", None) or self.source.path.name))
        self.layout.keys(w, c)  # the family's own keys first: a key is written once
        if self.n_experts:
            _experts_keys(w, c)
        written = _written(w)

        def put(key: str, add: Callable[[Any], None], value: Any) -> None:
            if key.format(arch=self.arch) not in written:
                add(value)

        k = gguf.Keys
        put(k.LLM.CONTEXT_LENGTH, w.add_context_length,
            int(getattr(c, "max_position_embeddings", None) or 2048))
        put(k.LLM.EMBEDDING_LENGTH, w.add_embedding_length, hidden)
        put(k.LLM.BLOCK_COUNT, w.add_block_count, self.n_layers)
        put(k.LLM.FEED_FORWARD_LENGTH, w.add_feed_forward_length, int(c.intermediate_size))
        put(k.Attention.HEAD_COUNT, w.add_head_count, self.n_head)
        put(k.Attention.HEAD_COUNT_KV, w.add_head_count_kv, self.n_kv)
        put(k.Attention.KEY_LENGTH, w.add_key_length, head_dim)
        put(k.Attention.VALUE_LENGTH, w.add_value_length, head_dim)
        put(k.Attention.LAYERNORM_RMS_EPS, w.add_layer_norm_rms_eps,
            float(getattr(c, "rms_norm_eps", None) or 1e-6))
        put(k.LLM.VOCAB_SIZE, w.add_vocab_size, int(c.vocab_size))
        put(k.Rope.DIMENSION_COUNT, w.add_rope_dimension_count, head_dim)
        put(k.Rope.FREQ_BASE, w.add_rope_freq_base, float(rope.get("rope_theta", 10000.0)))
        ftype = {"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                 "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
                 "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K}[self.qtype]
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if self.layout.rope_warning and (rope.get("rope_type") or "default") != "default":
            self._notes.append(f"warning: rope_type {rope.get('rope_type')} is not written to the "
                              f"GGUF; llama.cpp will use plain RoPE")
        self._tokenizer()

    def _tokenizer(self) -> None:
        import gguf
        from transformers import AutoTokenizer

        folder = self.source.path
        kind, tj = check_tokenizer(folder)
        vocab_size = int(self.config.vocab_size)
        if kind == "llama":
            self._sentencepiece(folder, vocab_size)
            return
        tok = AutoTokenizer.from_pretrained(str(folder))
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = tok.added_tokens_decoder
        tokens: list[str] = []
        types: list[int] = []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.CONTROL if added[i].special
                             else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        pre = _pre_tokenizer(tj, self.model_type)
        if pre == "default":
            self._notes.append("warning: unknown pre-tokenizer; llama.cpp will split text its "
                              "default way (token ids may differ from transformers')")
        self.writer.add_tokenizer_model("gpt2")
        self.writer.add_tokenizer_pre(pre)
        self.writer.add_token_list(tokens)
        self.writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        special.add_to_gguf(self.writer, quiet=True)

    def _sentencepiece(self, folder: Path, vocab_size: int) -> None:
        """convert_hf_to_gguf's ``_set_vocab_sentencepiece`` (:mod:`neuqi.export.spm`), with the
        space prefix llama.cpp adds: none for Gemma, Gemma 2 / 3 (their converter writes False), else
        tokenizer_config.json's ``add_prefix_space`` where it says (LlamaModel.set_vocab), else
        tokenizer.model's ``add_dummy_prefix``."""
        import gguf

        model_file = folder / "tokenizer.model"
        sp = processor(model_file)
        tokens, scores, types, notes = vocabulary(folder, sp, vocab_size)
        self._notes.extend(notes)
        w = self.writer
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        special.add_to_gguf(w, quiet=True)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) if (
            folder / "tokenizer_config.json").is_file() else {}
        if self.arch in ("gemma", "gemma2", "gemma3"):
            w.add_add_space_prefix(False)
        elif isinstance(config.get("add_prefix_space"), bool):
            w.add_add_space_prefix(config["add_prefix_space"])
        else:
            w.add_add_space_prefix(read_spec(model_file).add_dummy_prefix)

    # --------------------------------------------------------------------------- finishing
    def finalize(self, report: dict[str, Any]) -> Path:
        if self._experts:
            missing = sorted(self._experts)
            raise UserError(f"{self.source.path}: experts missing from the output for "
                            f"{', '.join(missing)}; it is not a complete MoE output")
        self.writer.add_string("neuqi.export", json.dumps(report))
        w = self.writer
        w.write_header_to_file(self.target.temp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return self.target.publish()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.target.abort()


def _written(writer: Any) -> set[str]:
    """The metadata keys ``writer`` holds so far."""
    return {k for shard in writer.kv_data for k in shard}


def _fp16_t(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)
