"""Stage `pack`: the output folder, from the checkpoint's tensors and the solved parameters.

Quantized linears are bit-packed by the writer; every other tensor (embeddings, norms, biases,
lm_head) is copied as stored. The Hessian diagonal each linear was solved with goes beside the
weights (``hessian_diag.safetensors``): `neuqi export` needs it to weigh and re-solve for formats
with their own constraints. The writer publishes the folder atomically at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuqi.formats.output import OutputWriter
from neuqi.model.checkpoint import Checkpoint
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import distilled_norms, h_name, quant_params


def quantized_weights(ckpt: Checkpoint) -> dict[str, tuple[int, str]]:
    """Checkpoint weight name -> (layer, linear) for every linear that is quantized."""
    arch = ckpt.arch
    return {
        f"{arch.layer_prefix(i)}{linear}.weight": (i, linear)
        for i in range(ckpt.layer_count)
        for linear in arch.linears_of(i)
    }


MAX_SHARD_BYTES = 2 * 2**30  # a 405B layer in float32 would be 12.7 GB of host memory


def shard_bytes(ckpt: Checkpoint) -> int:
    """Output shard size: one decoder layer's weights in float32 (at least 32 MiB, at most
    ``MAX_SHARD_BYTES``), so writing the output holds about one layer in memory, whatever the
    number of layers."""
    prefix = ckpt.arch.layer_prefix(0)
    params = sum(math.prod(ckpt.shape(n)) for n in ckpt.names if n.startswith(prefix))
    return min(max(4 * params, 32 * 2**20), MAX_SHARD_BYTES)


def run_pack(
    store: JobStore, ckpt: Checkpoint, out: Path, quant_info: dict[str, Any],
    on_tensor: Callable[[], None] | None = None,
) -> Path:
    bits, group_size = quant_info["bits"], quant_info["group_size"]
    targets = quantized_weights(ckpt)
    norms = {  # distilled RMSNorm weights by checkpoint name
        f"{ckpt.arch.layer_prefix(i)}{param}": array
        for i in range(ckpt.layer_count)
        for param, array in distilled_norms(store, i).items()
    }
    with OutputWriter(out, ckpt, quant_info, max_shard_bytes=shard_bytes(ckpt)) as writer:
        for name in ckpt.names:
            if name in targets:
                layer, linear = targets[name]
                codes, scale, zero = quant_params(store, layer, linear)
                writer.add_quantized(name, codes, scale, zero, bits, group_size)
                h_diag = h_name(layer, ckpt.arch.group_in(layer, linear))
                if store.has_array(h_diag):
                    writer.add_hessian_diag(name, store.read_array(h_diag))
            elif name in norms:
                original = ckpt.read(name)
                writer.add_tensor(name, store.read_array(norms[name]).to(original.dtype))
            else:
                writer.add_tensor(name, ckpt.read(name))
            if on_tensor is not None:
                on_tensor()
        return writer.finalize()
