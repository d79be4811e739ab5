"""Stage `forward`: the next layer's inputs, from this layer run over this layer's inputs.

With sequential quantization the layer's linears carry their dequantized weights first, so the
next layer is calibrated on what the quantized model computes (as GPTQ does).

The output array has one chunk per calibration window, so batches of rows can be written by
different workers (:func:`forward_rows`) once :func:`create_next_acts` made the array.
"""

from __future__ import annotations

import torch
from torch import nn

from neuqi.model.layers import layer_forward, position_embeddings_for
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import acts_name


def create_next_acts(store: JobStore, layer_index: int, dtype: torch.dtype) -> str:
    """The empty output array ``acts/<layer_index + 1>``, shaped like this layer's inputs."""
    dst = acts_name(layer_index + 1)
    store.create_array(dst, store.array_shape(acts_name(layer_index)), dtype, chunks=1)
    return dst


def forward_rows(
    store: JobStore, layer_index: int, layer: nn.Module, rotary: nn.Module, dtype: torch.dtype,
    batch_size: int, device: torch.device, starts: list[int], windows: int | None = None,
) -> None:
    """Run the batches that begin at ``starts`` and write their rows of the next layer's inputs
    (``windows`` calibration windows at a time: the memory budget's; default the whole batch)."""
    src, dst = acts_name(layer_index), acts_name(layer_index + 1)
    total = store.array_shape(src)[0]
    step = windows or batch_size
    with torch.no_grad():
        for start in starts:
            stop = min(start + batch_size, total)
            for lo in range(start, stop, step):
                hidden = store.read_array(src, device=device, rows=slice(lo, min(lo + step, stop)))
                out = layer_forward(layer, hidden, position_embeddings_for(rotary, hidden))
                del hidden
                store.write_rows(dst, lo, out.to(dtype).cpu())
                del out


def run_forward(
    store: JobStore, layer_index: int, layer: nn.Module, rotary: nn.Module, dtype: torch.dtype,
    batch_size: int, device: torch.device,
) -> list[str]:
    """The whole stage in this process."""
    dst = create_next_acts(store, layer_index, dtype)
    starts = list(range(0, store.array_shape(dst)[0], batch_size))
    forward_rows(store, layer_index, layer, rotary, dtype, batch_size, device, starts)
    return [dst]
