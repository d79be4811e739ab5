"""Stage `forward`: the next layer's inputs, from this layer run over this layer's inputs.

With sequential quantization the layer's linears carry their dequantized weights first, so the
next layer is calibrated on what the quantized model computes (as GPTQ does).
"""

from __future__ import annotations

import torch
from torch import nn

from neuqi.models import layer_forward, position_embeddings_for
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import acts_name, batches


def run_forward(
    store: JobStore, layer_index: int, layer: nn.Module, rotary: nn.Module, dtype: torch.dtype,
    batch_size: int, device: torch.device,
) -> list[str]:
    src, dst = acts_name(layer_index), acts_name(layer_index + 1)
    shape = store.array_shape(src)
    store.create_array(dst, shape, dtype, chunks=1)
    with torch.no_grad():
        for start, hidden in batches(store, src, batch_size, device):
            out = layer_forward(layer, hidden, position_embeddings_for(rotary, hidden))
            store.write_rows(dst, start, out.to(dtype).cpu())
    return [dst]
