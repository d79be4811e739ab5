"""NeUQI under the constraint of llama.cpp's K-quants (Q4_K, Q5_K, Q2_K). Pure tensor code.

A K-quant super-block holds 256 consecutive weights of a row, cut into sub-blocks of ``sub``
weights (32 for Q4_K/Q5_K, 16 for Q2_K). Each sub-block ``j`` has its own scale and minimum, but
stored as small integers under two fp16 super-block factors::

    ŵ_i = (d · sc_j) · q_i - dmin · mn_j,   q_i ∈ [0, 2**bits),  sc_j, mn_j ∈ [0, M]

with ``M = 2**scale_bits - 1`` (6 bits for Q4_K/Q5_K, 4 for Q2_K). NeUQI's form is
``ŵ = s (q - z)``, so the sub-block scale is ``s = d·sc`` and its offset ``s·z = dmin·mn``:
both are restricted to grids. Rounding NeUQI's free ``s`` and ``s·z`` onto those grids after the
fact loses accuracy where the grids are coarse; :func:`solve_kquant` instead searches, for each
sub-block, the representable scales next to NeUQI's (``sc = round(s/d) + k``, ``|k| <=
SCALE_RADIUS``), and for each the representable offsets next to the best continuous offset at that
scale (NeUQI's zero-point step, :func:`neuqi.quant.solver.best_zero_point`), and keeps the pair with the
least weighted loss ``sum h (w - ŵ)²``, codes re-rounded for each pair. The pair that rounding
after the fact would give is among the candidates, so the result is never worse than it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuqi.quant.solver import best_zero_point, quantize_tensor

SUPER = 256  # weights per super-block (QK_K in ggml)
SCALE_RADIUS = 2  # representable scales tried on each side of round(s / d)
CHUNK_ELEMENTS = 2**20  # weights per chunk of the candidate search (x candidates in memory)


@dataclass(frozen=True)
class KSpec:
    """One K-quant layout: code bits, sub-block length, bits of the sub-block scale and min."""

    name: str
    bits: int
    sub: int
    scale_bits: int


KSPECS = {
    "Q4_K": KSpec("Q4_K", 4, 32, 6),
    "Q5_K": KSpec("Q5_K", 5, 32, 6),
    "Q2_K": KSpec("Q2_K", 2, 16, 4),
}


@dataclass
class KQuantized:
    """``codes`` uint8 ``[out, in]``; ``d``/``dmin`` float32 holding fp16 values ``[out, in/256]``;
    ``sc``/``mn`` uint8 ``[out, in/256, 256/sub]``."""

    codes: Tensor
    d: Tensor
    dmin: Tensor
    sc: Tensor
    mn: Tensor
    spec: KSpec

    def dequantize(self) -> Tensor:
        """``ŵ = (d·sc)·q - dmin·mn`` in float32, in ggml's order of operations."""
        out_f, in_f = self.codes.shape
        nsub = SUPER // self.spec.sub
        scale = self.d.unsqueeze(-1) * self.sc.to(torch.float32)  # [out, nsb, nsub]
        offset = self.dmin.unsqueeze(-1) * self.mn.to(torch.float32)
        q = self.codes.to(torch.float32).view(out_f, in_f // SUPER, nsub, self.spec.sub)
        return (scale.unsqueeze(-1) * q - offset.unsqueeze(-1)).reshape(out_f, in_f)


def _fp16(t: Tensor) -> Tensor:
    return t.to(torch.float16).to(torch.float32)


def _nonzero(t: Tensor) -> Tensor:
    """fp16 factors: a zero factor (all-zero super-block) becomes the smallest normal fp16."""
    return torch.where(t > 0, t, torch.full_like(t, 2.0**-14))


def solve_kquant(
    weight: Tensor, h_diag: Tensor | None, spec: KSpec, *, method: str = "neuqi",
    device: torch.device | str | None = None,
) -> KQuantized:
    """Quantize ``weight [out, in]`` (``in`` a multiple of 256) to ``spec`` with the weighting
    ``h_diag [in]`` (``None``: all ones), searching representable scales and minimums."""
    out_f, in_f = weight.shape
    if in_f % SUPER:
        raise ValueError(f"{spec.name} needs rows of a multiple of {SUPER} weights, got {in_f}")
    device = torch.device(device) if device is not None else weight.device
    w = weight.to(device=device, dtype=torch.float32)
    h = (torch.ones(in_f, device=device) if h_diag is None
         else h_diag.to(device=device, dtype=torch.float32).clamp_min(0))
    levels, sub, top = 2**spec.bits, spec.sub, 2**spec.scale_bits - 1
    nsb, nsub = in_f // SUPER, SUPER // sub

    # 1. NeUQI per sub-block, unconstrained: scale s and offset o = s·z (ŵ = s·q - o)
    free = quantize_tensor(w, h, bits=spec.bits, group_size=sub, method=method, device=device)
    s = free.scale.view(out_f, nsb, nsub)
    o = (free.scale * free.zero_point).view(out_f, nsb, nsub)

    # 2. super-block factors in fp16: the largest sub-block scale / offset is representable
    d = _nonzero(_fp16(s.amax(-1) / top))
    dmin = _nonzero(_fp16(o.clamp_min(0).amax(-1) / top))

    # 3. per sub-block: candidate scales on the grid, candidate offsets for each
    k = torch.arange(-SCALE_RADIUS, SCALE_RADIUS + 1, device=device, dtype=torch.float32)
    sc_c = (torch.round(s / d.unsqueeze(-1)).unsqueeze(-1) + k).clamp(1, top)  # [out,nsb,nsub,K]
    naive_mn = torch.round(o / dmin.unsqueeze(-1)).clamp(0, top)

    wg = w.view(out_f, nsb, nsub, sub)
    hg = h.view(nsb, nsub, sub).expand(out_f, nsb, nsub, sub)
    hsum = hg.sum(-1, keepdim=True)
    hn = torch.where(hsum > 0, hg / hsum.clamp_min(1e-30), torch.full_like(hg, 1.0 / sub))

    G = out_f * nsb * nsub
    K = sc_c.shape[-1]
    flat = {
        "w": wg.reshape(G, sub), "h": hg.reshape(G, sub), "hn": hn.reshape(G, sub),
        "sc": sc_c.reshape(G, K), "naive": naive_mn.reshape(G),
        "d": d.unsqueeze(-1).expand(out_f, nsb, nsub).reshape(G),
        "dmin": dmin.unsqueeze(-1).expand(out_f, nsb, nsub).reshape(G),
    }
    best_sc = torch.empty(G, device=device)
    best_mn = torch.empty(G, device=device)
    chunk = max(1, CHUNK_ELEMENTS // (sub * K))
    for lo in range(0, G, chunk):
        sl = slice(lo, min(lo + chunk, G))
        best_sc[sl], best_mn[sl] = _search(
            flat["w"][sl], flat["h"][sl], flat["hn"][sl], flat["sc"][sl], flat["naive"][sl],
            flat["d"][sl], flat["dmin"][sl], levels, top,
        )
    sc = best_sc.view(out_f, nsb, nsub)
    mn = best_mn.view(out_f, nsb, nsub)
    scale = d.unsqueeze(-1) * sc
    offset = dmin.unsqueeze(-1) * mn
    codes = torch.round((wg + offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, levels - 1)
    return KQuantized(
        codes=codes.to(torch.uint8).reshape(out_f, in_f), d=d, dmin=dmin,
        sc=sc.to(torch.uint8), mn=mn.to(torch.uint8), spec=spec,
    )


def _search(w: Tensor, h: Tensor, hn: Tensor, sc: Tensor, naive_mn: Tensor, d: Tensor,
            dmin: Tensor, levels: int, top: int) -> tuple[Tensor, Tensor]:
    """Best (sc, mn) of each sub-block row of ``w [G, sub]`` among the candidates."""
    G, K = sc.shape
    scale = d.unsqueeze(-1) * sc  # [G, K]
    x = w.unsqueeze(1) / scale.unsqueeze(-1)  # [G, K, sub]
    z, _ = best_zero_point(x.reshape(G * K, -1), hn.repeat_interleave(K, 0), levels)
    ideal = (scale.reshape(-1) * z / dmin.repeat_interleave(K)).view(G, K)
    mn = torch.stack([ideal.floor(), ideal.ceil(), naive_mn.unsqueeze(-1).expand(G, K)], -1)
    mn = mn.clamp(0, top)  # [G, K, 3]
    off = dmin.view(G, 1, 1) * mn
    sc3 = scale.unsqueeze(-1)
    q = torch.round((w.view(G, 1, 1, -1) + off.unsqueeze(-1)) / sc3.unsqueeze(-1))
    q = q.clamp(0, levels - 1)
    err = w.view(G, 1, 1, -1) - (sc3.unsqueeze(-1) * q - off.unsqueeze(-1))
    loss = (h.view(G, 1, 1, -1) * err * err).sum(-1).view(G, -1)  # [G, K*3]
    best = loss.argmin(-1)
    sc_best = sc.gather(1, (best // 3).unsqueeze(-1)).squeeze(-1)
    mn_best = mn.view(G, -1).gather(1, best.unsqueeze(-1)).squeeze(-1)
    return sc_best, mn_best


def round_after(weight: Tensor, h_diag: Tensor | None, spec: KSpec, *,
                method: str = "neuqi") -> KQuantized:
    """The baseline :func:`solve_kquant` beats: NeUQI's free scale and offset rounded to the
    nearest representable values, codes re-rounded (no search)."""
    out_f, in_f = weight.shape
    w = weight.to(torch.float32)
    levels, sub, top = 2**spec.bits, spec.sub, 2**spec.scale_bits - 1
    nsb, nsub = in_f // SUPER, SUPER // sub
    free = quantize_tensor(w, h_diag, bits=spec.bits, group_size=sub, method=method)
    s = free.scale.view(out_f, nsb, nsub)
    o = (free.scale * free.zero_point).view(out_f, nsb, nsub)
    d = _nonzero(_fp16(s.amax(-1) / top))
    dmin = _nonzero(_fp16(o.clamp_min(0).amax(-1) / top))
    sc = torch.round(s / d.unsqueeze(-1)).clamp(1, top)
    mn = torch.round(o / dmin.unsqueeze(-1)).clamp(0, top)
    wg = w.view(out_f, nsb, nsub, sub)
    scale, offset = d.unsqueeze(-1) * sc, dmin.unsqueeze(-1) * mn
    codes = torch.round((wg + offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, levels - 1)
    return KQuantized(codes.to(torch.uint8).reshape(out_f, in_f), d, dmin, sc.to(torch.uint8),
                      mn.to(torch.uint8), spec)
