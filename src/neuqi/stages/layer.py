"""A decoder layer held within a memory budget (:class:`neuqi.pipeline.plan.Knobs`).

:func:`load_layer` gives the layer the stages run: transformers' own decoder layer, either whole
on the device (:func:`neuqi.model.layers.build_layer`), or with its linears brought to the device one at
a time (``linear_at_a_time``: each linear's weight is read when the linear runs and dropped after
it, so the device holds the norms, the biases and one linear). The MLP may run over its tokens in
chunks (``mlp_chunk``), so its intermediate activations never exist for the whole batch at once;
the MLP acts on each token alone, so the chunks give the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from neuqi.model.checkpoint import Checkpoint
from neuqi.model.layers import build_layer, new_layer

#: linear name (relative to the layer) -> its weight on the device, in the compute dtype
WeightSource = Callable[[str], torch.Tensor]


def load_layer(
    ckpt: Checkpoint, index: int, device: torch.device, dtype: torch.dtype, *,
    linear_at_a_time: bool = False, mlp_chunk: int = 0, source: WeightSource | None = None,
) -> nn.Module:
    """Decoder layer ``index`` in eval mode. ``source`` gives a linear's weight (default: the
    checkpoint's, cast to ``dtype``); with ``linear_at_a_time`` it is called each time the linear
    runs."""
    prefix = ckpt.arch.layer_prefix(index)

    def from_checkpoint(linear: str) -> torch.Tensor:
        return ckpt.read(f"{prefix}{linear}.weight", device=device, dtype=dtype)

    source = source or from_checkpoint
    if not linear_at_a_time:
        layer = build_layer(ckpt, index, device, dtype)
        if source is not from_checkpoint:
            for linear in ckpt.arch.linears_of(index):
                layer.get_submodule(linear).weight.data = source(linear)
    else:
        layer = new_layer(ckpt.config, index, ckpt.arch)
        linear_weights = {f"{linear}.weight" for linear in ckpt.arch.linears_of(index)}
        state = {k: ckpt.read(prefix + k, device=device, dtype=dtype)
                 for k in layer.state_dict() if k not in linear_weights}
        layer.load_state_dict(state, strict=False, assign=True)
        for linear in ckpt.arch.linears_of(index):
            _stream_weight(layer.get_submodule(linear), linear, source)
        layer.requires_grad_(False)
        layer.eval()
    if mlp_chunk:
        _chunk_tokens(cast(nn.Module, layer.mlp), mlp_chunk)
    return layer


def _stream_weight(module: nn.Module, linear: str, source: WeightSource) -> None:
    shape = cast(torch.Tensor, module.weight).shape

    def load(mod: nn.Module, _args: tuple) -> None:
        mod.weight = nn.Parameter(source(linear), requires_grad=False)

    def drop(mod: nn.Module, _args: tuple, _out: torch.Tensor) -> None:
        mod.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)

    module.register_forward_pre_hook(load)
    module.register_forward_hook(drop)


def _chunk_tokens(mlp: nn.Module, chunk: int) -> None:
    whole = mlp.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= chunk:
            return whole(x)
        # each chunk as a batch of one sequence: an MoE block wants [batch, seq, hidden]
        out = torch.cat([whole(flat[None, i:i + chunk])[0]
                         for i in range(0, flat.shape[0], chunk)])
        return out.view(*x.shape[:-1], out.shape[-1])

    mlp.forward = forward
