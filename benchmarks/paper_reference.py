"""The paper's search as published: two sorts of the 2m breakpoints for every candidate scale.

This is the baseline that ``benchmarks/solver.py`` measures the package's solver against (speed
and loss). It is written for clarity, batched over groups like the package's solver, and shares
nothing with it except the Min-Max scale and the paper's scale grid, so that a mistake in one
shows up as a loss difference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuqi.quant.solver import COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH, minmax_params


def _sweep(bounds: Tensor, lo0: Tensor, hi_end: Tensor, qa: Tensor, qb: Tensor, qc: Tensor,
           da: Tensor, db: Tensor, dc: Tensor) -> Tensor:
    """Minimise a piecewise quadratic ``a z² + 2 b z + c`` over sorted breakpoints.

    ``qa, qb, qc [G, 1]`` are the coefficients left of the first breakpoint, ``da, db, dc`` the
    changes at each (sorted) breakpoint. A flat piece (a = 0) is taken at its midpoint.
    """
    a = torch.cat([qa, qa + da.cumsum(1)], 1)
    b = torch.cat([qb, qb + db.cumsum(1)], 1)
    c = torch.cat([qc, qc + dc.cumsum(1)], 1)
    lo = torch.cat([lo0, bounds], 1)
    hi = torch.cat([bounds, hi_end], 1)
    flat = a <= 1e-12
    z = torch.where(flat, 0.5 * (lo + hi), -b / torch.where(flat, torch.ones_like(a), a))
    z = torch.maximum(torch.minimum(z, hi), lo)
    value = a * z * z + 2 * b * z + c
    best = value.argmin(1, keepdim=True)
    return z.gather(1, best).squeeze(1)


def paper_zero_point(x: Tensor, h: Tensor, levels: int) -> Tensor:
    """Step 1 (relaxed, sorted sweep) and step 2 (exact on [z0 - 1, z0 + 1], sorted sweep).

    Computed in the dtype of ``x`` (float32 as the paper's code runs).
    """
    n1 = levels - 1
    # Step 1. Left of every breakpoint all elements clip low: ψ = (x + z)² - 1/4.
    bp = torch.cat([-0.5 - x, n1 + 0.5 - x], 1)
    # at -0.5 - x_i element i leaves the low side; at n - 0.5 - x_i it joins the high side
    da = torch.cat([-h, h], 1)
    db = torch.cat([-h * x, h * (x - n1)], 1)
    dc = torch.cat([-h * (x * x - 0.25), h * ((x - n1) ** 2 - 0.25)], 1)
    bounds, order = torch.sort(bp, 1)
    span = 4.0 * (x.abs().amax(1, keepdim=True) + levels)
    z0 = _sweep(
        bounds, bounds[:, :1] - span, bounds[:, -1:] + span,
        h.sum(1, keepdim=True), (h * x).sum(1, keepdim=True), (h * (x * x - 0.25)).sum(1, keepdim=True),
        da.gather(1, order), db.gather(1, order), dc.gather(1, order),
    )
    # Step 2. Codes rise by one at each half-integer crossing of x + z inside [0.5, n - 1.5].
    start = (z0 - 1).unsqueeze(1)
    t = x + start
    c = torch.floor(t + 0.5)
    q0 = c.clamp(0, n1)
    u1 = c + 0.5 - t
    inf = torch.full_like(x, torch.inf)
    cross1 = torch.where((c >= 0) & (c <= n1 - 1), u1, inf)
    cross2 = torch.where((c >= -1) & (c <= n1 - 2), u1 + 1, inf)
    d1 = t - c  # residual before the first crossing
    d2 = t - c - 1  # residual before the second
    bp = torch.cat([cross1, cross2], 1)
    hh = torch.cat([h, h], 1)
    dd = torch.cat([d1, d2], 1)
    bounds, order = torch.sort(bp, 1)
    inside = torch.isfinite(bounds)
    hs = torch.where(inside, hh.gather(1, order), torch.zeros_like(bounds))
    ds = dd.gather(1, order)
    bounds = torch.where(inside, bounds, torch.full_like(bounds, 2.0))
    d0 = t - q0
    u = _sweep(
        bounds, torch.zeros_like(start), torch.full_like(start, 2.0),
        h.sum(1, keepdim=True), (h * d0).sum(1, keepdim=True), (h * d0 * d0).sum(1, keepdim=True),
        torch.zeros_like(hs), -hs, hs * (1 - 2 * ds),
    )
    return start.squeeze(1) + u


def paper_search(w: Tensor, h: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's coarse (64) + fine (32) scale search with ``paper_zero_point`` at each scale."""
    s_mm, _ = minmax_params(w, levels)
    best_s = torch.zeros_like(s_mm)
    best_z = torch.zeros_like(s_mm)
    best_loss = torch.full_like(s_mm, torch.inf)

    def consider(s: Tensor) -> None:
        x = w / s.unsqueeze(1)
        z = paper_zero_point(x, h, levels)
        t = x + z.unsqueeze(1)
        err = t - torch.round(t).clamp(0, levels - 1)
        loss = s * s * (h * err * err).sum(1)
        better = loss < best_loss
        best_s.copy_(torch.where(better, s, best_s))
        best_z.copy_(torch.where(better, z, best_z))
        best_loss.copy_(torch.where(better, loss, best_loss))

    for i in range(1, COARSE_STEPS + 1):
        consider(s_mm * (i / COARSE_STEPS))
    coarse = best_s.clone()
    for j in range(-FINE_HALF_WIDTH, FINE_HALF_WIDTH + 1):
        if j:
            consider(coarse + s_mm * (j / FINE_DIVISOR))
    return best_s, best_z, best_loss
