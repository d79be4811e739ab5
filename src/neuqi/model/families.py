"""What the dense families beyond LLaMA add around transformers' own decoder layers.

The decoder layers, norms and rotary tables stay transformers' classes (Gemma's ``(1 + weight)``
RMSNorm, its sandwich norms and attention soft-capping live in them). What a streamed forward
builds outside the layers is here, driven by the :class:`~neuqi.model.architectures.ArchSpec` fields:

* the scaled token embedding (Gemma: ``embed * sqrt(hidden)``, the factor rounded to the model's
  dtype as transformers does, so a bfloat16 Gemma gets 55.5 for 3072, as it was trained);
* the final-logit soft-capping (Gemma 2/3: ``c * tanh(logits / c)``);
* one rotary table per layer kind (Gemma 3: ``sliding_attention`` layers use
  ``rope_local_base_freq``, ``full_attention`` layers ``rope_theta``): the position embeddings are
  then a dict by kind, and :func:`layer_embeddings` picks the layer's.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from neuqi.model.architectures import ArchSpec

__all__ = [
    "ScaledEmbedding", "embedding_from_weight", "embedding_scale", "layer_embeddings",
    "rotary_tables", "softcap",
]


def _model_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def embedding_scale(config: Any, arch: ArchSpec) -> float | None:
    """The factor the embeddings are multiplied by, as the model's dtype holds it, or None."""
    if not arch.scaled_embedding:
        return None
    return float(torch.tensor(math.sqrt(config.hidden_size)).to(_model_dtype(config)))


class ScaledEmbedding(nn.Embedding):
    """A frozen embedding whose output is multiplied by ``scale`` (Gemma's normalizer)."""

    scale: float

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


def embedding_from_weight(weight: torch.Tensor, config: Any, arch: ArchSpec) -> nn.Embedding:
    """The family's token embedding over ``weight`` [vocab, hidden], frozen, in eval mode."""
    scale = embedding_scale(config, arch)
    if scale is None:
        return nn.Embedding.from_pretrained(weight, freeze=True).eval()
    emb = ScaledEmbedding.from_pretrained(weight, freeze=True)
    emb.scale = scale
    return emb.eval()


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)``; the logits unchanged when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def rotary_tables(
    rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin), or a dict of them by layer kind where the rotary has one table per kind."""
    if getattr(rotary, "per_layer_type", False):  # set by models.build_rotary from the ArchSpec
        kinds = cast(list[str], rotary.layer_types)  # sorted(set(config.layer_types))
        return {kind: rotary(hidden, position_ids, kind) for kind in kinds}
    return rotary(hidden, position_ids)


def layer_embeddings(layer: nn.Module, position_embeddings: Any) -> tuple[torch.Tensor, ...]:
    """The (cos, sin) of ``layer``'s kind when the position embeddings are per kind."""
    if not isinstance(position_embeddings, dict):
        return position_embeddings
    kind = getattr(layer, "attention_type", None) or cast(nn.Module, layer.self_attn).layer_type
    return position_embeddings[kind]
