"""Stage `hessian`: the diagonal of each linear input's calibration Hessian, for one layer.

For every distinct input of the layer (q/k/v share one, gate/up share one, o and down have their
own) it accumulates ``sum x_j²`` over all calibration tokens by running the full-precision layer
over the layer's stored inputs, then ``h_j = mean x_j² + 1% of the mean of the diagonal`` (the
damping of the design note). With GPTQ (``--gptq``) the same pass also accumulates each input's
full Hessian ``XᵀX / tokens`` (`neuqi.stages.gptq`); that job's Hessian runs as one task, so the
float32 sum has one order whatever the executor.

The work splits over calibration batches: :func:`batch_sums` gives one float64 partial sum per
batch (for any contiguous range of rows, so the batches can run on different workers) and
:func:`write_hessian` adds them in batch order. The batches and the order of the additions do not
depend on how the rows were split, so the result is bitwise the same however it was distributed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neuqi.model.layers import ArchSpec, layer_forward, position_embeddings_for
from neuqi.model.moe import MOE_MIN_TOKENS, calibrate_all_tokens
from neuqi.pipeline.store import JobStore
from neuqi.stages.common import acts_name, h_name
from neuqi.stages.gptq import accumulate_hessian, hessian_name
from neuqi.stages.gptq import write_hessian as write_full_hessian

DAMPING = 0.01  # fraction of the mean diagonal added to every h_j (design note, section 2)
SQUARE_BYTES = 64 * 2**20  # the float64 squares of a linear's input, this many bytes at a time

MOE_ALL = "moe_all"  # an MoE layer's router input: its all-token MLP statistics

#: Per batch, per input group: (``sum x_j²`` over the batch's tokens in float64, token count).
BatchSums = dict[str, tuple[torch.Tensor, int]]


def batch_starts(total: int, batch_size: int) -> list[int]:
    """First row of every calibration batch: the unit of work that results never depend on."""
    return list(range(0, total, batch_size))


def _square_sums(x: torch.Tensor) -> torch.Tensor:
    """``sum x_j²`` over the rows of ``x [rows, d]`` in float64, ``SQUARE_BYTES`` at a time."""
    step = max(1, SQUARE_BYTES // (8 * x.shape[-1]))
    total = None
    for lo in range(0, x.shape[0], step):
        part = x[lo:lo + step].to(torch.float64)
        part = (part * part).sum(0)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total.cpu()


def batch_sums(
    store: JobStore, layer_index: int, layer: nn.Module, arch: ArchSpec, rotary: nn.Module,
    batch_size: int, device: torch.device, starts: list[int],
    full: dict[str, torch.Tensor] | None = None, windows: int | None = None,
    moe_all: bool = False,
) -> list[BatchSums]:
    """Partial sums of the batches that begin at ``starts`` (from :func:`batch_starts`), each on
    the CPU, in the order given. With ``full`` (GPTQ), ``XᵀX`` of every input group is also added
    into ``full[group]`` (float32, on ``device``, in batch order). ``windows``: run a batch
    through the layer that many calibration windows at a time (default: the whole batch), to
    hold less (the memory budget); the batch's sums add them up. In a mixture-of-experts layer
    an expert's groups see the tokens routed to it (all tokens with ``moe_all``), and the router's
    input is summed too (group ``MOE_ALL``: the fallback of experts with too few tokens)."""
    total = store.array_shape(acts_name(layer_index))[0]
    current: dict[str, tuple[torch.Tensor, int]] = {}
    hooks = []
    hooked = [(g, names[0]) for g, names in arch.groups(layer_index)]
    if arch.moe is not None and arch.is_moe_layer(layer_index):
        hooked.append((MOE_ALL, arch.moe.router))
    for group, first in hooked:
        module = layer.get_submodule(first)

        def hook(_module: nn.Module, args: tuple, group: str = group) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            squares, count = _square_sums(x), x.shape[0]
            if group in current:  # a later window or MLP chunk of the same batch
                squares, count = current[group][0] + squares, current[group][1] + count
            current[group] = (squares, count)
            if full is not None:
                full[group] = accumulate_hessian(full.get(group), args[0])

        hooks.append(module.register_forward_pre_hook(hook))
    step = windows or batch_size
    out = []
    calibrate_all_tokens(layer, moe_all)
    try:
        with torch.no_grad():
            for start in starts:
                stop = min(start + batch_size, total)
                for lo in range(start, stop, step):
                    hidden = store.read_array(acts_name(layer_index), device=device,
                                              rows=slice(lo, min(lo + step, stop)))
                    layer_forward(layer, hidden, position_embeddings_for(rotary, hidden))
                    del hidden
                out.append(dict(current))
                current.clear()
    finally:
        calibrate_all_tokens(layer, False)
        for handle in hooks:
            handle.remove()
    return out


def _total(sums: list[BatchSums], group: str) -> tuple[torch.Tensor | None, int]:
    """``sum x_j²`` and tokens of ``group`` over the batches, in batch order (a batch where an
    expert received no token has no entry)."""
    total, tokens = None, 0
    for part in sums:
        if group in part:
            total = part[group][0] if total is None else total + part[group][0]
            tokens += part[group][1]
    return total, tokens


def _expert_fallback(sums: list[BatchSums], groups: list[str], info: dict[str, Any]
                     ) -> dict[str, tuple[torch.Tensor | None, int]]:
    """Each input group's (sums, tokens), an expert with fewer than ``MOE_MIN_TOKENS`` tokens
    given the layer's all-token statistics: its ``e{e}_in`` the router's input over all tokens,
    its ``e{e}_out`` the down projections' input pooled over every expert of the layer. Fills
    ``info`` with each expert's tokens and the experts that fell back."""
    totals = {g: _total(sums, g) for g in groups}
    experts = sorted({int(g[1:].split("_")[0]) for g in groups if g.startswith("e")})
    if not experts:
        return totals
    pooled_out = [(t, n) for t, n in (totals[f"e{e}_out"] for e in experts) if t is not None]
    out_all = (sum(t for t, _ in pooled_out), sum(n for _, n in pooled_out)) if pooled_out else (
        None, 0)
    expert_tokens = [totals[f"e{e}_in"][1] for e in experts]
    fallback = [e for e, n in zip(experts, expert_tokens, strict=True) if n < MOE_MIN_TOKENS]
    if fallback:
        router_all = _total(sums, MOE_ALL)
        for e in fallback:
            totals[f"e{e}_in"] = router_all
            totals[f"e{e}_out"] = out_all  # type: ignore[assignment]
    info["expert_tokens"] = expert_tokens
    info["experts_fallback"] = fallback
    return totals


