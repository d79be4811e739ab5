"""The blocks that run a model one decoder layer at a time (architectures as data:
:mod:`neuqi.model.architectures`, re-exported here).

Every block takes an explicit ``device`` and ``dtype``; nothing here moves tensors on its own.
The decoder layer, RMSNorm and rotary classes are transformers' own, so the streamed forward pass
is the library's modelling code, not a re-implementation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from neuqi.model.architectures import (
    ARCHITECTURES,
    LLAMA_LIKE,
    SUPPORTED_FAMILIES,
    ArchSpec,
    arch_for,
)
from neuqi.model.families import embedding_from_weight, layer_embeddings, rotary_tables, softcap
from neuqi.util.errors import UserError

if TYPE_CHECKING:
    from neuqi.model.checkpoint import Checkpoint

__all__ = [
    "ARCHITECTURES",
    "LLAMA_LIKE",
    "SUPPORTED_FAMILIES",
    "ArchSpec",
    "LMHead",
    "arch_for",
    "build_embedding",
    "build_head",
    "build_layer",
    "build_rotary",
    "causal_mask_for",
    "decoder_layer_class",
    "layer_forward",
    "new_layer",
    "position_embeddings_for",
]


def _modeling_module(module: str) -> Any:
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _family_class(config: Any, suffix: str) -> type[nn.Module]:
    arch = arch_for(config)
    family = config.model_type
    module = _modeling_module(arch.module_of(family))
    return getattr(module, arch.class_prefix(family) + suffix)


def decoder_layer_class(config: Any) -> type[nn.Module]:
    """The transformers decoder-layer class of ``config``'s family (e.g. LlamaDecoderLayer)."""
    return _family_class(config, "DecoderLayer")


def new_layer(config: Any, index: int, arch: ArchSpec | None = None) -> nn.Module:
    """Decoder layer ``index`` of ``config``'s family on the meta device, a mixture of experts
    with one linear per expert projection under ``arch``'s names (a checkpoint's
    ``Checkpoint.arch``; default: the family's published names; :func:`neuqi.model.moe.unfuse_experts`)."""
    from neuqi.model.moe import unfuse_experts

    with torch.device("meta"):
        layer = decoder_layer_class(config)(config, index)
    return unfuse_experts(layer, arch or arch_for(config))


