"""Names in the job store and small helpers shared by the stages."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from neuqi.pipeline.store import JobStore


def acts_name(layer: int) -> str:
    """Inputs of decoder layer ``layer`` for every calibration window: ``[N, seqlen, hidden]``."""
    return f"acts/{layer}"


def h_name(layer: int, group: str) -> str:
    """Hessian diagonal of one input of layer ``layer`` (``group`` as in ArchSpec.linear_groups)."""
    return f"layers/{layer}/h/{group}"


def q_name(layer: int, linear: str, part: str) -> str:
    """Quantized parameters of one linear: part in codes, scale, zero_point, loss."""
    return f"layers/{layer}/q/{linear}/{part}"


Q_PARTS = ("codes", "scale", "zero_point", "loss")


def batches(store: JobStore, name: str, batch_size: int, device: torch.device) -> Iterator[
    tuple[int, torch.Tensor]
]:
    """(first row, rows) of array ``name`` in batches of ``batch_size`` rows, on ``device``."""
    total = store.array_shape(name)[0]
    for start in range(0, total, batch_size):
        rows = slice(start, min(start + batch_size, total))
        yield start, store.read_array(name, device=device, rows=rows)


def fp_acts_name(layer: int) -> str:
    """Inputs of decoder layer ``layer`` in the full-precision model (kept only when distilling;
    the embeddings ``acts/0`` are the same for both models)."""
    return acts_name(0) if layer == 0 else f"acts_fp/{layer}"


def distilled_name(layer: int, linear: str, part: str) -> str:
    """A distilled scale or zero_point (stage ``distill``), beside the solved one."""
    return q_name(layer, linear, f"{part}_d")


def norm_name(layer: int, param: str) -> str:
    """A distilled RMSNorm weight of layer ``layer`` (``param`` relative to the layer)."""
    return f"layers/{layer}/norm/{param}"


def quant_params(store: JobStore, layer: int, linear: str, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point) of one linear: the distilled scale and zero-point once the
    layer's ``distill`` record exists, else the solved ones. The one place that chooses."""
    distilled = store.is_done(f"distill/{layer}")
    codes = store.read_array(q_name(layer, linear, "codes"), device=device)
    scale, zero = (
        store.read_array(
            distilled_name(layer, linear, part) if distilled else q_name(layer, linear, part),
            device=device,
        )
        for part in ("scale", "zero_point")
    )
    return codes, scale, zero


def distilled_norms(store: JobStore, layer: int) -> dict[str, str]:
    """Parameter name (relative to the layer) -> array name of layer ``layer``'s distilled norm
    weights (empty unless the layer was distilled with its norms)."""
    record = store.record(f"distill/{layer}")
    if record is None:
        return {}
    return dict(record["info"].get("norms", {}))