def write_hessian(
    store: JobStore, layer_index: int, arch: ArchSpec, sums: list[BatchSums],
    info: dict[str, Any] | None = None,
) -> list[str]:
    """Add the per-batch sums in batch order, damp, and store one ``h`` per input group. In a
    mixture-of-experts layer ``info`` (if given) receives each expert's calibration tokens and
    the experts that fell back to the layer's statistics (:func:`_expert_fallback`)."""
    names = []
    groups = [g for g, _ in arch.groups(layer_index)]
    totals = _expert_fallback(sums, groups, info if info is not None else {})
    for group in groups:
        total, tokens = totals[group]
        if total is None or not tokens:
            raise RuntimeError(f"layer {layer_index}: no calibration token reached {group}")
        h = total / tokens
        h = h + DAMPING * h.mean()
        name = h_name(layer_index, group)
        store.write_array(name, h.to(torch.float32).cpu())
        names.append(name)
    return names


def write_full_hessians(
    store: JobStore, layer_index: int, full: dict[str, torch.Tensor], sums: list[BatchSums]
) -> list[str]:
    """Store each input group's full Hessian ``XᵀX / tokens`` (GPTQ), from the ``full`` sums that
    :func:`batch_sums` accumulated over every batch of ``sums``."""
    names = []
    for group, hessian in full.items():
        tokens = sum(part[group][1] for part in sums)
        name = hessian_name(layer_index, group)
        write_full_hessian(store, name, hessian.div_(tokens))
        names.append(name)
    return names


def run_hessian(
    store: JobStore, layer_index: int, layer: nn.Module, arch: ArchSpec, rotary: nn.Module,
    batch_size: int, device: torch.device, full: bool = False,
) -> list[str]:
    """The whole stage in this process: every batch, then the reduction; with ``full`` (GPTQ)
    the full Hessians are stored too."""
    starts = batch_starts(store.array_shape(acts_name(layer_index))[0], batch_size)
    hessians: dict[str, torch.Tensor] | None = {} if full else None
    sums = batch_sums(store, layer_index, layer, arch, rotary, batch_size, device, starts,
                      hessians)
    names = write_hessian(store, layer_index, arch, sums)
    if hessians is not None:
        names += write_full_hessians(store, layer_index, hessians, sums)
    return names