def _materialise(
    module: nn.Module,
    ckpt: Checkpoint,
    prefix: str,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> nn.Module:
    """Fill a meta-device ``module`` from the tensors named ``prefix + key`` (strict), in eval mode."""
    wanted = list(module.state_dict().keys())
    have = {n[len(prefix) :] for n in ckpt.names if n.startswith(prefix)}
    # Old LLaMA checkpoints stored the rotary inverse frequencies; they are recomputed, not loaded.
    have = {n for n in have if not n.endswith("rotary_emb.inv_freq")}
    missing = [k for k in wanted if k not in have]
    if missing:
        raise UserError(
            f"{ckpt.path}: tensor {prefix}{missing[0]} is missing from the checkpoint "
            f"({len(missing)} missing); the checkpoint does not match its config.json"
        )
    extra = sorted(have - set(wanted))
    if extra:
        raise UserError(
            f"{ckpt.path}: tensor {prefix}{extra[0]} is not used by {type(module).__name__} "
            f"({len(extra)} unexpected); the checkpoint does not match its config.json"
        )
    state = {k: ckpt.read(prefix + k, device=device, dtype=dtype) for k in wanted}
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer that is neither in the checkpoint nor rebuilt: a modelling-code change
        raise RuntimeError(f"{type(module).__name__}: {left[0]} was not materialised")
    module.requires_grad_(False)
    return module.eval()


def build_layer(
    ckpt: Checkpoint, index: int, device: torch.device | str, dtype: torch.dtype | None
) -> nn.Module:
    """Decoder layer ``index`` as transformers' own class, filled from ``ckpt``, in eval mode.

    Built on the meta device, then only this layer's tensors are read.  ``dtype=None`` keeps the
    stored dtype.
    """
    if not 0 <= index < ckpt.layer_count:
        raise IndexError(f"layer {index} out of range (model has {ckpt.layer_count})")
    layer = new_layer(ckpt.config, index, ckpt.arch)
    return _materialise(layer, ckpt, ckpt.arch.layer_prefix(index), device, dtype)


def build_embedding(
    ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype | None
) -> nn.Embedding:
    """The token embedding (``model.embed_tokens``, scaled where the family does), frozen."""
    weight = ckpt.read(ckpt.arch.embed, device=device, dtype=dtype)
    return embedding_from_weight(weight, ckpt.config, ckpt.arch)


class LMHead(nn.Module):
    """Final RMSNorm then ``lm_head``: hidden states [b, s, h] -> logits [b, s, vocab]
    (soft-capped by ``cap`` where the family does, Gemma 2)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, cap: float | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(self.norm(hidden)), self.cap)


def build_head(ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype | None) -> LMHead:
    """Final norm + lm_head; ``lm_head`` is read from the embedding when the model ties them."""
    config, arch = ckpt.config, ckpt.arch
    norm_cls = _family_class(config, "RMSNorm")
    with torch.device("meta"):
        norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    weight_name = ckpt.lm_head_name
    norm.load_state_dict(
        {"weight": ckpt.read(arch.final_norm, device=device, dtype=dtype)}, strict=True, assign=True
    )
    lm_head.load_state_dict(
        {"weight": ckpt.read(weight_name, device=device, dtype=dtype)}, strict=True, assign=True
    )
    head = LMHead(norm, lm_head, arch.final_softcap(config))
    head.requires_grad_(False)
    return head.eval()


def build_rotary(config: Any, device: torch.device | str) -> nn.Module:
    """The family's rotary-embedding module, computed for real (its buffers are not checkpointed)."""
    cls = _family_class(config, "RotaryEmbedding")
    with torch.device("cpu"):
        rotary = cls(config=config)
    # Gemma 3: a table per kind. torch types Module.__setattr__ for tensors and modules only
    rotary.per_layer_type = arch_for(config).rope_per_layer_type  # type: ignore[assignment]
    return rotary.to(device).eval()


def position_embeddings_for(
    rotary: nn.Module, hidden: torch.Tensor, seq_len: int | None = None
) -> Any:
    """(cos, sin) for positions 0..seq_len-1 in ``hidden``'s dtype and device, batch dim 1; a
    dict of them by layer kind for Gemma 3 (:func:`layer_forward` picks the layer's)."""
    seq_len = hidden.shape[1] if seq_len is None else seq_len
    position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
    with torch.no_grad():
        return rotary_tables(rotary, hidden, position_ids)


def causal_mask_for(
    layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The mask ``layer`` expects, built as its transformers model builds it.

    Causal, or sliding-window causal when the layer uses a window (Mistral, Qwen2/3 sliding
    layers); ``attention_mask`` is an optional 2-D padding mask [b, s] (1 = keep) or a ready 4-D
    mask.  With SDPA and no padding this is ``None`` (SDPA's own ``is_causal``).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    attn = cast(nn.Module, layer.self_attn)
    config = attn.config
    # Qwen2/Qwen3 set self_attn.sliding_window per layer (None on full layers); Mistral reads the config.
    window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
    if not window or not getattr(config, "use_sliding_window", True):  # Qwen2-MoE: 0 / off
        window = None
    make = create_sliding_window_causal_mask if window is not None else create_causal_mask
    return make(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)


def layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: Any,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a decoder layer on [b, s, h] with causal attention; returns the new hidden states.

    ``attention_mask``: as in :func:`causal_mask_for` (``None`` = no padding).
    """
    mask = causal_mask_for(layer, hidden, attention_mask)
    position_embeddings = layer_embeddings(layer, position_embeddings)
    out = layer(
        hidden, attention_mask=mask, position_embeddings=position_embeddings, use_cache=False
    )
    return out[0] if isinstance(out, tuple) else out
