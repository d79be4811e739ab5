"""Stage `embed`: tokenized calibration windows and the first decoder layer's inputs."""

from __future__ import annotations

import torch

from neuqi.model.checkpoint import Checkpoint
from neuqi.model.layers import build_embedding
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import acts_name


def run_embed(
    store: JobStore, ckpt: Checkpoint, windows: torch.Tensor, dtype: torch.dtype,
    batch_size: int, device: torch.device,
) -> list[str]:
    """Store ``windows`` (int64 ``[N, seqlen]``) and their embeddings as ``acts/0``."""
    store.write_array("calib/tokens", windows, chunks=1)
    embed = build_embedding(ckpt, device, dtype)
    n, seqlen = windows.shape
    name = acts_name(0)
    store.create_array(name, (n, seqlen, embed.embedding_dim), dtype, chunks=1)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = windows[start:start + batch_size].to(device)
            store.write_rows(name, start, embed(ids).to(dtype).cpu())
    return ["calib/tokens", name]
